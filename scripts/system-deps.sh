#!/usr/bin/env bash
# Installs the system packages the tests need beyond .venv: Debian's chromium, for the browser tests
# of the web playground. Does nothing when it is there; without root or apt-get it only warns (the
# browser tests then skip).
set -euo pipefail

if [[ -x /usr/bin/chromium ]]; then
  exit 0
fi
if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
  echo "chromium is missing and installing it needs root and apt-get: the browser tests will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium >/dev/null
