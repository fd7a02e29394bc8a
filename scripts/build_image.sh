#!/usr/bin/env bash
# Build the CPU variant of docker/Dockerfile and run its smoke command in it, on a machine without docker or a GPU
# (root, Linux; Debian's buildah, podman and debootstrap). The cluster variant (NGC) is the same Dockerfile with its
# default build arguments; see docker/README.md.
#
#   bash scripts/build_image.sh          make the Debian base if missing, build, check the image holds no pip
#                                        configuration of this machine, run docker/smoke.sh inside it
#
# 1. Base: Debian trixie (Python 3.13: megatron-core >= 0.17 needs Python >= 3.12, bookworm has 3.11), minbase
#    with python3, pip, venv, ca-certificates, make, g++ and python3-dev, made by debootstrap and imported with
#    podman import as $FCP_BASE_IMAGE (once; delete it to make it again).
# 2. Build: buildah bud --isolation chroot --build-arg STACK=cpu. pip inside the build reaches the package index
#    with this machine's pip configuration, found now (pip config debug): every configuration file it lists as
#    existing, the files those name (constraints, requirements, certificates; pip fails without them) and $PIP_CERT
#    are mounted read-only (buildah bud -v SRC:SRC:ro); PIP_CERT is passed as a build argument unless the
#    configuration names the same file. Local folders they name (find-links, file:// indexes) are not mounted: pip
#    says it ignores them and uses the rest. Nothing of them is copied into the repository or the image. buildah
#    leaves empty files where the mounts were; one more layer removes them.
# 3. The image's filesystem and configuration are searched for what step 2 mounted (see check_no_host_pip below).
# 4. Smoke: buildah from + buildah run --isolation chroot ... bash docker/smoke.sh (versions, the adapter, the
#    dataset helpers, launch check of the shipped configs, a plan, 2 CPU processes training at CP 2 against no CP).
#
# Environment: FCP_IMAGE (the image built)                                  [localhost/megatron-fcp:cpu]
#              FCP_BASE_IMAGE (the Debian base)                              [localhost/debian-trixie-python]
#              FCP_DEBIAN_MIRROR (debootstrap's mirror)                      [debootstrap's default]
#              FCP_KEEP_IMAGE=0: remove the built image at the end            [1: keep it]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

IMAGE=${FCP_IMAGE:-localhost/megatron-fcp:cpu}
BASE=${FCP_BASE_IMAGE:-localhost/debian-trixie-python}
SUITE=trixie
BASE_PACKAGES=python3,python3-pip,python3-venv,python-is-python3,ca-certificates,make,g++,python3-dev

say() { echo "build_image: $*"; }
die() {
  echo "build_image: error: $*" >&2
  exit 1
}

[[ $(id -u) == 0 ]] || die "needs root (buildah with chroot isolation, debootstrap)"
# buildah, podman and debootstrap: Debian's packages, installed here when missing (as scripts/setup.sh does
# for ShellCheck, and the Slurm tests' cluster.sh for Slurm)
missing=()
for tool in buildah podman debootstrap; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
  command -v apt-get >/dev/null || die "${missing[*]} not found, and no apt-get to install them"
  say "installing ${missing[*]} (apt-get)"
  start=$SECONDS
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    buildah podman debootstrap; } >/dev/null || die "apt-get install buildah podman debootstrap failed"
  say "installed in $((SECONDS - start)) s"
fi
PYTHON=$(command -v python3 || command -v python) || die "no python3 to read this machine's pip configuration"

# --- 1. the Debian base ----------------------------------------------------------------------------------------
make_base() {
  local rootfs start
  rootfs=$(mktemp -d /var/tmp/fcp-rootfs.XXXXXX)
  start=$SECONDS
  say "making the base $BASE: debootstrap --variant=minbase $SUITE (+ $BASE_PACKAGES)"
  # shellcheck disable=SC2086 # an optional mirror argument
  if ! debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$rootfs" ${FCP_DEBIAN_MIRROR:-} \
    >"$rootfs.log" 2>&1; then
    tail -n 20 "$rootfs.log" >&2
    rm -rf "$rootfs" "$rootfs.log"
    die "debootstrap failed"
  fi
  # Not this machine's: its DNS settings and host name (buildah supplies its own when it runs something), apt's
  # downloaded packages and lists.
  rm -f "$rootfs/etc/resolv.conf" "$rootfs/etc/hostname"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman import -q - "$BASE" >/dev/null
  rm -rf "$rootfs" "$rootfs.log"
  say "base $BASE made in $((SECONDS - start)) s"
}
if buildah inspect --type image "$BASE" >/dev/null 2>&1; then
  say "base $BASE exists (delete it with 'buildah rmi $BASE' to make it again)"
