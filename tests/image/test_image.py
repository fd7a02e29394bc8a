"""The container image built and run: ``scripts/build_image.sh`` makes the Debian base if missing, builds the CPU
variant of docker/Dockerfile with buildah, checks that none of this machine's pip configuration is in the image, and
runs docker/smoke.sh inside it (versions, the adapter, the dataset helpers, the shipped configs, a plan, and 2 CPU
processes training at CP 2 with the losses of the run without CP).

It needs root on Linux, Debian's buildah, podman and debootstrap (the script installs them with apt-get if missing),
the package index, about 10 GB of disk and several minutes, so it runs only where FCP_REQUIRE_IMAGE=1 (set by
.ci/run, where it must pass); elsewhere it skips. The built image is removed afterwards (the base is kept).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
REQUIRED = os.environ.get("FCP_REQUIRE_IMAGE") == "1"


def _why_not() -> str | None:
    if not REQUIRED:
        return "the image build runs where FCP_REQUIRE_IMAGE=1 (.ci/run sets it): root, several minutes, ~10 GB"
    if not sys.platform.startswith("linux"):
        return "buildah with chroot isolation needs Linux"
    if os.geteuid() != 0:
        return "the image build needs root (debootstrap, buildah's chroot isolation)"
    if not all(shutil.which(t) for t in ("buildah", "podman", "debootstrap")) and not shutil.which("apt-get"):
        return "buildah, podman and debootstrap are missing and there is no apt-get to install them"
    return None


def test_cpu_image_builds_and_its_smoke_passes(capsys):
    why = _why_not()
    if why and REQUIRED:
        pytest.fail(f"FCP_REQUIRE_IMAGE=1 but {why}")
    if why:
        pytest.skip(why)
    env = {**os.environ, "FCP_IMAGE": "localhost/megatron-fcp:ci-check", "FCP_KEEP_IMAGE": "0"}
    start = time.monotonic()
    result = subprocess.run(["bash", str(REPO / "scripts" / "build_image.sh")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=2400)
    took = time.monotonic() - start
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"build_image.sh failed after {took:.0f} s:\n{out[-8000:]}"
    built = re.search(r"built in (\d+) s; size (\S+)", out)
    loss = re.search(r"largest loss difference against no CP[^\n]*", out)
    assert built and loss and "smoke: ok" in out and "no-secrets: ok" in out, out[-8000:]
    with capsys.disabled():
        print(f"\nimage: built in {built.group(1)} s, size {built.group(2)}; whole check {took:.0f} s; {loss.group(0)}")
