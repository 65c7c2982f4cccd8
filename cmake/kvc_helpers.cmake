# Small CMake helpers shared by the kvc build.

# Warnings on for kvc's own targets only (never for dependencies, never globally).
function(kvc_target_warnings target)
  target_compile_options(${target} PRIVATE
    "$<$<COMPILE_LANGUAGE:CXX>:-Wall;-Wextra;-Wpedantic>"
    # -Wpedantic is left out under nvcc: its generated host code trips it (line directives).
    "$<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra>")
endfunction()
