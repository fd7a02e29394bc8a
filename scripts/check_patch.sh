#!/usr/bin/env bash
# Checks that patches/megatron-lm-core_r0.19.0-pretrain_gpt.patch applies to Megatron-LM core_r0.19.0.
#
# Usage: bash scripts/check_patch.sh MEGATRON_LM_GIT_DIR
#   MEGATRON_LM_GIT_DIR: a Megatron-LM checkout or git directory (a bare mirror works) that has core_r0.19.0.
# The Megatron-LM repository is only read (git archive); the patch is applied in a temporary directory.
set -euo pipefail

ref=core_r0.19.0
target=pretrain_gpt.py
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
patch_file="$here/../patches/megatron-lm-core_r0.19.0-pretrain_gpt.patch"

fail() {
    echo "check_patch: FAILED: $*" >&2
    exit 1
}

[ $# -eq 1 ] || { echo "usage: $0 MEGATRON_LM_GIT_DIR" >&2; exit 2; }
repo="$1"
[ -f "$patch_file" ] || fail "patch not found: $patch_file"
git -C "$repo" rev-parse --git-dir >/dev/null 2>&1 || fail "not a git repository: $repo"
sha="$(git -C "$repo" rev-parse --verify --quiet "$ref^{commit}")" || fail "$repo has no $ref (fetch it first)"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

git -C "$repo" archive "$sha" "$target" | tar -x -C "$tmp" || fail "could not export $target from $ref ($sha)"
cd "$tmp"
git init -q .
git -c user.name=check -c user.email=check@localhost add "$target"
git -c user.name=check -c user.email=check@localhost commit -q -m "$ref $target" \
    || fail "could not commit the exported $target"

git apply --check "$patch_file" || fail "git apply --check: the patch does not apply to $ref $target ($sha)"
git apply "$patch_file" || fail "git apply: the patch does not apply to $ref $target ($sha)"
python3 -m py_compile "$target" || fail "the patched $target does not compile"
for name in with_fcp_args wants_fcp; do
    grep -q "$name" "$target" || fail "the patched $target does not mention $name"
done

echo "patch applies cleanly to $ref $target ($sha)"
