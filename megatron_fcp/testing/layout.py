"""Moving packed tensors between the batch's document order and each rank's plan order."""

from __future__ import annotations

import numpy as np
import torch

from megatron_fcp.planner.plan import Plan


def split_to_ranks(plan: Plan, x: torch.Tensor) -> list[torch.Tensor]:
    """Cut a packed ``[total_tokens, ...]`` tensor into per-rank ``[num_tokens, ...]`` tensors (padding zero)."""
    out = []
    for r in range(plan.cp):
        index = torch.from_numpy(plan.token_index(r)).to(x.device)
        local = x.new_zeros((int(plan.num_tokens[r]), *x.shape[1:]))
        local[: index.shape[0]] = x.index_select(0, index)
        out.append(local)
    return out


def join_from_ranks(plan: Plan, parts: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`split_to_ranks`: the packed tensor in document order (padding dropped)."""
    total = int(np.sum(plan.doc_lens))
    out = parts[0].new_zeros((total, *parts[0].shape[1:]))
    for r, part in enumerate(parts):
        index = torch.from_numpy(plan.token_index(r)).to(part.device)
        out[index] = part[: index.shape[0]]
    return out
