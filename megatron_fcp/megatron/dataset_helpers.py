"""megatron-core's compiled dataset helpers, in the form megatron.training's start-up expects.

``megatron.training``'s initialisation runs ``make -C <megatron/core/datasets>`` on rank 0 and exits if ``make``
fails. The megatron-core wheel ships the compiled helpers (``helpers_cpp``) but not that directory's Makefile, so
a pip-installed megatron-core stops there. :func:`install_makefile` writes a Makefile whose default target only
checks that the compiled module is present; it is an installation step, run once per environment::

    python -m megatron_fcp.megatron.dataset_helpers

(``scripts/setup.sh`` and the Docker image run it). :func:`check` is what the entry point runs at start-up, so a
missing step is one clear line instead of Megatron's exit. A megatron-core installed from a Megatron-LM checkout
has its own Makefile and needs nothing.
"""

from __future__ import annotations

import glob
import importlib.util
import sys
from pathlib import Path

from megatron_fcp.errors import InputError

MARKER = "# written by megatron_fcp.megatron.dataset_helpers"
MAKEFILE = f"""{MARKER}: the megatron-core wheel ships helpers_cpp compiled, without
# the Makefile megatron.training runs at start-up; this one only checks that the compiled module is here.
default:
\t@ls helpers_cpp*.so >/dev/null
"""


def datasets_dir() -> Path:
    """The installed ``megatron/core/datasets`` directory (found without importing megatron.core, which is slow)."""
    spec = importlib.util.find_spec("megatron")
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / "core" / "datasets").is_dir():
            return Path(root) / "core" / "datasets"
    raise InputError("megatron-core is not installed: pip install megatron-core==0.19.2 (or megatron-fcp[megatron])")


def _compiled(folder: Path) -> bool:
    return bool(glob.glob(str(folder / "helpers_cpp*.so")))


def check() -> None:
    """Raise :class:`InputError` if megatron.training's start-up build of the dataset helpers would fail here."""
    folder = datasets_dir()
    if (folder / "Makefile").exists():
        return
    if _compiled(folder):
        raise InputError(f"megatron-core's dataset helpers are compiled but {folder} has no Makefile, which "
                         "megatron.training runs at start-up: run `python -m megatron_fcp.megatron.dataset_helpers` "
                         "once in this environment")
    raise InputError(f"megatron-core's dataset helpers are neither compiled nor buildable in {folder}: install "
                     "megatron-core from its wheel (pip install megatron-core==0.19.2) or from a Megatron-LM checkout")


def install_makefile(folder: Path | None = None) -> str:
    """Write the checking Makefile where it is missing; returns what was done, in words."""
    folder = folder or datasets_dir()
    makefile = folder / "Makefile"
    if makefile.exists():
        return f"{makefile} exists; nothing to do"
    if not _compiled(folder):
        raise InputError(f"{folder} holds no compiled helpers_cpp module to check; reinstall megatron-core")
    makefile.write_text(MAKEFILE)
    return f"wrote {makefile}"


if __name__ == "__main__":
    try:
        print(f"megatron-fcp: {install_makefile()}")
    except InputError as err:
        print(f"megatron-fcp: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
