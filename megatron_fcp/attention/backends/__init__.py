"""Attention kernel backends behind one interface (:mod:`.base`), chosen by name.

========== ================================================================ ==========================
name       kernel                                                           needs
========== ================================================================ ==========================
cpu        ``aten::_scaled_dot_product_flash_attention_for_cpu``             CPU tensors
reference  explicit softmax in the input dtype (float64 for references)      any device; slow
torch-flash PyTorch's built-in FlashAttention-2 varlen kernels               CUDA, fp16/bf16
flash-attn ``flash_attn`` varlen kernels                                     the flash-attn package
te         Transformer Engine fused attention (cuDNN), THD layout            transformer-engine
========== ================================================================ ==========================

``auto`` picks ``torch-flash`` for CUDA tensors and ``cpu`` otherwise. Optional packages load only when their
backend is asked for; a backend that cannot serve a case raises :class:`BackendUnavailable` saying why.
"""

from __future__ import annotations

import torch

from megatron_fcp.attention.backends.base import Backend, BackendUnavailable, VarlenCall, lse_dtype

BACKENDS = ("auto", "cpu", "reference", "torch-flash", "flash-attn", "te")

__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "VarlenCall", "get_backend", "lse_dtype"]

_cache: dict[str, Backend] = {}


def get_backend(name: str | Backend, device: torch.device | str = "cpu") -> Backend:
    """The backend called ``name`` (an instance is returned as is); ``auto`` chooses by device."""
    if isinstance(name, Backend):
        return name
    if name == "auto":
        name = "torch-flash" if torch.device(device).type == "cuda" else "cpu"
    if name not in _cache:
        if name == "cpu":
            from megatron_fcp.attention.backends.cpu import CpuFlashBackend as cls
        elif name == "reference":
            from megatron_fcp.attention.backends.cpu import ReferenceBackend as cls
        elif name == "torch-flash":
            from megatron_fcp.attention.backends.torch_flash import TorchFlashBackend as cls
        elif name == "flash-attn":
            from megatron_fcp.attention.backends.flash_attn import FlashAttnBackend as cls
        elif name == "te":
            from megatron_fcp.attention.backends.te import TransformerEngineBackend as cls
        else:
            raise ValueError(f"unknown attention backend {name!r}: choose one of {', '.join(BACKENDS)}")
        _cache[name] = cls()
    return _cache[name]
