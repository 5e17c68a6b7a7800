# Dense inner products go through OpenBLAS from the PyPI package scipy-openblas32 (headers and
# a shared library inside the wheel; symbols prefixed scipy_). Defines the INTERFACE target
# compressor_blas, COMPRESSOR_BLAS_RPATH (where the installed library finds it at run time) and
# COMPRESSOR_BLAS_BUILD_RPATH (the same for the library in the build tree).
#
# COMPRESSOR_BLAS (env or CMake var): "openblas" (require it), "builtin" (portable blocked
# GEMM, several times slower: for builds without the package), or unset = openblas if found.

set(_blas_choice "$ENV{COMPRESSOR_BLAS}")
if(DEFINED COMPRESSOR_BLAS AND NOT COMPRESSOR_BLAS STREQUAL "")
  set(_blas_choice "${COMPRESSOR_BLAS}")
endif()

add_library(compressor_blas INTERFACE)
set(COMPRESSOR_BLAS_RPATH "")
set(COMPRESSOR_BLAS_BUILD_RPATH "")
set(COMPRESSOR_BLAS_NAME "builtin")

if(NOT _blas_choice STREQUAL "builtin")
  find_package(Python COMPONENTS Interpreter)
  set(_found FALSE)
  if(Python_EXECUTABLE)
    execute_process(
      COMMAND "${Python_EXECUTABLE}" -c
        "import scipy_openblas32 as s; print(s.get_include_dir()); print(s.get_lib_dir()); print(s.get_library())"
      RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(rc EQUAL 0)
      string(REPLACE "\n" ";" out "${out}")
      list(GET out 0 _inc)
      list(GET out 1 _libdir)
      list(GET out 2 _libname)
      # Not find_library: its result is cached, and each isolated pip build has a new prefix.
      set(_openblas_lib "${_libdir}/lib${_libname}.so")
      if(EXISTS "${_openblas_lib}" AND EXISTS "${_inc}/cblas.h")
        set(_found TRUE)
      endif()
    endif()
  endif()
  if(_found)
    target_include_directories(compressor_blas INTERFACE "${_inc}")
    target_link_libraries(compressor_blas INTERFACE "${_openblas_lib}")
    target_compile_definitions(compressor_blas INTERFACE COMPRESSOR_USE_OPENBLAS=1)
    # Installed as site-packages/compressor/lib/libcompressor_ops.so next to
    # site-packages/scipy_openblas32/lib/; the build-tree path covers uninstalled use.
    set(COMPRESSOR_BLAS_RPATH "\$ORIGIN/../../scipy_openblas32/lib")
    set(COMPRESSOR_BLAS_BUILD_RPATH "${_libdir}")
    set(COMPRESSOR_BLAS_NAME "OpenBLAS (scipy-openblas32, ${_openblas_lib})")
  elseif(_blas_choice STREQUAL "openblas")
    message(FATAL_ERROR "COMPRESSOR_BLAS=openblas but scipy-openblas32 is not importable by "
      "${Python_EXECUTABLE}: pip install scipy-openblas32 (it belongs in [build-system].requires)")
  else()
    message(WARNING "scipy-openblas32 not found by ${Python_EXECUTABLE}: building the portable "
      "builtin GEMM, which is several times slower. Add scipy-openblas32 to the build requirements.")
  endif()
endif()
message(STATUS "GEMM: ${COMPRESSOR_BLAS_NAME}")
