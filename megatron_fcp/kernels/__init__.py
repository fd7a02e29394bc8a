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

from megatron_fcp.kernels import cpu, flash_attn, te, torch_flash  # noqa: F401  (each registers its backends)
from megatron_fcp.kernels.base import (
    REGISTRY,
    Backend,
    BackendUnavailable,
    VarlenCall,
    lse_dtype,
    register_backend,
    resolve_softmax_scale,
)

BACKENDS = ("auto", *sorted(REGISTRY))

__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "VarlenCall", "get_backend", "lse_dtype", "register_backend",
           "resolve_softmax_scale"]

_instances: dict[str, Backend] = {}


def get_backend(name: str | Backend, device: torch.device | str = "cpu") -> Backend:
    """The backend called ``name`` (an instance is returned as is); ``auto`` chooses by device.

    Raises ``ValueError`` for a name that is not registered and :class:`BackendUnavailable` (saying why) for one
    that cannot load here.
    """
    if isinstance(name, Backend):
        return name
    if name == "auto":
        name = "torch-flash" if torch.device(device).type == "cuda" else "cpu"
    if name not in REGISTRY:
        raise ValueError(f"unknown attention backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name not in _instances:
        _instances[name] = REGISTRY[name]()
    return _instances[name]
