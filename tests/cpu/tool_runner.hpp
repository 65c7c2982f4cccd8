// Runs the `kvc` tool from a test and captures its exit code, stdout and stderr; scratch
// directories for what the tool writes. Shared by the CLI tests of every policy family.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace kvc_test {

struct ToolRun {
  int code = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};

inline std::string read_text(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

inline void write_text(const std::filesystem::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary);
  out << text;
}

// A per-process directory under the system temp directory: ctest runs test cases as separate
// processes in parallel, so the process id keeps their files apart.
inline std::filesystem::path process_temp_dir() {
  const auto dir =
      std::filesystem::temp_directory_path() / ("kvc_tests_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  return dir;
}

// An empty directory `name` for one test's files.
inline std::filesystem::path scratch_dir(const std::string& name) {
  const auto dir = process_temp_dir() / name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

// Runs the tool with the given argument string (shell-quoted by the caller).
inline ToolRun run_tool(const std::string& args) {
  static int counter = 0;
  const auto dir = process_temp_dir();
  const auto out = dir / ("out" + std::to_string(counter) + ".txt");
  const auto err = dir / ("err" + std::to_string(counter++) + ".txt");
  const std::string command = std::string("\"") + KVC_TOOL_PATH + "\" " + args + " >\"" +
                              out.string() + "\" 2>\"" + err.string() + "\"";
  const int status = std::system(command.c_str());
  ToolRun r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = read_text(out);
  r.err = read_text(err);
  return r;
}

// Requires a failing run that printed exactly one line on stderr, `kvc: error: ...` containing
// `needle`.
inline void require_one_line_error(const ToolRun& r, const std::string& needle) {
  INFO("stderr: " << r.err);
  REQUIRE(r.code != 0);
  REQUIRE(r.err.find(needle) != std::string::npos);
  REQUIRE(r.err.rfind("kvc: error: ", 0) == 0);
  REQUIRE(std::count(r.err.begin(), r.err.end(), '\n') == 1);
}

}  // namespace kvc_test
