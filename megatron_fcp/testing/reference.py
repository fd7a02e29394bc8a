"""Dense single-process attention over a whole packed batch: the reference every distributed path is tested
against (run it in float64)."""

from __future__ import annotations

import math

import numpy as np
import torch

from megatron_fcp.kernels.base import resolve_softmax_scale


def document_mask(doc_lens, mask: str, device=None) -> torch.Tensor:
    """``[total, total]`` bool: query i may see key j (same document; causal: j's position <= i's)."""
    lens = np.asarray(doc_lens, dtype=np.int64)
    doc = torch.from_numpy(np.repeat(np.arange(lens.shape[0]), lens)).to(device)
    pos = torch.from_numpy(np.concatenate([np.arange(n) for n in lens]) if lens.size else np.zeros(0, np.int64))
    pos = pos.to(device)
    allow = doc[:, None] == doc[None, :]
    if mask == "causal":
        allow &= pos[None, :] <= pos[:, None]
    return allow


def dense_attention(doc_lens, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: str,
                    softmax_scale: float | None = None) -> torch.Tensor:
    """Attention of packed ``[total, heads, dim]`` tensors with document masking, explicit softmax, autograd-able.

    Each document attends only to itself, so documents are computed one at a time (same result as one
    block-diagonal mask, without its ``total**2`` memory). Computes in the inputs' dtype, so a bfloat16 call is
    the "plain bf16 PyTorch implementation" accuracy is compared with. Grouped-query attention repeats key/value
    heads.
    """
    scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    outs, start = [], 0
    for n in np.asarray(doc_lens, dtype=np.int64).tolist():
        if n == 0:
            continue
        sl = slice(start, start + n)
        scores = torch.einsum("qhd,khd->hqk", q[sl], k[sl]) * scale
        if mask == "causal":
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), -math.inf)
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v[sl]))
        start += n
    return torch.cat(outs) if outs else q.new_zeros(q.shape)
