#!/usr/bin/env bash
# Installs system packages beyond .venv with apt-get, system-wide: by default those the tests
# need, Debian's chromium (the browser tests of the web playground) and socat (the relay of
# scripts/serve.sh --private); with arguments, only the packages named. Does nothing for a
# package that is there; without root or apt-get it only warns (the tests that need it skip).
set -euo pipefail

packages=("$@")
((${#packages[@]})) || packages=(chromium socat)
missing=()
for package in "${packages[@]}"; do
  command -v "$package" >/dev/null || missing+=("$package")
done
if ((${#missing[@]} == 0)); then
  exit 0
fi
if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
  echo "${missing[*]} missing; installing needs root and apt-get: the tests that need it skip" >&2
  exit 0
fi
echo "installing with apt-get: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}" >/dev/null
