#!/usr/bin/env bash
# From scratch: stop any earlier cluster and remove its work folder, then
# install (if needed) + start + smoke.sh + stop, timing each phase.
# The cluster is stopped on every exit path. Extra arguments go to smoke.sh.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CLUSTER=$HERE/cluster.sh
timings=()
running=0

phase() { # name, command...
  local name=$1 t0=$SECONDS rc=0
  shift
  echo "=== $name"
  "$@" || rc=$?
  timings+=("$name $((SECONDS - t0))s")
  echo "=== $name: $((SECONDS - t0)) s (rc=$rc)"
  return "$rc"
}

finish() {
  local rc=$?
  if ((running)); then
    phase stop "$CLUSTER" stop || rc=1
  fi
  echo "selftest timings: ${timings[*]} total $((SECONDS - T0))s"
  ((rc == 0)) && echo "selftest: ok" || echo "selftest: FAILED (rc=$rc)" >&2
  exit "$rc"
}

T0=$SECONDS
trap finish EXIT
phase clean "$CLUSTER" clean
phase install "$CLUSTER" install
running=1
phase start "$CLUSTER" start
phase smoke "$HERE/smoke.sh" "$@"
