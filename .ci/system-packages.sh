#!/usr/bin/env bash
# The Debian packages the tests need beyond Python: Chromium (the MLflow UI check) and PostgreSQL (the scale-out
# tests; .ci/postgres.sh starts it). Installed once, when missing and running as root; a missing one is one line.

install_system_packages() {
  local missing=()
  command -v chromium >/dev/null || command -v chromium-browser >/dev/null || missing+=(chromium)
  ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1 || missing+=(postgresql)
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "ci: missing Debian packages: ${missing[*]} (install them as root: apt-get install ${missing[*]})" >&2
    return 1
  fi
  echo "ci: installing Debian packages: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || { echo "ci: could not install ${missing[*]} from the Debian packages" >&2; return 1; }
}
