#!/usr/bin/env bash
# Set up the environment, lint (scripts/lint.sh), and run the tests. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
bash scripts/lint.sh
.venv/bin/pytest -q "$@"
