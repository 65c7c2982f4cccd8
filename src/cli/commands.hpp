// Private to the kvc tool: calibration subcommands register themselves here, one file each
// (src/cli/calibrate_<method>.cpp), so `kvc calibrate` lists exactly what is linked in.
//
//   int run_calibrate_example(const std::vector<std::string>& args);
//   static const kvc::cli::RegisterCalibrate kRegistered{
//       {"example", "one line on what it computes", run_calibrate_example}};
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace kvc::cli {

struct CalibrateCommand {
  std::string_view name;                             // kvc calibrate <name> ...
  std::string_view summary;                          // one line for `kvc calibrate --help`
  int (*run)(const std::vector<std::string>& args);  // args after the name; returns the exit code
};

std::vector<CalibrateCommand>& calibrate_commands();

struct RegisterCalibrate {
  explicit RegisterCalibrate(CalibrateCommand command) { calibrate_commands().push_back(command); }
};

}  // namespace kvc::cli
