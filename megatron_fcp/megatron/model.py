"""The model side: FCP core attention installed through Megatron's layer spec, with per-token rotary embeddings.

FCP places a document's blocks on any CP rank, so a rank's tokens are not Megatron's zigzag chunks and
Megatron's CP slicing of rotary embeddings does not apply. The FCP model therefore builds GPTModel with
``position_embedding_type="none"`` and applies the same rotary embedding (Megatron's own ``RotaryEmbedding``
table and ``apply_rotary_pos_emb``, with the run's base, percent, interleaving and scaling) inside the core
attention, at each token's position within its document. Rotary embeddings have no parameters, so an FCP
checkpoint and a plain one hold the same tensors and load into each other.

Everything else in the layer is Megatron's: the spec is the run's usual spec (Transformer Engine on GPU, local on
CPU) with only ``core_attention`` swapped, so tensor and sequence parallelism work as usual (each TP rank runs FCP
attention on its own heads).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch

from megatron_fcp.attention.engine import fcp_attention
from megatron_fcp.errors import InputError
from megatron_fcp.megatron.config import FcpConfig
from megatron_fcp.planner.plan import RankPlan

try:  # megatron-core is an optional dependency: the rest of the package works without it
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.spec_utils import ModuleSpec
except ImportError as err:  # pragma: no cover - exercised only without megatron-core
    raise ImportError("megatron_fcp.megatron.model needs megatron-core: pip install 'megatron-fcp[megatron]'") from err


@dataclass
class FcpPackedSeqParams(PackedSeqParams):
    """Megatron's packed-sequence parameters plus what FCP attention needs for this rank's micro-batch."""

    rank_plan: RankPlan | None = None
    """This rank's view of the micro-batch plan (its token order is the order of q, k and v)."""
    fcp_position_ids: torch.Tensor | None = None
    """int64 ``[num_tokens]``: each local token's position in its document (padding: 0)."""
    fcp_max_position: int = 0
    """The largest of ``fcp_position_ids``, known on the host (sizes the rotary table without a device sync)."""
    fcp_freqs: torch.Tensor | None = field(default=None, repr=False, compare=False)
    """Rotary frequencies at ``fcp_position_ids``: gathered by the first layer, reused by the others."""
    fcp_plan_verified: bool = field(default=False, repr=False, compare=False)
    """Set once the CP ranks have confirmed they hold the same plan (by the first layer's attention); every rank
    runs the layers in the same order, so every rank skips the check from then on, recomputation included."""


@dataclass(frozen=True)
class RopeSettings:
    """The rotary embedding of the model config (what GPTModel would have built)."""

    rotary_percent: float = 1.0
    rotary_base: int = 10000
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    seq_len_interpolation_factor: float | None = None

    @classmethod
    def from_model_config(cls, model_cfg) -> RopeSettings:
        return cls(rotary_percent=model_cfg.rotary_percent, rotary_base=model_cfg.rotary_base,
                   rope_scaling=model_cfg.rope_scaling, rope_scaling_factor=model_cfg.rope_scaling_factor,
                   seq_len_interpolation_factor=model_cfg.seq_len_interpolation_factor)


