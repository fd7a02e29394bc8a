"""``flash-attn``: the varlen kernels of the flash-attn package (FlashAttention-2).

Wraps the low-level functions of ``flash_attn.flash_attn_interface`` that return the log-sum-exp and take it back
in backward. Written against flash-attn 2.6.0-2.8.3 (checked in ``flash_attn/flash_attn_interface.py`` of
each tag); the package is imported when the backend is constructed, never at module import:

- 2.7+: ``_flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
  softmax_scale, causal, window_size_left, window_size_right, softcap, alibi_slopes, return_softmax,
  block_table, ...) -> (out, softmax_lse, S_dmask, rng_state)``; ``_flash_attn_varlen_backward(dout, q, k, v,
  out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
  softmax_scale, causal, window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
  rng_state=None, ...)`` writes ``dq``/``dk``/``dv`` in place and returns ``softmax_d``.
- 2.6.x: the same with one ``window_size=(left, right)`` argument; forward returns ``(out, q, k, v, out_padded,
  softmax_lse, S_dmask, rng_state)`` and backward ``(dq, dk, dv, softmax_d)``.

Since 2.6 the varlen log-sum-exp is ``[heads, total_q]`` float32 (natural log of the scaled scores; before 2.6
it was padded ``[batch, heads, max_seqlen_q]``, which this backend refuses). It is transposed to and from the
``[tokens, heads]`` layout of :mod:`.base`. Grouped-query attention is handled by the kernel.
Untested on GPU in this repository unless a test says otherwise (see tests/unit/test_gpu_backends.py).
"""

from __future__ import annotations

import torch
from packaging.version import Version

from megatron_fcp.kernels.base import Backend, BackendUnavailable, register_backend
from megatron_fcp.kernels.torch_flash import check_gpu_inputs, kernel_max_q

MISSING = "flash-attn is not installed: pip install flash-attn (needs CUDA) or use backend 'torch-flash'"


@register_backend
class FlashAttnBackend(Backend):
    name = "flash-attn"

    def __init__(self) -> None:
        try:
            import flash_attn
            from flash_attn import flash_attn_interface
        except (ImportError, OSError) as exc:
            raise BackendUnavailable(f"{MISSING} ({exc})") from exc
        version = Version(flash_attn.__version__)
        if version < Version("2.6"):
            raise BackendUnavailable(f"flash-attn {flash_attn.__version__} is too old: backend 'flash-attn' needs "
                                     "2.6 or newer (unpadded varlen log-sum-exp)")
        self._fa = flash_attn_interface
        self._new_api = version >= Version("2.7")
        self._window = dict(window_size_left=-1, window_size_right=-1) if self._new_api else dict(window_size=(-1, -1))

    def check(self, q: torch.Tensor, k: torch.Tensor) -> None:
        check_gpu_inputs(q, k, self.name)

    def forward(self, q, k, v, call, scale):
        res = self._fa._flash_attn_varlen_forward(
            q=q.contiguous(), k=k.contiguous(), v=v.contiguous(), cu_seqlens_q=call.cu_q, cu_seqlens_k=call.cu_k,
            max_seqlen_q=kernel_max_q(call), max_seqlen_k=call.max_k, dropout_p=0.0, softmax_scale=scale,
            causal=call.causal, softcap=0.0, alibi_slopes=None, return_softmax=False, block_table=None,
            **self._window)
        out, lse = (res[0], res[1]) if self._new_api else (res[0], res[5])
        return out, lse.t().contiguous()  # [heads, tokens] -> [tokens, heads]

    def backward(self, dout, q, k, v, out, lse, call, scale):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        self._fa._flash_attn_varlen_backward(
            dout=dout.to(q.dtype).contiguous(), q=q.contiguous(), k=k.contiguous(), v=v.contiguous(),
            out=out.to(q.dtype).contiguous(), softmax_lse=lse.to(torch.float32).t().contiguous(), dq=dq, dk=dk,
            dv=dv, cu_seqlens_q=call.cu_q, cu_seqlens_k=call.cu_k, max_seqlen_q=kernel_max_q(call),
            max_seqlen_k=call.max_k, dropout_p=0.0, softmax_scale=scale, causal=call.causal, softcap=0.0,
            alibi_slopes=None, deterministic=False, rng_state=None, **self._window)
        return dq, dk, dv
