// main() of kvc_cpu_bench; the benchmarks live in the other files of bench/cpu/.
#include <benchmark/benchmark.h>

BENCHMARK_MAIN();