class FcpCoreAttention(MegatronModule):
    """Core attention of one layer on an FCP-planned micro-batch (THD ``[tokens, heads, head_dim]``)."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str = "self",
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, *, fcp: FcpConfig,
                 rope: RopeSettings | None = None):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise InputError(f"FCP attention has no attention dropout (got {dropout}); pass --attention-dropout 0")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise InputError(f"FCP attention supports causal masks in GPT layers, got {attn_mask_type}")
        self.fcp = fcp
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale
        self.cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        self.rotary = None
        if rope is not None:
            kv_channels = config.kv_channels or config.hidden_size // config.num_attention_heads
            self.rotary = RotaryEmbedding(
                kv_channels=kv_channels, rotary_percent=rope.rotary_percent,
                rotary_interleaved=config.rotary_interleaved,
                seq_len_interpolation_factor=rope.seq_len_interpolation_factor, rotary_base=rope.rotary_base,
                rope_scaling=rope.rope_scaling, rope_scaling_factor=rope.rope_scaling_factor,
                use_cpu_initialization=config.use_cpu_initialization)
        self._table: torch.Tensor | None = None

    def _freqs(self, params: FcpPackedSeqParams, device) -> torch.Tensor:
        """Rotary frequencies ``[tokens, 1, 1, dim]`` at the micro-batch's per-token positions, gathered once per
        micro-batch (every layer has the same rotary embedding), so only the first layer keeps a table."""
        if params.fcp_freqs is None:
            need = max(int(self.fcp.seq_length), params.fcp_max_position + 1)
            if self._table is None or self._table.shape[0] < need or self._table.device != device:
                self._table = self.rotary.get_emb(need).to(device)  # [need, 1, 1, dim]
            params.fcp_freqs = self._table.index_select(0, params.fcp_position_ids)
        return params.fcp_freqs

    def _rope(self, t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        return apply_rotary_pos_emb(t.unsqueeze(1), freqs, config=self.config).squeeze(1)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **unused):
        if not isinstance(packed_seq_params, FcpPackedSeqParams) or packed_seq_params.rank_plan is None:
            raise InputError("FCP core attention got a batch without an FCP plan: feed it batches from "
                             "megatron_fcp's data hooks (get_batch / FcpBatchDataset), or run with "
                             "--context-parallel-mode ring")
        if attention_bias is not None:
            raise InputError("FCP attention does not take an attention bias")
        plan = packed_seq_params.rank_plan
        if self.rotary is not None:
            freqs = self._freqs(packed_seq_params, query.device)
            query, key = self._rope(query, freqs), self._rope(key, freqs)
        group = self.cp_group if plan.cp > 1 else None
        out = fcp_attention(query.contiguous(), key.contiguous(), value.contiguous(), plan, group,
                            self.softmax_scale, backend=self.fcp.backend, timeout_s=self.fcp.exchange_timeout_s,
                            kv_budget_tokens=self.fcp.kv_budget_tokens,
                            verify_plan=not packed_seq_params.fcp_plan_verified)
        packed_seq_params.fcp_plan_verified = True
        return out.reshape(out.shape[0], -1)


def install_fcp_core_attention(spec, fcp: FcpConfig, rope: RopeSettings | None):
    """Swap the core attention of a layer spec (or of every layer of a block spec) for FCP's, in place."""
    layers = getattr(spec, "layer_specs", None) or [spec]
    core = functools.partial(FcpCoreAttention, fcp=fcp, rope=rope)
    for layer in layers:
        attention = getattr(getattr(layer, "submodules", None), "self_attention", None)
        if not isinstance(attention, ModuleSpec) or not hasattr(attention.submodules, "core_attention"):
            raise InputError(f"FCP can only replace the core attention of self-attention layers; this layer spec "
                             f"has {type(attention).__name__} (multi-latent or linear attention is not supported)")
        attention.submodules.core_attention = core
    return spec


def fcp_model_config(model_cfg, fcp: FcpConfig):
    """The GPTModelConfig that builds the FCP model: the same model, FCP core attention, rotary inside it.

    ``model_cfg`` is a ``megatron.training.models.gpt.GPTModelConfig`` (as ``gpt_config_from_args`` makes it).
    """
    from megatron.training.models.gpt import default_layer_spec

    if model_cfg.position_embedding_type not in ("rope", "none"):
        raise InputError(f"FCP applies rotary embeddings per token; position_embedding_type "
                         f"{model_cfg.position_embedding_type!r} is not supported (use rope or none)")
    rope = RopeSettings.from_model_config(model_cfg) if model_cfg.position_embedding_type == "rope" else None
    base = model_cfg.transformer_layer_spec

    def spec(config, vp_stage=None):
        if base is None:
            layer_spec = default_layer_spec(config, vp_stage)
        elif isinstance(base, ModuleSpec):
            layer_spec = base
        else:
            layer_spec = base(config)
        return install_fcp_core_attention(layer_spec, fcp, rope)

    return dataclasses.replace(model_cfg, transformer_layer_spec=spec, position_embedding_type="none")
