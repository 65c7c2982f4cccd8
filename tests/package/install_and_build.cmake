# Package test (b): installs the kvc build into a fresh prefix, then configures, builds and runs the
# consumer project against that prefix through CMAKE_PREFIX_PATH alone.
#
#   cmake -DKVC_BUILD_DIR=build -DKVC_PREFIX=build/package-prefix -DKVC_CONSUMER_SOURCE=... \
#         -DKVC_CONSUMER_BUILD=... -DKVC_GENERATOR="Unix Makefiles" -P install_and_build.cmake
cmake_minimum_required(VERSION 3.25)

foreach(required KVC_BUILD_DIR KVC_PREFIX KVC_CONSUMER_SOURCE KVC_CONSUMER_BUILD KVC_GENERATOR)
  if(NOT DEFINED ${required})
    message(FATAL_ERROR "install_and_build.cmake: -D${required}=... is required")
  endif()
endforeach()
string(REPLACE "|" ";" consumer_options "${KVC_CONSUMER_OPTIONS}")
set(config_args)
if(KVC_CONFIG)
  set(config_args --config "${KVC_CONFIG}")
endif()

function(run_step description)
  message(STATUS "package_install: ${description}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE result COMMAND_ECHO STDOUT)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "package_install: ${description} failed (${result})")
  endif()
endfunction()

file(REMOVE_RECURSE "${KVC_PREFIX}" "${KVC_CONSUMER_BUILD}")
run_step("install" "${CMAKE_COMMAND}" --install "${KVC_BUILD_DIR}" --prefix "${KVC_PREFIX}"
         ${config_args})

if(NOT KVC_LIBDIR)
  set(KVC_LIBDIR lib)
endif()
foreach(installed ${KVC_LIBDIR}/cmake/kvc/kvcConfig.cmake ${KVC_LIBDIR}/cmake/kvc/kvcConfigVersion.cmake
                  ${KVC_LIBDIR}/libkvc_reference.a include/kvc/core/error.hpp)
  if(NOT EXISTS "${KVC_PREFIX}/${installed}")
    message(FATAL_ERROR "package_install: ${KVC_PREFIX}/${installed} was not installed")
  endif()
endforeach()
if(KVC_EXPECT_TOOL AND NOT EXISTS "${KVC_PREFIX}/bin/kvc")
  message(FATAL_ERROR "package_install: ${KVC_PREFIX}/bin/kvc was not installed")
endif()

# CMAKE_FIND_USE_PACKAGE_REGISTRY OFF: only the prefix may satisfy find_package(kvc).
run_step("configure consumer" "${CMAKE_COMMAND}" -S "${KVC_CONSUMER_SOURCE}"
         -B "${KVC_CONSUMER_BUILD}" -G "${KVC_GENERATOR}" "-DCMAKE_PREFIX_PATH=${KVC_PREFIX}"
         -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF ${consumer_options})
run_step("build consumer" "${CMAKE_COMMAND}" --build "${KVC_CONSUMER_BUILD}" ${config_args})
find_program(consumer kvc_consumer PATHS "${KVC_CONSUMER_BUILD}" "${KVC_CONSUMER_BUILD}/${KVC_CONFIG}"
             NO_DEFAULT_PATH REQUIRED)
run_step("run consumer" "${consumer}")
