"""``te``: Transformer Engine's fused attention (cuDNN "F16_arbitrary_seqlen" backend) on THD tensors.

Wraps ``transformer_engine.pytorch.cpp_extensions.fused_attn.fused_attn_fwd`` / ``fused_attn_bwd``, called with
keyword arguments only (their positional order changed between releases). Written against Transformer Engine
2.17.1; every keyword used here exists from 2.15 to 2.18. Transformer Engine is imported when the backend is
constructed, never at module import. Calls use ``qkv_layout="thd_thd_thd"``, ``o_format``/``do_format="thd"``,
``attn_mask_type="padding_causal"`` (top-left diagonal, exact for the equal-length causal blocks of
:mod:`.base`) or ``"padding"``, and ``cu_seqlens_*_padded`` equal to the real cumulative lengths (no gaps).

``fused_attn_fwd(is_training=True, ...)`` returns ``(out, [stats, rng_state])``. ``stats`` is the natural-log
log-sum-exp of the scaled scores in float32 (Transformer Engine's own context parallelism merges it with
flash-attn's LSE), laid out as ``[total_q, heads, 1]`` when the cuDNN runtime is 9.6 or newer and the GPU is
not sm120, and as padded ``[batch, heads, max_seqlen_q, 1]`` otherwise (the rule of TE's ``context_parallel.py``
and ``fused_attn_f16_arbitrary_seqlen.cu``). Both layouts are converted to and from ``[tokens, heads]``.
``fused_attn_bwd`` takes ``aux_ctx_tensors=[stats, rng_state]`` and returns ``dq, dk, dv, ...``.

Where it runs: Transformer Engine 2.17.1 enables THD fused attention only on sm90 or newer GPUs, and with cuDNN 9.6
or newer when query and key/value head counts differ (``nvte_get_fused_attn_backend``); elsewhere
``fused_attn_fwd`` fails with an NVTE_ERROR. :meth:`TransformerEngineBackend.check` refuses those cases first,
with :func:`te_thd_problem`'s one line.
Untested on GPU in this repository unless a test says otherwise (see tests/unit/test_gpu_backends.py).
"""

from __future__ import annotations

import torch
from packaging.version import Version

from megatron_fcp.kernels.base import Backend, BackendUnavailable, VarlenCall, register_backend
from megatron_fcp.kernels.torch_flash import check_gpu_inputs

MISSING = ("Transformer Engine is not usable here: pip install transformer-engine[pytorch] (needs CUDA) or use "
           "backend 'torch-flash'")
MIN_CAPABILITY = (9, 0)
"""The oldest GPU (compute capability) on which Transformer Engine runs THD fused attention (Hopper, sm90)."""
MIN_GQA_CUDNN = (9, 6, 0)
"""The oldest cuDNN with which Transformer Engine runs THD fused attention when query and key/value head counts
differ (grouped-query attention)."""
INSTEAD = "use backend 'torch-flash' or 'flash-attn' instead (--fcp-attention-backend torch-flash)"


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


def _sm(capability: tuple[int, int]) -> str:
    """``sm90`` for compute capability ``(9, 0)``."""
    return f"sm{capability[0]}{capability[1]}"


def te_thd_problem(capability: tuple[int, int], cudnn_version: tuple[int, ...], q_heads: int,
                   kv_heads: int) -> str | None:
    """Why Transformer Engine cannot run THD fused attention on this GPU and cuDNN for these head counts (one
    line, with what to use instead), or None when it can.

    ``capability`` is the GPU's compute capability ``(major, minor)``; ``cudnn_version`` the cuDNN runtime's
    ``(major, minor, patch)``, as Transformer Engine reports it.
    """
    if tuple(capability) < MIN_CAPABILITY:
        return (f"backend 'te': Transformer Engine runs THD fused attention only on {_sm(MIN_CAPABILITY)} (Hopper) "
                f"or newer GPUs, this GPU has compute capability {_dotted(tuple(capability))} "
                f"({_sm(capability)}); {INSTEAD}")
    if q_heads != kv_heads and tuple(cudnn_version) < MIN_GQA_CUDNN:
        return (f"backend 'te': grouped-query THD fused attention ({q_heads} query heads, {kv_heads} key/value "
                f"heads) needs cuDNN {_dotted(MIN_GQA_CUDNN)} or newer, found {_dotted(tuple(cudnn_version))}; "
                f"upgrade cuDNN or {INSTEAD}")
    return None


