"""Whether a run can write where it is told to, asked before any work is done."""

from __future__ import annotations

import tempfile
from pathlib import Path


def folder_write_problem(folder: str | Path, make: bool = True) -> OSError | None:
    """Why no file can be written in ``folder`` (made first if ``make``), or None: tried by creating an unnamed
    scratch file there, which leaves nothing behind (a permission check alone says yes to root)."""
    try:
        if make:
            Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        return err
    return None
