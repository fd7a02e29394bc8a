"""Rules for single config values: what each accepts, in words, and the problem with a value it refuses.

A rule never names its key; :mod:`megatron_fcp.launch.checks` puts the dotted key in front of the message.
An FCP setting's rule is its own reader (:func:`fcp_setting`: the reader ``FcpConfig`` uses too), so a value the
launcher accepts is one the entry point accepts.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from megatron_fcp.data.lengths import SHIPPED
from megatron_fcp.errors import InputError
from megatron_fcp.megatron.settings import Setting, is_whole, suggest


@dataclass(frozen=True)
class Rule:
    """What one config value may be."""

    want: str
    """What the rule accepts, in words (``a whole number >= 1``), for messages."""
    refuse: Callable[[Any], str | None]
    """The problem with a value, without its key, or None when the value is accepted."""
    placeholder: Any
    """A value the rule accepts; it stands in for a missing or refused value while the other keys are checked."""


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _simple(want: str, accepts: Callable[[Any], bool], placeholder) -> Rule:
    return Rule(want, lambda value: None if accepts(value) else f"must be {want}, got {value!r}", placeholder)


def whole(minimum: int = 1) -> Rule:
    return _simple(f"a whole number >= {minimum}", lambda v: is_whole(v) and v >= minimum, minimum)


def number(minimum: float = 0.0, *, above: bool = False, below: float | None = None) -> Rule:
    """A real number ``>= minimum`` (``> minimum`` with ``above``), and ``< below`` when given."""
    low = f"> {minimum:g}" if above else f">= {minimum:g}"
    want = f"a number {low}" + (f" and < {below:g}" if below is not None else "")

    def accepts(value) -> bool:
        if not _is_number(value) or (value <= minimum if above else value < minimum):
            return False
        return below is None or value < below

    return _simple(want, accepts, minimum + 1.0 if above else minimum)


def text(want: str = "a non-empty string") -> Rule:
    return _simple(want, lambda v: isinstance(v, str) and v.strip() != "", "placeholder")


def flag() -> Rule:
    return _simple("true or false", lambda v: isinstance(v, bool), False)


def choice(options: Sequence[str]) -> Rule:
    want = f"one of {', '.join(options)}"

    def refuse(value) -> str | None:
        if value in options:
            return None
        return f"must be {want}, got {value!r}" + suggest(value, options)

    return Rule(want, refuse, options[0])


def optional(rule: Rule) -> Rule:
    """``rule`` or null (YAML ``null`` or a missing key)."""
    return Rule(f"{rule.want}, or null", lambda v: None if v is None else rule.refuse(v), None)


def text_list(want: str, *, forbid: str = "") -> Rule:
    """A list of non-empty strings without the characters in ``forbid``."""

    def accepts(value) -> bool:
        return isinstance(value, (list, tuple)) and all(
            isinstance(item, str) and item.strip() and not set(forbid) & set(item) for item in value)

    return _simple(want, accepts, ())


def blend() -> Rule:
    """A Megatron ``--data-path`` blend: a non-empty list of [weight, prefix] pairs."""

    def pair_ok(pair) -> bool:
        return (isinstance(pair, (list, tuple)) and len(pair) == 2 and _is_number(pair[0]) and pair[0] > 0
                and isinstance(pair[1], str) and pair[1].strip() != "")

    return _simple("a list of [weight, prefix] pairs, e.g. [[0.7, /data/web_text_document], [0.3, "
                   "/data/code_text_document]]", lambda v: isinstance(v, (list, tuple)) and v and all(
                       pair_ok(p) for p in v), ((1.0, "placeholder"),))


def split() -> Rule:
    return _simple("train,valid,test weights such as '969,30,1'",
                   lambda v: isinstance(v, str) and re.fullmatch(r"\d+(\.\d+)?(,\d+(\.\d+)?){2}", v) is not None,
                   "969,30,1")


def doclens() -> Rule:
    """A shipped length distribution or a file path (on the nodes; not looked for here)."""
    want = f"a shipped distribution ({', '.join(SHIPPED)}) or the path of a lengths file"

    def refuse(value) -> str | None:
        if not isinstance(value, str) or not value.strip():
            return f"must be {want}, got {value!r}"
        if value in SHIPPED or "/" in value or "." in value:
            return None
        return f"{value!r} is neither a shipped distribution ({', '.join(SHIPPED)}) nor a file path" + suggest(
            value, list(SHIPPED))

    return Rule(want, refuse, next(iter(SHIPPED)))


def fcp_setting(described: Setting, key: str) -> Rule:
    """An FCP setting under the launch config key ``key``: the values its reader accepts (the reader's own message
    if not)."""

    def refuse(value) -> str | None:
        try:
            described.read(value, key)
        except InputError as err:
            return str(err).removeprefix(f"{key} ")
        return None

    want = described.want or f"one of {', '.join(described.choices or ())}"
    return Rule(want, refuse, described.key_default)