else
  make_base
fi

# --- 2. this machine's pip configuration, mounted read-only into the build ------------------------------------
# Lines of `pip config debug`: "  /etc/pip.conf, exists: True" names a file, "    global.cert: /x.pem" a value.
host_pip_paths() {
  "$PYTHON" -m pip config debug 2>/dev/null | "$PYTHON" -c '
import os, re, sys
keys = {"cert", "client-cert", "constraint", "requirement"}
seen = []
for line in sys.stdin:
    m = re.match(r"\s+(/\S.*), exists: True$", line)
    values = [m.group(1)] if m else []
    m = re.match(r"\s+[\w-]+\.([\w-]+):\s*(.*)$", line)
    if m and m.group(1) in keys:
        values = m.group(2).split()
    for v in values:
        v = os.path.normpath(v) if v.startswith("/") else ""
        if v and os.path.isfile(v) and v not in seen:
            seen.append(v)
print("\n".join(seen))'
}
mounts=()
mounted=()
while IFS= read -r path; do
  [[ -n $path ]] || continue
  mounts+=(-v "$path:$path:ro")
  mounted+=("$path")
done < <(host_pip_paths)
# $PIP_CERT: mounted, and passed as the build argument PIP_CERT unless the configuration already names that same
# certificate (a build argument's value is kept in the image's history: only the path, but none is better).
cert_args=()
if [[ -n ${PIP_CERT:-} && -f $PIP_CERT ]]; then
  if [[ " ${mounted[*]} " != *" $PIP_CERT "* ]]; then
    mounts+=(-v "$PIP_CERT:$PIP_CERT:ro")
    mounted+=("$PIP_CERT")
  fi
  if ! "$PYTHON" -m pip config list 2>/dev/null | grep -v '^:env:' | grep -qF ".cert='$PIP_CERT'"; then
    cert_args=(--build-arg "PIP_CERT=$PIP_CERT")
  fi
fi
say "mounted read-only into the build (this machine's pip configuration): ${mounted[*]:-nothing}" \
  "(build argument PIP_CERT: ${cert_args[*]:+passed}${cert_args[*]:-not needed})"

# --- build ------------------------------------------------------------------------------------------------------
say "building $IMAGE (docker/Dockerfile, STACK=cpu, BASE_IMAGE=$BASE)"
start=$SECONDS
buildah bud --isolation chroot --format docker -f docker/Dockerfile \
  --build-arg BASE_IMAGE="$BASE" --build-arg STACK=cpu "${mounts[@]}" "${cert_args[@]}" -t "$IMAGE" .
build_s=$((SECONDS - start))

