# fetch_debian_package(): downloads one Debian package with apt into the build dir and unpacks
# it there (dpkg -x), for build-time headers that the machine does not have installed. The
# unpacked tree is kept, so rebuilds do not refetch. The download uses private apt state (lists,
# cache, sources) so the machine's own apt configuration and installed packages are left
# untouched; nothing is installed.
#
#   fetch_debian_package(<package> SUITE <suite> MARKER <path in the package>
#                        [PRUNE <paths in the package>...] OUT <var> [HINT <text>])
#
# Sets <var> to the unpacked root (the package's "/"). MARKER is a file the package must hold
# (it also tells a complete earlier fetch); PRUNE lists what to delete after unpacking; HINT
# ends every error message (how to do without the download).

function(_debian_mirror out_var)
  # The machine's configured Debian mirror (deb822 or one-line format), else deb.debian.org.
  set(mirror "http://deb.debian.org/debian")
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
  set(${out_var} "${mirror}" PARENT_SCOPE)
endfunction()

function(fetch_debian_package package)
  cmake_parse_arguments(PARSE_ARGV 1 arg "" "SUITE;MARKER;OUT;HINT" "PRUNE")
  if(NOT arg_SUITE OR NOT arg_MARKER OR NOT arg_OUT)
    message(FATAL_ERROR "fetch_debian_package(${package}): SUITE, MARKER and OUT are required")
  endif()
  set(work "${CMAKE_BINARY_DIR}/_deps/${package}")
  set(unpacked "${work}/root")
  if(EXISTS "${unpacked}/${arg_MARKER}")
    message(STATUS "${package} (${arg_SUITE}): cached in ${unpacked}")
    set(${arg_OUT} "${unpacked}" PARENT_SCOPE)
    return()
  endif()
  find_program(APT_GET apt-get)
  find_program(DPKG dpkg)
  if(NOT APT_GET OR NOT DPKG)
    message(FATAL_ERROR "${package} is needed and apt-get/dpkg are not available to fetch it. "
      "${arg_HINT}")
  endif()

  _debian_mirror(mirror)
  set(keyring "/usr/share/keyrings/debian-archive-keyring.gpg")
  file(REMOVE_RECURSE "${work}")
  file(MAKE_DIRECTORY "${work}/lists/partial" "${work}/cache/archives/partial"
       "${work}/sourceparts" "${work}/preferences.d" "${work}/download")
  if(EXISTS "${keyring}")
    set(signed "[signed-by=${keyring}] ")
  else()
    set(signed "")
  endif()
  file(WRITE "${work}/sources.list" "deb ${signed}${mirror} ${arg_SUITE} main\n")
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
  message(STATUS "${package}: fetching from ${mirror} (${arg_SUITE})")
  execute_process(COMMAND "${APT_GET}" ${apt_opts} update
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 600)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "apt-get update (${arg_SUITE}, private lists) failed (${rc}): ${err}\n"
      "${arg_HINT}")
  endif()
  execute_process(COMMAND "${APT_GET}" ${apt_opts} download "${package}"
    WORKING_DIRECTORY "${work}/download"
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 600)
  file(GLOB debs "${work}/download/${package}_*.deb")
  if(NOT rc EQUAL 0 OR NOT debs)
    message(FATAL_ERROR "apt-get download ${package} (${arg_SUITE}) failed (${rc}): ${err}\n"
      "${arg_HINT}")
  endif()
  list(GET debs 0 deb)
  execute_process(COMMAND "${DPKG}" -x "${deb}" "${unpacked}" RESULT_VARIABLE rc ERROR_VARIABLE err)
  if(NOT rc EQUAL 0 OR NOT EXISTS "${unpacked}/${arg_MARKER}")
    message(FATAL_ERROR "unpacking ${deb} failed or it has no ${arg_MARKER} (${rc}): ${err}")
  endif()
  # apt's lists (~20 MB) and the .deb are not needed once unpacked.
  file(REMOVE_RECURSE "${work}/lists" "${work}/cache" "${work}/download")
  foreach(path IN LISTS arg_PRUNE)
    file(REMOVE_RECURSE "${unpacked}/${path}")
  endforeach()
  message(STATUS "${package}: unpacked in ${unpacked} (from ${deb})")
  set(${arg_OUT} "${unpacked}" PARENT_SCOPE)
endfunction()
