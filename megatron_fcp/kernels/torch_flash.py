"""``torch-flash``: PyTorch's built-in FlashAttention-2 varlen kernels (no extra package).

Wraps ``torch.ops.aten._flash_attention_forward`` / ``_flash_attention_backward`` on packed ``[tokens, heads,
head_dim]`` tensors with cumulative lengths. Written against these torch 2.14 schemas (only the positional
arguments and ``scale`` are used)::

    _flash_attention_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                             return_debug_mask, *, scale=None, ...) -> (output, softmax_logsumexp, rng_state,
                                                                        unused, debug_attn_mask)
    _flash_attention_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,
                              dropout_p, is_causal, rng_state, unused, *, scale=None, ...) -> (dq, dk, dv)

With cumulative lengths (3-D inputs) the log-sum-exp is ``[heads, total_q]`` float32 (natural log of the scaled
scores); this backend transposes it to and from the ``[tokens, heads]`` layout of :mod:`.base`. The kernel
handles grouped-query attention itself (fewer key/value heads) and returns ``dk``/``dv`` shaped like ``k``/``v``.
Untested on GPU in this repository unless a test says otherwise (see tests/unit/test_gpu_backends.py).
"""

from __future__ import annotations

import torch

from megatron_fcp.kernels.base import Backend, BackendUnavailable, VarlenCall, register_backend


def check_gpu_inputs(q: torch.Tensor, k: torch.Tensor, name: str) -> None:
    """Raise :class:`BackendUnavailable` unless the GPU kernels (FA2, cuDNN) can take ``q``/``k``."""
    if q.device.type != "cuda":
        raise BackendUnavailable(f"backend {name!r} needs CUDA tensors, got {q.device}: use 'cpu' or 'reference'")
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype:
        raise BackendUnavailable(f"backend {name!r} takes float16 or bfloat16 q/k/v of one dtype, got "
                                 f"{q.dtype}/{k.dtype}")
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        raise BackendUnavailable(f"backend {name!r} needs head_dim a multiple of 8 and at most 256, got {q.shape[-1]}")
    if q.shape[1] % k.shape[1]:
        raise BackendUnavailable(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        raise BackendUnavailable(f"backend {name!r} needs an Ampere or newer GPU (sm80+)")


def kernel_max_q(call: VarlenCall) -> int:
    """``max_seqlen_q`` for FA2 varlen kernels: the true maximum, but at least 2.

    It is only an upper bound for the kernel. With ``max_seqlen_q == 1`` and grouped-query heads, FA2 switches to
    a decoding path that reshapes ``q`` and splits the keys, with its own log-sum-exp layout (that path has had
    LSE bugs); 2 keeps every call on the plain varlen path.
    """
    return max(call.max_q, 2)


@register_backend
class TorchFlashBackend(Backend):
    name = "torch-flash"

    def check(self, q: torch.Tensor, k: torch.Tensor) -> None:
        check_gpu_inputs(q, k, self.name)
        if not torch.backends.cuda.is_flash_attention_available():
            raise BackendUnavailable("this PyTorch build has no FlashAttention kernels: use 'flash-attn' or 'te'")

    def forward(self, q, k, v, call, scale):
        out, lse, *_ = torch.ops.aten._flash_attention_forward(
            q.contiguous(), k.contiguous(), v.contiguous(), call.cu_q, call.cu_k, kernel_max_q(call), call.max_k,
            0.0, call.causal, False, scale=scale)
        return out, lse.t().contiguous()  # [heads, tokens] -> [tokens, heads]

    def backward(self, dout, q, k, v, out, lse, call, scale):
        rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)  # unused without dropout
        unused = torch.empty(0, device=q.device)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.to(q.dtype).contiguous(), q.contiguous(), k.contiguous(), v.contiguous(),
            out.to(q.dtype).contiguous(), lse.to(torch.float32).t().contiguous(), call.cu_q, call.cu_k,
            kernel_max_q(call), call.max_k, 0.0, call.causal, rng_state, unused, scale=scale)
        return dq, dk, dv
