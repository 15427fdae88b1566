#!/usr/bin/env bash
# Creates .venv with everything the service and its tests need; does nothing when it is up to date.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-$(command -v python3.11 || command -v python3)}
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "flux-serve needs Python 3.11 (found $("$python" --version)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

stamp=.venv/.installed
wanted=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$wanted" ]]; then
  exit 0
fi

"$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# The CPU build of torch first: otherwise pip resolves a multi-GB CUDA build. GPU images install
# their own torch (docker/).
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet --editable ".[dev]"
echo "$wanted" > "$stamp"
