# Finds onnxruntime's C/C++ API headers and sets ORT_INCLUDE_DIR; links nothing.
#
# Order: the ORT_INCLUDE_DIR environment variable or CMake variable; a system install
# (/usr/include/onnxruntime); else the headers of Debian trixie's libonnxruntime-dev (ORT 1.21,
# API 21), downloaded with apt into the build dir and kept there, so rebuilds do not refetch.
# The download uses private apt state (lists, cache, sources) so the machine's own apt
# configuration and installed packages are left untouched; nothing is installed.

set(_ort_marker "onnxruntime_cxx_api.h")

if(DEFINED ENV{ORT_INCLUDE_DIR} AND NOT "$ENV{ORT_INCLUDE_DIR}" STREQUAL "")
  set(ORT_INCLUDE_DIR "$ENV{ORT_INCLUDE_DIR}" CACHE PATH "onnxruntime headers" FORCE)
endif()

if(NOT ORT_INCLUDE_DIR AND EXISTS "/usr/include/onnxruntime/${_ort_marker}")
  set(ORT_INCLUDE_DIR "/usr/include/onnxruntime" CACHE PATH "onnxruntime headers")
endif()

function(_compressor_fetch_ort_headers out_dir)
  set(work "${CMAKE_BINARY_DIR}/_deps/libonnxruntime-dev")
  set(unpacked "${work}/root")
  set(include_dir "${unpacked}/usr/include/onnxruntime")
  if(EXISTS "${include_dir}/${_ort_marker}")
    message(STATUS "onnxruntime headers: cached in ${include_dir}")
    set(${out_dir} "${include_dir}" PARENT_SCOPE)
    return()
  endif()
  find_program(APT_GET apt-get)
  find_program(DPKG dpkg)
  if(NOT APT_GET OR NOT DPKG)
    message(FATAL_ERROR "onnxruntime headers not found and apt-get/dpkg are not available to "
      "fetch them: set ORT_INCLUDE_DIR to a directory holding onnxruntime_cxx_api.h "
      "(onnxruntime >= 1.21)")
  endif()

  # Use the machine's configured Debian mirror (deb822 or one-line format), suite trixie.
  set(mirror "http://deb.debian.org/debian")
  set(keyring "/usr/share/keyrings/debian-archive-keyring.gpg")
  if(EXISTS "/etc/apt/sources.list.d/debian.sources")
    file(STRINGS "/etc/apt/sources.list.d/debian.sources" _uris REGEX "^URIs:")
    foreach(line IN LISTS _uris)
      string(REGEX REPLACE "^URIs:[ \t]*([^ \t]+).*$" "\\1" uri "${line}")
      if(NOT uri MATCHES "security")
        set(mirror "${uri}")
        break()
      endif()
    endforeach()
  elseif(EXISTS "/etc/apt/sources.list")
    file(STRINGS "/etc/apt/sources.list" _debs REGEX "^deb[ \t]")
    foreach(line IN LISTS _debs)
      string(REGEX REPLACE "^deb[ \t]+(\\[[^]]*\\][ \t]+)?([^ \t]+).*$" "\\2" uri "${line}")
      if(NOT uri MATCHES "security")
        set(mirror "${uri}")
        break()
      endif()
    endforeach()
  endif()
  string(REGEX REPLACE "/+$" "" mirror "${mirror}")

  file(REMOVE_RECURSE "${work}")
  file(MAKE_DIRECTORY "${work}/lists/partial" "${work}/cache/archives/partial"
       "${work}/sourceparts" "${work}/preferences.d" "${work}/download")
  if(EXISTS "${keyring}")
    set(signed "[signed-by=${keyring}] ")
  else()
    set(signed "")
  endif()
  file(WRITE "${work}/sources.list" "deb ${signed}${mirror} trixie main\n")
  file(WRITE "${work}/status" "")
  set(apt_opts
    -o "Dir::State::Lists=${work}/lists"
    -o "Dir::State::status=${work}/status"
    -o "Dir::Etc::SourceList=${work}/sources.list"
    -o "Dir::Etc::SourceParts=${work}/sourceparts"
    -o "Dir::Etc::PreferencesParts=${work}/preferences.d"
    -o "Dir::Cache=${work}/cache"
    -o "Dir::Cache::pkgcache="
    -o "Dir::Cache::srcpkgcache="
    -o "Debug::NoLocking=1"
    -o "APT::Sandbox::User=root"
    -qq)
  message(STATUS "onnxruntime headers: fetching libonnxruntime-dev (trixie) from ${mirror}")
  execute_process(COMMAND "${APT_GET}" ${apt_opts} update
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 600)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "apt-get update (trixie, private lists) failed (${rc}): ${err}\n"
      "Set ORT_INCLUDE_DIR to a directory holding onnxruntime_cxx_api.h instead.")
  endif()
  execute_process(COMMAND "${APT_GET}" ${apt_opts} download libonnxruntime-dev
    WORKING_DIRECTORY "${work}/download"
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 600)
  file(GLOB debs "${work}/download/libonnxruntime-dev_*.deb")
  if(NOT rc EQUAL 0 OR NOT debs)
    message(FATAL_ERROR "apt-get download libonnxruntime-dev failed (${rc}): ${err}\n"
      "Set ORT_INCLUDE_DIR to a directory holding onnxruntime_cxx_api.h instead.")
  endif()
  list(GET debs 0 deb)
  execute_process(COMMAND "${DPKG}" -x "${deb}" "${unpacked}" RESULT_VARIABLE rc ERROR_VARIABLE err)
  if(NOT rc EQUAL 0 OR NOT EXISTS "${include_dir}/${_ort_marker}")
    message(FATAL_ERROR "unpacking ${deb} failed (${rc}): ${err}")
  endif()
  # Only the headers are needed; drop apt's lists (~20 MB) and the library stub.
  file(REMOVE_RECURSE "${work}/lists" "${work}/cache" "${unpacked}/usr/lib")
  message(STATUS "onnxruntime headers: ${include_dir} (from ${deb})")
  set(${out_dir} "${include_dir}" PARENT_SCOPE)
endfunction()

if(NOT ORT_INCLUDE_DIR)
  _compressor_fetch_ort_headers(_fetched)
  set(ORT_INCLUDE_DIR "${_fetched}" CACHE PATH "onnxruntime headers")
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
