#!/usr/bin/env bash
# Set up the environment, lint, and run the tests. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
.venv/bin/ruff check megatron_fcp tests scripts
.venv/bin/lint-imports
.venv/bin/pytest -q "$@"
