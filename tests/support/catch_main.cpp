// The Catch2 v2 main() of kvc_cpu_tests; the test cases live in tests/cpu/test_*.cpp.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
