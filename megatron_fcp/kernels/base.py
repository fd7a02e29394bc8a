"""The kernel interface every attention backend implements.

A backend runs *varlen* attention: queries and keys come packed as ``[tokens, heads, head_dim]`` tensors cut
into segments by cumulative lengths, and segment ``i`` of the queries attends to segment ``i`` of the keys only.
The engine only ever asks for two kinds of segment pair, so no backend depends on how a kernel aligns a causal
mask when query and key lengths differ:

- ``causal=True``: a diagonal block, query and key segments of equal length covering the same positions
  (query ``t`` sees keys ``0..t`` of its segment);
- ``causal=False``: every query sees every key of its segment.

Forward returns the output (query dtype, or float32 for 16-bit queries where the kernel computes in
float32) and the natural-log log-sum-exp of each query row over its keys, ``[tokens, heads]`` in float32
(float64 for float64 inputs). Backward takes the output and log-sum-exp of the *whole* attention (after merging
every partial result), so the gradients it returns are the exact contributions of this call; it returns
``dq, dk, dv`` shaped like ``q, k, v`` (any float dtype; the engine accumulates them in float32 or wider).

Grouped-query attention: ``k`` and ``v`` may have fewer heads than ``q``; ``q`` heads ``[g * j, g * (j + 1))``
use key/value head ``j`` with ``g = q_heads // kv_heads``. Every segment holds at least one query and one key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class BackendUnavailable(RuntimeError):
    """A backend cannot be loaded here or cannot serve a case; the message says why."""


def check_segments(q_lens: tuple[int, ...], k_lens: tuple[int, ...], causal: bool) -> None:
    """Raise ValueError unless the segments make a valid call (the contract in the module docstring)."""
    if len(q_lens) != len(k_lens):
        raise ValueError(f"{len(q_lens)} query segments but {len(k_lens)} key segments")
    if any(n < 1 for n in q_lens + k_lens):
        raise ValueError("every segment needs at least one query and one key")
    if causal and q_lens != k_lens:
        raise ValueError("causal segments must have equal query and key lengths (diagonal blocks)")


class SegmentTotals:
    """Totals of a call's segments, for any class with ``q_lens`` and ``k_lens`` tuples."""

    q_lens: tuple[int, ...]
    k_lens: tuple[int, ...]

    @property
    def num_segments(self) -> int:
        return len(self.q_lens)

    @property
    def max_q(self) -> int:
        return max(self.q_lens, default=0)

    @property
    def max_k(self) -> int:
        return max(self.k_lens, default=0)

    @property
    def num_q(self) -> int:
        return sum(self.q_lens)

    @property
    def num_k(self) -> int:
        return sum(self.k_lens)


@dataclass(frozen=True, eq=False)
class VarlenCall(SegmentTotals):
    """Segments of one kernel call. ``cu_q``/``cu_k`` are int32 on the tensors' device."""

    q_lens: tuple[int, ...]
    """Query tokens per segment (host copy)."""
    k_lens: tuple[int, ...]
    """Key tokens per segment (host copy)."""
    cu_q: torch.Tensor
    """``[num_segments + 1]`` int32 cumulative query lengths, starting at 0."""
    cu_k: torch.Tensor
    """``[num_segments + 1]`` int32 cumulative key lengths, starting at 0."""
    causal: bool
    """Diagonal blocks (equal lengths, causal inside) if True, else full blocks."""

    @staticmethod
    def make(q_lens, k_lens, causal: bool, device: torch.device | str = "cpu") -> VarlenCall:
        q_lens, k_lens = tuple(int(n) for n in q_lens), tuple(int(n) for n in k_lens)
        check_segments(q_lens, k_lens, causal)

        def cu(lens):
            return torch.tensor([0, *torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32,
                                device=device)

        return VarlenCall(q_lens=q_lens, k_lens=k_lens, cu_q=cu(q_lens), cu_k=cu(k_lens), causal=causal)


class Backend:
    """Interface of an attention kernel backend (see the module docstring for the contract).

    Subclasses set ``name`` and are added to :data:`REGISTRY` with :func:`register_backend`. Their constructor
    imports any optional package and raises :class:`BackendUnavailable` if it is missing.
    """

    name: str = "base"

    def check(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Raise :class:`BackendUnavailable` naming the reason if this backend cannot serve these tensors."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: VarlenCall,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def backward(self, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, call: VarlenCall, scale: float) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


REGISTRY: dict[str, type[Backend]] = {}
"""Backend classes by name, in registration order."""


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make ``cls`` available to ``get_backend(cls.name)``."""
    if cls.name in REGISTRY:
        raise ValueError(f"attention backend {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls


def resolve_softmax_scale(softmax_scale: float | None, head_dim: int) -> float:
    """The scale of the attention scores: ``softmax_scale`` if given, else ``1 / sqrt(head_dim)``."""
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of log-sum-exp and of accumulation for inputs of ``dtype``: float64 stays float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
