"""Reference attention with explicit scores: the one every kernel and distributed path is tested against (run it
in float64), and the masks that say which keys a query sees (documents of a packed batch, segments of a varlen
kernel call)."""

from __future__ import annotations

import math

import numpy as np
import torch

from megatron_fcp.kernels.base import VarlenCall, resolve_softmax_scale


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allow: torch.Tensor,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [n, q_heads, dim]`` over ``k, v [m, kv_heads, dim]`` where ``allow [n, m]`` (bool) is
    True; returns the output ``[n, q_heads, dim]`` and the natural-log log-sum-exp ``[n, q_heads]``.

    Scores, softmax and log-sum-exp are explicit and computed in the inputs' dtype, autograd-able. A query that
    sees no key gets output 0 and log-sum-exp ``-inf``. Grouped-query attention repeats key/value heads
    (``q`` heads ``[g * j, g * (j + 1))`` use key/value head ``j``).
    """
    groups = q.shape[1] // k.shape[1]
    if groups != 1:
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (torch.einsum("qhd,khd->hqk", q, k) * scale).masked_fill(~allow, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.where(torch.isneginf(lse)[..., None], 0.0, torch.softmax(scores, dim=-1))
    return torch.einsum("hqk,khd->qhd", probs, v), lse.T


def _block_mask(q_lens, k_lens, causal: bool, device=None) -> torch.Tensor:
    """``[sum(q_lens), sum(k_lens)]`` bool: segment ``i`` of the queries sees segment ``i`` of the keys (causal:
    key position in the segment <= query position; the segments' lengths are then equal)."""

    def segments_and_positions(lens):
        lens = np.asarray(lens, dtype=np.int64)
        starts = np.cumsum(lens) - lens
        seg = np.repeat(np.arange(lens.shape[0]), lens)
        pos = np.arange(int(lens.sum())) - np.repeat(starts, lens)
        return torch.from_numpy(seg).to(device), torch.from_numpy(pos).to(device)

    (q_seg, q_pos), (k_seg, k_pos) = segments_and_positions(q_lens), segments_and_positions(k_lens)
    allow = q_seg[:, None] == k_seg[None, :]
    if causal:
        allow &= k_pos[None, :] <= q_pos[:, None]
    return allow


def document_mask(doc_lens, mask: str, device=None) -> torch.Tensor:
    """``[total, total]`` bool: query i may see key j (same document; causal: j's position <= i's)."""
    return _block_mask(doc_lens, doc_lens, mask == "causal", device)


def varlen_mask(call: VarlenCall, device=None) -> torch.Tensor:
    """``[call.num_q, call.num_k]`` bool: the pairs a varlen kernel call computes (diagonal causal blocks or full
    blocks, see :class:`~megatron_fcp.kernels.base.VarlenCall`); on the call's device unless ``device`` is
    given."""
    return _block_mask(call.q_lens, call.k_lens, call.causal, call.cu_q.device if device is None else device)


def dense_attention(doc_lens, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: str,
                    softmax_scale: float | None = None) -> torch.Tensor:
    """Attention of packed ``[total, heads, dim]`` tensors with document masking, explicit softmax, autograd-able.

    Each document attends only to itself, so documents are computed one at a time with
    :func:`reference_attention` (same result as one block-diagonal mask, without its ``total**2`` memory).
    Computes in the inputs' dtype, so a bfloat16 call is the "plain bf16 PyTorch implementation" accuracy is
    compared with. Grouped-query attention repeats key/value heads.
    """
    scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    outs, start = [], 0
    for n in np.asarray(doc_lens, dtype=np.int64).tolist():
        if n == 0:
            continue
        sl = slice(start, start + n)
        outs.append(reference_attention(q[sl], k[sl], v[sl], document_mask([n], mask, q.device), scale)[0])
        start += n
    return torch.cat(outs) if outs else q.new_zeros(q.shape)
