"""CPU shims for megatron-core: for the CPU demo and the tests only, never imported by the training path.

megatron-core assumes CUDA in a few places that a tiny model on gloo reaches:

- ``torch.cuda.current_device()`` names the device of new buffers (rotary tables, loss helpers);
- the model-parallel RNG tracker stores and restores CUDA generator states around initialisation and dropout;
- distributed checkpointing synchronizes the CUDA device before writing.

:func:`install_cpu_shims` points both at the CPU. It refuses to run when CUDA is available, so it can never
change a GPU run.
"""

from __future__ import annotations

import torch

_installed = False


def install_cpu_shims() -> None:
    """Make megatron-core's CUDA-only calls work on a CPU-only machine (idempotent)."""
    global _installed
    if _installed:
        return
    if torch.cuda.is_available():
        raise RuntimeError("install_cpu_shims() is for CPU-only machines; this one has CUDA, run without the shims")
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    _installed = True
