# Finds pocketfft's header-only C++ FFT (BSD-3, github.com/mreineck/pocketfft, `cpp` branch)
# and sets POCKETFFT_INCLUDE_DIR to a directory holding pocketfft_hdronly.hpp; links nothing.
#
# Order: the POCKETFFT_INCLUDE_DIR environment variable or CMake variable (a directory with
# pocketfft_hdronly.hpp, e.g. a checkout of pocketfft's cpp branch); else the copy Debian ships.
# Debian has no libpocketfft-dev (not in bookworm, trixie or sid); trixie's python3-pythran
# (0.17) ships the header as pythran/pythonic/numpy/fft/pocketfft.hpp, unmodified apart from
# formatting. It is fetched by fetch_debian_package into the build dir (never into the
# source tree) and copied to _deps/pocketfft/include/pocketfft_hdronly.hpp.

include(DebianPackage)

set(_pocketfft_header "pocketfft_hdronly.hpp")

if(DEFINED ENV{POCKETFFT_INCLUDE_DIR} AND NOT "$ENV{POCKETFFT_INCLUDE_DIR}" STREQUAL "")
  set(POCKETFFT_INCLUDE_DIR "$ENV{POCKETFFT_INCLUDE_DIR}" CACHE PATH "pocketfft header" FORCE)
endif()

if(NOT POCKETFFT_INCLUDE_DIR)
  set(_pythran_header "usr/lib/python3/dist-packages/pythran/pythonic/numpy/fft/pocketfft.hpp")
  fetch_debian_package(python3-pythran SUITE trixie MARKER "${_pythran_header}"
    OUT _pythran_root
    HINT "Set POCKETFFT_INCLUDE_DIR to a directory holding ${_pocketfft_header}.")
  set(_include "${CMAKE_BINARY_DIR}/_deps/pocketfft/include")
  configure_file("${_pythran_root}/${_pythran_header}" "${_include}/${_pocketfft_header}" COPYONLY)
  set(POCKETFFT_INCLUDE_DIR "${_include}" CACHE PATH "pocketfft header")
endif()

if(NOT EXISTS "${POCKETFFT_INCLUDE_DIR}/${_pocketfft_header}")
  message(FATAL_ERROR "POCKETFFT_INCLUDE_DIR=${POCKETFFT_INCLUDE_DIR} has no ${_pocketfft_header}")
endif()
message(STATUS "pocketfft: ${POCKETFFT_INCLUDE_DIR}/${_pocketfft_header}")
