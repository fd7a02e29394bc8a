#!/usr/bin/env bash
# Lint everything CI lints: Python (ruff), the import rules between the packages (import-linter), every shell
# script (shellcheck, Debian's package) and the Dockerfile (hadolint, from its PyPI wheel in .venv).
# Run scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

.venv/bin/ruff check megatron_fcp tests scripts
.venv/bin/lint-imports

if ! command -v shellcheck >/dev/null; then
  echo "lint: shellcheck not found: install it (Debian/Ubuntu: apt-get install shellcheck; scripts/setup.sh does" \
    "so when run as root)" >&2
  exit 1
fi
# every tracked shell script: by name, or by a sh/bash first line
mapfile -t scripts < <(git ls-files -z | xargs -0 awk 'FNR == 1 && (FILENAME ~ /\.(sh|sbatch)$/ ||
  /^#!.*[\/ ](ba)?sh$/) { print FILENAME } { nextfile }' | sort -u)
shellcheck "${scripts[@]}"
echo "lint: shellcheck: ${#scripts[@]} scripts clean"

.venv/bin/hadolint docker/Dockerfile
echo "lint: hadolint $(.venv/bin/hadolint --version | grep -o '[0-9][0-9.]*' | head -1): docker/Dockerfile clean"
