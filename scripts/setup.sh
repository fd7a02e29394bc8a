#!/usr/bin/env bash
# Create (if missing) the project's virtual environment .venv with Python >= 3.12 and install the project
# in editable mode with its test extras. Safe to run again: an existing .venv is reused.
# With --print-python: print the Python it would use and stop.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

is_new_enough() {
    "$@" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1
}

pyenv_candidates() {
    command -v pyenv >/dev/null 2>&1 || return 0
    local root
    root=$(pyenv root 2>/dev/null) || return 0
    compgen -G "$root/versions/3.1[2-9]*/bin/python3" || true
}

find_python() {
    local candidate
    for candidate in python3.12 python3.13 python3 $(pyenv_candidates); do
        if command -v "$candidate" >/dev/null 2>&1 && is_new_enough "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

no_python() {
    echo "setup: no Python >= 3.12 found (tried python3.12, python3.13, python3 and pyenv versions)." >&2
    echo "setup: install Python 3.12 or newer (megatron-core >= 0.17 needs it) and run again." >&2
    exit 1
}

# --print-python: only print the Python >= 3.12 this would build .venv with (for a light login-node venv)
if [[ ${1:-} == --print-python ]]; then
    find_python || no_python
    exit 0
fi

if [[ -x .venv/bin/python ]] && is_new_enough .venv/bin/python; then
    echo "setup: reusing .venv ($(.venv/bin/python --version))"
else
    python=$(find_python) || no_python
    echo "setup: creating .venv with $python ($("$python" --version))"
    "$python" -m venv .venv
fi

echo "setup: installing megatron-fcp in editable mode with test extras"
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -m megatron_fcp.megatron.dataset_helpers
# The shell linter scripts/lint.sh runs (shellcheck) is a Debian package, installed here when this runs as root with apt
if ! command -v shellcheck >/dev/null 2>&1; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing shellcheck (apt-get)"
        apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends shellcheck >/dev/null
    else
        echo "setup: shellcheck not found; scripts/lint.sh needs it: apt-get install shellcheck (as root)" >&2
    fi
fi
echo "setup: done; use .venv/bin/python, .venv/bin/pytest, .venv/bin/fcp"
