"""CPU backends: PyTorch's CPU flash kernel (``cpu``) and a plain math implementation (``reference``).

``cpu`` calls ``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward once per segment. The
kernel is deterministic, returns the log-sum-exp and accepts float16, bfloat16, float32 and float64. 16-bit
inputs are computed in float32 (as GPU flash kernels accumulate in float32; on CPU it is also several times
faster) and their outputs and gradients are returned in float32, so nothing is rounded before the merge. It
reports ``lse = 0`` rather than ``-inf`` for a row that sees no key; the varlen contract (every segment has a
key, a causal row sees itself) means no such row is ever asked for. Grouped-query attention expands the key
and value heads for the kernel and sums their gradients back.

``reference`` computes scores, softmax and gradients explicitly in the input dtype (use float64 for a
reference); it is slow and meant for tests.
"""

from __future__ import annotations

import math

import torch

from megatron_fcp.kernels.base import Backend, BackendUnavailable, VarlenCall, lse_dtype, register_backend


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _reduce_kv(dx: torch.Tensor, groups: int) -> torch.Tensor:
    return dx if groups == 1 else dx.unflatten(1, (-1, groups)).sum(2)


def _segments(call: VarlenCall):
    """``(q_start, q_end, k_start, k_end)`` per segment."""
    qs = ks = 0
    for nq, nk in zip(call.q_lens, call.k_lens, strict=True):
        yield qs, qs + nq, ks, ks + nk
        qs, ks = qs + nq, ks + nk


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


@register_backend
class CpuFlashBackend(Backend):
    name = "cpu"

    def check(self, q: torch.Tensor, k: torch.Tensor) -> None:
        if q.device.type != "cpu":
            raise BackendUnavailable(f"backend 'cpu' runs on CPU tensors, got {q.device}: use 'torch-flash'")

    @staticmethod
    def _bhsd(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1).unsqueeze(0)

    def forward(self, q, k, v, call, scale):
        groups = q.shape[1] // k.shape[1]
        q, k, v = _wide(q), _wide(k), _wide(v)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:2], dtype=lse_dtype(q.dtype))
        for qs, qe, ks, ke in _segments(call):
            o, row_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                self._bhsd(q[qs:qe]), self._bhsd(_expand_kv(k[ks:ke], groups)),
                self._bhsd(_expand_kv(v[ks:ke], groups)), 0.0, call.causal, scale=scale)
            out[qs:qe] = o[0].transpose(0, 1)
            lse[qs:qe] = row_lse[0].transpose(0, 1)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, call, scale):
        groups = q.shape[1] // k.shape[1]
        dout, q, k, v, out = _wide(dout), _wide(q), _wide(k), _wide(v), _wide(out)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for qs, qe, ks, ke in _segments(call):
            g = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                self._bhsd(dout[qs:qe]), self._bhsd(q[qs:qe]), self._bhsd(_expand_kv(k[ks:ke], groups)),
                self._bhsd(_expand_kv(v[ks:ke], groups)), self._bhsd(out[qs:qe]),
                lse[qs:qe].T.unsqueeze(0).contiguous(),
                0.0, call.causal, scale=scale)
            dq[qs:qe] = g[0][0].transpose(0, 1)
            dk[ks:ke] = _reduce_kv(g[1][0].transpose(0, 1), groups)
            dv[ks:ke] = _reduce_kv(g[2][0].transpose(0, 1), groups)
        return dq, dk, dv


@register_backend
class ReferenceBackend(Backend):
    name = "reference"

    @staticmethod
    def _scores(q, k, causal, scale):
        s = torch.einsum("qhd,khd->hqk", q, k) * scale
        if causal:
            n = q.shape[0]
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), -math.inf)
        return s

    def forward(self, q, k, v, call, scale):
        groups = q.shape[1] // k.shape[1]
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:2], dtype=lse_dtype(q.dtype), device=q.device)
        for qs, qe, ks, ke in _segments(call):
            s = self._scores(q[qs:qe], _expand_kv(k[ks:ke], groups), call.causal, scale)
            m = torch.logsumexp(s, dim=-1)
            p = torch.exp(s - m[..., None])
            out[qs:qe] = torch.einsum("hqk,khd->qhd", p, _expand_kv(v[ks:ke], groups))
            lse[qs:qe] = m.T
        return out, lse

    def backward(self, dout, q, k, v, out, lse, call, scale):
        groups = q.shape[1] // k.shape[1]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for qs, qe, ks, ke in _segments(call):
            kk, vv = _expand_kv(k[ks:ke], groups), _expand_kv(v[ks:ke], groups)
            s = self._scores(q[qs:qe], kk, call.causal, scale)
            p = torch.exp(s - lse[qs:qe].T[..., None].to(s.dtype))
            do = dout[qs:qe]
            dv[ks:ke] = _reduce_kv(torch.einsum("hqk,qhd->khd", p, do), groups)
            dp = torch.einsum("qhd,khd->hqk", do, vv)
            delta = (do * out[qs:qe]).sum(-1).T[..., None]
            ds = p * (dp - delta) * scale
            dq[qs:qe] = torch.einsum("hqk,khd->qhd", ds, kk)
            dk[ks:ke] = _reduce_kv(torch.einsum("hqk,qhd->khd", ds, q[qs:qe]), groups)
        return dq, dk, dv
