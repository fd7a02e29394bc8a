"""Bounded, strict YAML for run configs: PyYAML's safe loader with a duplicate-key check and size limits.

A run config is a few kilobytes of nested mappings. :func:`load_yaml` refuses, each in one line of an
:class:`InputError` (the caller adds the file's name): a file above :data:`MAX_BYTES` or not UTF-8 text, YAML that
does not parse, a key given twice in one mapping (YAML would keep the last one quietly), nesting deeper than
:data:`MAX_DEPTH`, more than :data:`MAX_ALIASES` aliases (``*name``), a document that expands to more than
:data:`MAX_NODES` values (an alias "bomb" is small on disk and unbounded once read), and numbers that are not
finite (``.nan``, ``.inf``), naming the dotted key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from megatron_fcp.errors import InputError

MAX_BYTES = 1 << 20
"""Largest run config file read (1 MiB; the shipped ones are 2-4 KB)."""
MAX_DEPTH = 32
"""Deepest nesting of mappings and lists (the run config schema needs 4)."""
MAX_ALIASES = 100
"""Most aliases (``*name``) in one file."""
MAX_NODES = 100_000
"""Most values (scalars, mappings, lists; aliases counted at every place they are used) in one document."""

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _LimitError(yaml.YAMLError):
    """A limit of this loader, with the line it was hit on (1-based; 0: no line)."""

    def __init__(self, message: str, line: int = 0):
        super().__init__(message)
        self.message, self.line = message, line


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that reads ``3e-4`` (no dot) as a number, as YAML 1.2 does, refuses duplicate keys and
    bounds depth, aliases and the expanded size (see the module's doc)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise _LimitError(f"more than {MAX_ALIASES} aliases (*name); write the values out", mark.line + 1)
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _LimitError(f"nested deeper than {MAX_DEPTH} levels; a run config needs a few", mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                    seen.setdefault(key, line)
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                if first is not None:
                    raise _LimitError(f"key {key!r} is given twice (lines {first} and {line}); keep one", line)
        return super().construct_mapping(node, deep=deep)

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node)
        if size > MAX_NODES:
            raise _LimitError(f"expands to more than {MAX_NODES} values (aliases counted where used); a run config "
                              "holds a few dozen")
        return self.construct_document(node)


StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                   re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                   list("-+0123456789"))


def _expanded_size(root) -> int:
    """Values under ``root`` counting a shared (aliased) node at every place it is used, without expanding it:
    each node's size is computed once (children before parents, no recursion)."""
    sizes: dict[int, int] = {}
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else
                    list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if done:
            sizes[id(node)] = min(1 + sum(sizes[id(c)] for c in children), MAX_NODES + 1)
        else:
            stack.append((node, True))
            stack += [(c, False) for c in children if id(c) not in sizes]
    return sizes[id(root)]


def non_finite_keys(data, prefix: str = "") -> list[str]:
    """Dotted keys (``[i]`` for list items) of the floats in ``data`` that are NaN or infinite."""
    found = []
    items = (data.items() if isinstance(data, Mapping) else
             ((f"[{i}]", v) for i, v in enumerate(data)) if isinstance(data, list) else ())
    for key, value in items:
        dotted = f"{prefix}{key}" if str(key).startswith("[") else f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, float) and not math.isfinite(value):
            found.append(dotted)
        elif isinstance(value, Mapping | list):
            found += non_finite_keys(value, dotted)
    return found


def load_yaml(data: bytes) -> Any:
    """Parse one YAML document with :class:`StrictLoader`; refuse non-finite numbers. Raises :class:`InputError`
    with one line (no file name) for anything the module's doc lists."""
    if len(data) > MAX_BYTES:
        raise InputError(f"is above {MAX_BYTES} bytes, more than a run config may have; pass a run config YAML "
                         "file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("is not UTF-8 text (a binary file?); pass a run config YAML file") from None
    if "\0" in text:
        raise InputError("holds NUL bytes (a binary file?); pass a run config YAML file")
    try:
        value = yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except _LimitError as err:
        where = f" (line {err.line})" if err.line else ""
        raise InputError(f"refused{where}: {err.message}") from None
    except (ComposerError, ConstructorError, yaml.YAMLError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise InputError(f"not valid YAML{where}: {problem}") from None
    except RecursionError:  # not reached under MAX_DEPTH; kept so no traceback can escape
        raise InputError(f"nested too deep; a run config needs at most {MAX_DEPTH} levels") from None
    bad = non_finite_keys(value)
    if bad:
        raise InputError(f"{', '.join(bad)}: not a finite number (.nan or .inf); write a finite number")
    return value
