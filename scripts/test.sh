#!/usr/bin/env bash
# Set up the environment, lint (scripts/lint.sh), and run the tests. Extra arguments go to pytest.
#   bash scripts/test.sh          the full run, as CI (.ci/run) does: every test, the Slurm cluster tests included
#                                 (they install Debian's Slurm packages and start a local cluster: root)
#   bash scripts/test.sh --fast   setup, lint and the tests not marked slow or slurm (no end-to-end training runs,
#                                 no Slurm cluster)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

select=()
if [[ ${1:-} == --fast ]]; then
    shift
    select=(-m "not slow and not slurm")
fi
bash scripts/setup.sh
bash scripts/lint.sh
.venv/bin/pytest -q "${select[@]}" "$@"
