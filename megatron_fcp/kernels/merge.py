"""Exact merge of partial attention results over disjoint key sets, by their log-sum-exps.

If ``(out_a, lse_a)`` is attention of some queries over key set A and ``(out_b, lse_b)`` over a disjoint set B,
attention over A and B is ``lse = log(exp(lse_a) + exp(lse_b))`` and ``out = exp(lse_a - lse) * out_a +
exp(lse_b - lse) * out_b``. A row that saw no key in one part has ``lse = -inf`` there and weight 0; a row that
saw no key at all keeps ``lse = -inf`` and output 0. This is the only place the engine merges.
"""

from __future__ import annotations

import torch


def merge_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                   lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial results. ``out_*``: ``[t, h, d]``; ``lse_*``: ``[t, h]``; returns in ``lse_a``'s dtype.

    Computes in the dtype of ``lse_a`` (float32, or float64 for float64 inputs) whatever the outputs' dtype.
    """
    acc = lse_a.dtype
    lse_a, lse_b = lse_a.to(acc), lse_b.to(acc)
    lse = torch.logaddexp(lse_a, lse_b)
    empty = torch.isneginf(lse)
    safe = torch.where(empty, torch.zeros_like(lse), lse)
    w_a = torch.where(empty, torch.zeros_like(lse), torch.exp(lse_a - safe))
    w_b = torch.where(empty, torch.zeros_like(lse), torch.exp(lse_b - safe))
    out = w_a[..., None] * out_a.to(acc) + w_b[..., None] * out_b.to(acc)
    return out, lse


def merge_into(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor,
               index: torch.Tensor | None) -> None:
    """Merge a partial result for rows ``index`` (the first ``len(part_out)`` rows if None) into the
    accumulators ``out``/``lse`` in place."""
    if index is None:
        n = part_out.shape[0]
        out[:n], lse[:n] = merge_partials(out[:n], lse[:n], part_out, part_lse)
    else:
        merged_out, merged_lse = merge_partials(out[index], lse[index], part_out, part_lse)
        out[index], lse[index] = merged_out, merged_lse