# buildah leaves an empty file (and its folders) where a -v mount had nothing to cover: remove those that the
# base does not have, in one more layer (whiteouts only), so that no pip configuration file, even empty, is there.
tidy_mount_points() {
  local work root base_work base_root path dir removed=()
  work=$(buildah from -q "$IMAGE")
  root=$(buildah mount "$work")
  base_work=$(buildah from -q "$BASE")
  base_root=$(buildah mount "$base_work")
  for path in "${mounted[@]}"; do
    if [[ -f $root$path && ! -s $root$path && ! -e $base_root$path ]]; then
      rm -f "$root$path"
      removed+=("$path")
      dir=$(dirname "$path")
      while [[ $dir != / && ! -e $base_root$dir ]] && rmdir "$root$dir" 2>/dev/null; do
        dir=$(dirname "$dir")
      done
    fi
  done
  if ((${#removed[@]})); then
    buildah config --created-by "build_image.sh: remove the empty mount points of the build's -v volumes" "$work"
    buildah commit -q --format docker "$work" "$IMAGE" >/dev/null
    say "removed the empty mount points buildah left: ${removed[*]}"
  fi
  buildah umount "$base_work" "$work" >/dev/null
  buildah rm "$base_work" "$work" >/dev/null
}
tidy_mount_points
build_s=$((SECONDS - start))
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
say "image $IMAGE built in ${build_s} s; size $(numfmt --to=iec-i --suffix=B "$size") ($size bytes)"

ctr=$(buildah from -q "$IMAGE")
cleanup() {
  buildah umount "$ctr" >/dev/null 2>&1 || true
  buildah rm "$ctr" >/dev/null 2>&1 || true
  if [[ ${FCP_KEEP_IMAGE:-1} == 0 ]]; then buildah rmi "$IMAGE" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

# --- 3. nothing of this machine's pip configuration in the image ----------------------------------------------
# - no file or folder at any mounted path, unless the base already had it with the same content (Debian's own CA
#   bundle sits where this machine's PIP_CERT may);
# - no certificate of a mounted bundle that the base's own bundle lacks, anywhere in the image's text files;
# - no pip.conf / pip.ini anywhere; no mounted path named in the image's configuration or history.
check_no_host_pip() {
  local root base_ctr base_root problems=0 path
  root=$(buildah mount "$ctr")
  base_ctr=$(buildah from -q "$BASE")
  base_root=$(buildah mount "$base_ctr")
  for path in "${mounted[@]}"; do
    if [[ -e $root$path || -L $root$path ]]; then
      if [[ -f $base_root$path && -f $root$path ]] && cmp -s "$base_root$path" "$root$path"; then
        say "no-secrets: $path is the base's own file, unchanged"
      else
        say "no-secrets: FAILED: the image has $path"
        problems=1
      fi
    fi
  done
  local found
  found=$(find "$root" -xdev \( -name pip.conf -o -name pip.ini \) -print 2>/dev/null | sed "s|^$root||")
  if [[ -n $found ]]; then
    say "no-secrets: FAILED: pip configuration files in the image: $found"
    problems=1
  fi
  local meta
  meta=$(buildah inspect --type image "$IMAGE")
  for path in "${mounted[@]}"; do
    if grep -qF -- "$path" <<<"$meta"; then
      if [[ " ${cert_args[*]} " == *" PIP_CERT=$path "* ]]; then
        say "no-secrets: note: the image's history names $path (the PIP_CERT build argument: a path, no content)"
      else
        say "no-secrets: FAILED: the image's configuration or history names $path"
        problems=1
      fi
    fi
  done
  # This machine's own certificates in the mounted bundles (those that neither this machine's ca-certificates
  # package nor the base's bundle holds: a local CA): none may appear in the image's text files. Matched on a
  # 64-character piece of each one's base64 text.
  local markers
  markers=$("$PYTHON" - "$base_root" "${mounted[@]}" <<'EOF'
import glob, os, re, sys
pem = re.compile(r"-----BEGIN CERTIFICATE-----\s*\n(.*?)-----END CERTIFICATE-----", re.S)
def certs(path):
    try:
        with open(path, errors="replace") as f:
            return {re.sub(r"\s", "", c) for c in pem.findall(f.read())}
    except OSError:
        return set()
public = certs(os.path.join(sys.argv[1], "etc/ssl/certs/ca-certificates.crt"))
for path in glob.glob("/usr/share/ca-certificates/**/*.crt", recursive=True):
    public |= certs(path)
own = set()
for path in sys.argv[2:]:
    if os.path.isfile(path) and os.path.getsize(path) < 1 << 24:
        own |= certs(path) - public
for cert in sorted(own):
    print(cert[len(cert) // 2:len(cert) // 2 + 64])
EOF
)
  local n
  n=$(grep -c . <<<"$markers" || true)
  if [[ $n -gt 0 ]]; then
    if grep -rIlF -f <(printf '%s\n' "$markers") "$root" 2>/dev/null | sed "s|^$root||" | head -5 | grep .; then
      say "no-secrets: FAILED: the image holds one of this machine's $n own certificate(s) (files above)"
      problems=1
    fi
  fi
  buildah umount "$base_ctr" >/dev/null
  buildah rm "$base_ctr" >/dev/null
  buildah umount "$ctr" >/dev/null
  ((problems == 0)) || return 1
  say "no-secrets: ok: none of the ${#mounted[@]} mounted path(s) in the image (or the base's own, unchanged);" \
    "no pip.conf/pip.ini; none named in its configuration or history; none of this machine's $n own" \
    "certificate(s) in its text files"
}
check_no_host_pip || die "the image holds some of this machine's pip configuration"

# --- 4. smoke -----------------------------------------------------------------------------------------------------
say "running docker/smoke.sh in $IMAGE (buildah run --isolation chroot)"
start=$SECONDS
buildah run --isolation chroot "$ctr" -- bash docker/smoke.sh
say "smoke passed in $((SECONDS - start)) s; image built in ${build_s} s, size $(numfmt --to=iec-i --suffix=B "$size")"
