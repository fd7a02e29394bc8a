"""FCP's settings, each declared once: a :class:`Setting` record holds its Megatron flag, its launch-config key, its
default, its help and how a value is read and checked.

:class:`~megatron_fcp.megatron.config.FcpConfig` carries a record on each of its fields (:func:`setting`); the
Megatron flags (``add_fcp_args``), the argument reader (``fcp_config_from_args``), the launch config's
``context_parallel`` keys and the CPU worker's FCP flags are all made from those records. Two settings are no
field of FcpConfig: :data:`MODE` (whether FCP runs at all) and :data:`MOCK_DOCLENS` (data).

A reader (``Setting.read``) takes a value as a user gives it (flag text or a YAML value) and the name the user gave
it under (the flag or the dotted config key); it returns the value as FCP reads it, or raises one
:class:`InputError` line that starts with that name. Nothing here imports megatron or torch.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_fcp.errors import InputError
from megatron_fcp.planner.stages import parse_kv_budget

Reader = Callable[[Any, str], Any]
"""``(value, name) -> value as FCP reads it``; raises :class:`InputError` (one line starting with ``name``)."""
def as_given(value, name: str):
    """The reader of a setting that takes any value."""
    return value


SAME = object()
"""``Setting.config_default`` when the launch config's default is the flag's."""


@dataclass(frozen=True)
class Setting:
    """One FCP setting: everything each interface needs to offer it."""

    default: Any
    """The default, as a user would write it (flag and launch config; FcpConfig reads it like any value)."""
    read: Reader = as_given
    """Checks a value and returns it as FCP reads it (see the module docstring); by default any value as it is."""
    help: str = ""
    """The flag's help."""
    flag: str | None = None
    """Megatron's command-line flag; None: no flag (set in code)."""
    key: str | None = None
    """Key in the launch config's ``context_parallel`` section; None: no key there."""
    want: str = ""
    """What a value may be, in words (launch config messages)."""
    choices: tuple[str, ...] | None = None
    """The values a flag takes, when a fixed list."""
    metavar: str | None = None
    """The flag's placeholder in ``--help``."""
    flag_type: Callable[[str], Any] | None = None
    """argparse ``type`` of the flag (text -> value); None keeps the text, which :attr:`read` takes as it is."""
    old_flag: str | None = None
    """A deprecated name of the flag, still accepted with a warning."""
    worker_flag: str | None = None
    """The CPU worker's flag for it (``python -m megatron_fcp.cpu_trainer.worker``); None: the worker has none."""
    config_default: Any = SAME
    """The launch config's default where it differs from :attr:`default`."""
    resolve: Callable[[Any], Any] | None = None
    """FcpConfig's last step after :attr:`read` (e.g. ``auto`` -> a number); None: the value as read."""

    @property
    def dest(self) -> str:
        """The attribute argparse stores the flag's value in."""
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def key_default(self) -> Any:
        """The launch config's default."""
        return self.default if self.config_default is SAME else self.config_default

    @property
    def switch(self) -> bool:
        """An on/off flag (no value after it)."""
        return isinstance(self.default, bool)


def setting(**record) -> Any:
    """A dataclass field of :class:`~megatron_fcp.megatron.config.FcpConfig` carrying its :class:`Setting`."""
    described = Setting(**record)
    return field(default=described.default, metadata={"setting": described})


def settings_of(cls) -> dict[str, Setting]:
    """The :class:`Setting` of each field of ``cls`` that has one, by field name, in field order."""
    return {f.name: f.metadata["setting"] for f in cls.__dataclass_fields__.values() if "setting" in f.metadata}


# -- readers ------------------------------------------------------------------------------------------------------
def suggest(word, known: Sequence) -> str:
    """`` (did you mean X?)`` for the closest of ``known``, or an empty string."""
    close = difflib.get_close_matches(str(word), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def is_whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_positive_seconds(value) -> bool:
    """Whether ``value`` is a finite number of seconds > 0 (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def choice(options: Sequence[str]) -> Reader:
    def read(value, name: str):
        if value not in options:
            raise InputError(f"{name} must be one of {', '.join(options)}, got {value!r}" + suggest(value, options))
        return value

    return read


def switch(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{name} must be true or false, got {value!r}")
    return value


def whole_at_least_zero(value, name: str) -> int:
    if not is_whole(value) or value < 0:
        raise InputError(f"{name} must be >= 0, got {value!r}")
    return value


def optional_seconds(value, name: str) -> float | None:
    """None (no timed wait) or a finite number of seconds > 0."""
    if value is not None and not is_positive_seconds(value):
        raise InputError(f"{name} must be > 0 seconds and finite, got {value!r} (leave it unset for no timed wait)")
    return value


def kv_budget(value, name: str) -> int | str | None:
    """A number of tokens, ``auto`` or None (``"4096"``, ``"none"`` are read as FCP reads them)."""
    return parse_kv_budget(value, flag=name)


def _whole_number(value) -> int | None:
    """A whole number given as a number or as text, else None."""
    try:
        return int(value) if isinstance(value, str) or is_whole(value) else None
    except ValueError:
        return None


def optional_positive(value, name: str) -> int | None:
    """None (unset; also the text ``none``, as a launcher writes an unset value) or a whole number >= 1, as a number
    or text."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    number = _whole_number(value)
    if number is None or number < 1:
        raise InputError(f"{name} must be a whole number >= 1, or unset, got {value!r}")
    return number


def tile_size(value, name: str) -> int | str:
    """A whole number of tokens >= 1 (as a number or text), or ``auto``."""
    if value is None or value == "auto":
        return "auto"
    size = _whole_number(value)
    if size is None or size < 1:
        raise InputError(f"{name} must be a positive integer or 'auto', got {value!r}")
    return size
