"""Inputs for the attention tests and scripts/attention_accuracy.py: batches, per-rank tensors, float64 references,
error measures."""

from __future__ import annotations

import numpy as np
import torch

from megatron_fcp.data.lengths import load_distribution, pack_batches
from megatron_fcp.planner.api import make_plan
from megatron_fcp.planner.checks import assert_plan_ok
from megatron_fcp.planner.plan import Plan, derive_kv
from megatron_fcp.testing.layout import split_to_ranks
from megatron_fcp.testing.reference import dense_attention


def batch(name: str, cp: int, tokens_per_rank: int) -> list[int]:
    """One micro-batch of exactly ``cp * tokens_per_rank`` tokens: a shipped distribution or an adversarial case."""
    total = cp * tokens_per_rank
    if name == "tiny_rank":  # see tiny_rank_plan
        return name
    if name == "spanning":  # one document over every rank
        return [total]
    if name == "ones":  # documents of length 1 (and 0) around a medium one
        return [1, 0, 1] * (tokens_per_rank // 2) + [total - 2 * (tokens_per_rank // 2)]
    candidates = pack_batches(load_distribution(name), total, 20, seed=3)  # the one with most documents
    return max(candidates, key=np.count_nonzero).tolist()


def tiny_rank_plan(cp: int, tokens_per_rank: int, mask: str) -> Plan:
    """A hand-made plan: rank 0 owns only documents of 1 or 2 tokens, the other ranks share one long document."""
    tiny = [1, 2] * (tokens_per_rank // 3) + [1] * (tokens_per_rank % 3)
    long_doc = (cp - 1) * tokens_per_rank
    lens = np.array([*tiny, long_doc])
    q = [(0, d, 0, n) for d, n in enumerate(tiny)]
    q += [(r, len(tiny), (r - 1) * tokens_per_rank, r * tokens_per_rank) for r in range(1, cp)]
    q = np.array(q, dtype=np.int64)
    plan = Plan(strategy="manual", cp=cp, mask=mask, doc_lens=lens, q_rows=q, kv=derive_kv(q, lens, cp, mask),
                num_pad_tokens=np.zeros(cp, np.int64), exchange="p2p", notes=())
    assert_plan_ok(plan)
    return plan


class Case:
    """A plan with random float64 inputs, its dense float64 reference and gradients, and per-rank inputs."""

    def __init__(self, lens, cp: int, tokens_per_rank: int, mask: str, strategy: str = "fcp", heads=(4, 2),
                 head_dim: int = 16, seed: int = 0, scale: float = 0.3, plan: Plan | None = None):
        if lens == "tiny_rank":
            plan = tiny_rank_plan(cp, tokens_per_rank, mask)
        self.plan = plan or make_plan(np.asarray(lens), cp, tokens_per_rank, mask, strategy)
        self.lens, self.mask, self.scale = self.plan.doc_lens.tolist(), mask, scale
        lens = self.lens
        gen = torch.Generator().manual_seed(seed)
        total = sum(lens)
        self.q = torch.randn(total, heads[0], head_dim, generator=gen, dtype=torch.float64)
        self.k = torch.randn(total, heads[1], head_dim, generator=gen, dtype=torch.float64)
        self.v = torch.randn(total, heads[1], head_dim, generator=gen, dtype=torch.float64)
        self.dout = torch.randn(total, heads[0], head_dim, generator=gen, dtype=torch.float64)
        self.ref = self._dense(torch.float64)

    def _dense(self, dtype):
        q, k, v = (x.detach().to(dtype, copy=True).requires_grad_() for x in (self.q, self.k, self.v))
        out = dense_attention(self.lens, q, k, v, self.mask, self.scale)
        out.backward(self.dout.to(dtype))
        return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}

    def plain(self, dtype) -> dict[str, float]:
        """Errors of the dense implementation run in ``dtype`` (the bar for that dtype)."""
        got = self._dense(dtype)
        return {name: rel_err(got[name], self.ref[name]) for name in got}

    def inputs(self, dtype) -> tuple[list[torch.Tensor], ...]:
        """Per-rank q, k, v, dout in plan order, in ``dtype``."""
        return tuple([t.to(dtype).contiguous() for t in split_to_ranks(self.plan, x)]
                     for x in (self.q, self.k, self.v, self.dout))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (normwise relative error)."""
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-300))
