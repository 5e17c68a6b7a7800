# Finds onnxruntime's C/C++ API headers and sets ORT_INCLUDE_DIR; links nothing.
#
# Order: the ORT_INCLUDE_DIR environment variable or CMake variable; a system install
# (/usr/include/onnxruntime); else the headers of Debian trixie's libonnxruntime-dev (ORT 1.21,
# API 21), downloaded into the build dir by fetch_debian_package (DebianPackage.cmake).

include(DebianPackage)

set(_ort_marker "onnxruntime_cxx_api.h")

if(DEFINED ENV{ORT_INCLUDE_DIR} AND NOT "$ENV{ORT_INCLUDE_DIR}" STREQUAL "")
  set(ORT_INCLUDE_DIR "$ENV{ORT_INCLUDE_DIR}" CACHE PATH "onnxruntime headers" FORCE)
endif()

if(NOT ORT_INCLUDE_DIR AND EXISTS "/usr/include/onnxruntime/${_ort_marker}")
  set(ORT_INCLUDE_DIR "/usr/include/onnxruntime" CACHE PATH "onnxruntime headers")
endif()

if(NOT ORT_INCLUDE_DIR)
  # Only the headers are needed: the library stub under usr/lib is dropped.
  fetch_debian_package(libonnxruntime-dev SUITE trixie
    MARKER "usr/include/onnxruntime/${_ort_marker}" PRUNE usr/lib OUT _ort_root
    HINT "Set ORT_INCLUDE_DIR to a directory holding onnxruntime_cxx_api.h (onnxruntime >= 1.21).")
  set(ORT_INCLUDE_DIR "${_ort_root}/usr/include/onnxruntime" CACHE PATH "onnxruntime headers")
endif()

if(NOT EXISTS "${ORT_INCLUDE_DIR}/${_ort_marker}")
  message(FATAL_ERROR "ORT_INCLUDE_DIR=${ORT_INCLUDE_DIR} has no ${_ort_marker}")
endif()
file(STRINGS "${ORT_INCLUDE_DIR}/onnxruntime_c_api.h" _ver REGEX "^#define ORT_API_VERSION")
string(REGEX MATCH "[0-9]+" ORT_HEADERS_API_VERSION "${_ver}")
if(ORT_HEADERS_API_VERSION LESS 21)
  message(FATAL_ERROR "onnxruntime headers in ${ORT_INCLUDE_DIR} are API ${ORT_HEADERS_API_VERSION}; need >= 21")
endif()
message(STATUS "onnxruntime headers: ${ORT_INCLUDE_DIR} (API ${ORT_HEADERS_API_VERSION})")