@register_backend
class TransformerEngineBackend(Backend):
    name = "te"

    def __init__(self) -> None:
        try:
            import transformer_engine
            from transformer_engine.pytorch import utils
            from transformer_engine.pytorch.cpp_extensions import fused_attn
        except (ImportError, OSError, RuntimeError) as exc:
            raise BackendUnavailable(f"{MISSING} ({exc})") from exc
        if Version(transformer_engine.__version__) < Version("2.15"):
            raise BackendUnavailable(f"Transformer Engine {transformer_engine.__version__} is too old: backend 'te' "
                                     "needs 2.15 or newer (fused_attn_fwd/bwd keywords o_format, do_format)")
        self._fa, self._utils = fused_attn, utils
        self._problems: dict[tuple, str | None] = {}  # te_thd_problem by (device, q heads, kv heads)

    def _packed_stats(self) -> bool:
        """True if stats come as ``[total_q, heads, 1]``, False if padded ``[batch, heads, max_q, 1]``."""
        return self._utils.get_cudnn_version() >= (9, 6, 0) and self._utils.get_device_compute_capability() != (12, 0)

    def check(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """The GPU input checks of every GPU backend, then :func:`te_thd_problem` for this GPU and cuDNN."""
        check_gpu_inputs(q, k, self.name)
        key = (q.device, q.shape[1], k.shape[1])
        if key not in self._problems:
            self._problems[key] = te_thd_problem(torch.cuda.get_device_capability(q.device),
                                                 tuple(self._utils.get_cudnn_version()), q.shape[1], k.shape[1])
        if self._problems[key] is not None:
            raise BackendUnavailable(self._problems[key])

    def _common(self, call: VarlenCall, scale: float) -> dict:
        return dict(max_seqlen_q=call.max_q, max_seqlen_kv=call.max_k, cu_seqlens_q=call.cu_q,
                    cu_seqlens_kv=call.cu_k, cu_seqlens_q_padded=call.cu_q, cu_seqlens_kv_padded=call.cu_k,
                    fused_attention_backend=self._fa.FusedAttnBackend["F16_arbitrary_seqlen"], attn_scale=scale,
                    dropout=0.0, qkv_layout="thd_thd_thd", o_format="thd", attn_bias_type="no_bias",
                    attn_mask_type="padding_causal" if call.causal else "padding")

    @staticmethod
    def _token_index(call: VarlenCall) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment and position in segment of every query token (to index padded ``[batch, heads, max_q]``)."""
        device = call.cu_q.device  # lengths from the device copy, output size given: no host sync
        seg = torch.repeat_interleave(torch.arange(len(call.q_lens), device=device), call.cu_q.diff(),
                                      output_size=call.num_q)
        return seg, torch.arange(call.num_q, device=device) - call.cu_q[seg].long()

    def forward(self, q, k, v, call, scale):
        out, aux = self._fa.fused_attn_fwd(is_training=True, q=q.contiguous(), k=k.contiguous(), v=v.contiguous(),
                                           fake_dtype=q.dtype, **self._common(call, scale))
        stats = aux[0]
        if self._packed_stats():
            lse = stats.view(call.num_q, q.shape[1])
        else:
            seg, pos = self._token_index(call)
            lse = stats.view(len(call.q_lens), q.shape[1], call.max_q)[seg, :, pos]
        return out, lse.float().contiguous()

    def backward(self, dout, q, k, v, out, lse, call, scale):
        lse = lse.to(torch.float32)
        if self._packed_stats():
            stats = lse.contiguous().unsqueeze(-1)
        else:
            seg, pos = self._token_index(call)
            stats = lse.new_zeros(len(call.q_lens), q.shape[1], call.max_q, 1)
            stats[seg, :, pos, 0] = lse
        rng_state = torch.zeros(2, dtype=torch.int64, device=q.device)  # unused without dropout
        dq, dk, dv, *_ = self._fa.fused_attn_bwd(
            q=q.contiguous(), k=k.contiguous(), v=v.contiguous(), o=out.to(q.dtype).contiguous(),
            d_o=dout.to(q.dtype).contiguous(), fake_dtype=q.dtype, aux_ctx_tensors=[stats, rng_state],
            do_format="thd", dqkv_layout="thd_thd_thd", deterministic=False, **self._common(call, scale))
        return dq, dk, dv
