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
from dataclasses import dataclass

import torch

from megatron_fcp.attention.engine import fcp_attention
from megatron_fcp.attention.head_parallel import head_parallel_attention, head_parallel_groups
from megatron_fcp.attention.schedule import RankSchedule
from megatron_fcp.errors import InputError
from megatron_fcp.megatron.config import FcpConfig

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
    """Megatron's packed-sequence parameters plus what FCP attention needs for this rank's micro-batch. Made by the
    step; the layers only read it."""

    fcp_schedule: RankSchedule | None = None
    """This rank's attention schedule of the micro-batch (its token order is the order of q, k and v), decoded from
    what the data loader shipped; the step has checked that every CP rank holds the same plan."""
    fcp_position_ids: torch.Tensor | None = None
    """int64 ``[num_tokens]``: each local token's position in its document (padding: 0)."""
    fcp_max_position: int = 0
    """The largest of ``fcp_position_ids``, known on the host (sizes the rotary table without a device sync)."""


class RotaryTable:
    """The rotary frequencies every FCP layer of a model shares: one table, and the frequencies at the current
    micro-batch's per-token positions gathered once (the first layer that asks) for all layers."""

    def __init__(self, rotary: RotaryEmbedding, min_length: int):
        self.rotary, self.min_length = rotary, min_length
        self._table: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._freqs: torch.Tensor | None = None

    def freqs(self, params: FcpPackedSeqParams, device) -> torch.Tensor:
        """Rotary frequencies ``[tokens, 1, 1, dim]`` at ``params.fcp_position_ids``."""
        if self._positions is params.fcp_position_ids and self._freqs is not None:
            return self._freqs
        need = max(self.min_length, params.fcp_max_position + 1)
        if self._table is None or self._table.shape[0] < need or self._table.device != torch.device(device):
            self._table = self.rotary.get_emb(need).to(device)  # [need, 1, 1, dim]
        self._positions = params.fcp_position_ids
        self._freqs = self._table.index_select(0, params.fcp_position_ids)
        return self._freqs


def _skips_rope(config, layer_number: int) -> bool:
    """Whether Megatron's ``config.no_rope_freq`` (one 0/1 entry per layer, 1-based layer numbers) turns rotary
    embeddings off in this layer, as Megatron's attention does."""
    pattern = getattr(config, "no_rope_freq", None)
    return bool(pattern[layer_number - 1]) if pattern else False


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
                 rotary: RotaryTable | None = None):
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
        self.rotary = None if rotary is None or _skips_rope(config, layer_number) else rotary
        self._inputs_checked = False  # every CP rank's dtype, heads and scale: checked at the first call
        self._head_groups = None  # --fcp-node-exchange heads/auto: (node group, across group), at the first call

    def _rope(self, t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        return apply_rotary_pos_emb(t.unsqueeze(1), freqs, config=self.config).squeeze(1)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **unused):
        if not isinstance(packed_seq_params, FcpPackedSeqParams) or packed_seq_params.fcp_schedule is None:
            raise InputError("FCP core attention got a batch without an FCP schedule: feed it batches from "
                             "megatron_fcp's data hooks (FcpBatchDataset and megatron_fcp.megatron.step.FcpStep), "
                             "or run with --context-parallel-mode ring")
        if attention_bias is not None:
            raise InputError("FCP attention does not take an attention bias")
        sched = packed_seq_params.fcp_schedule
        if self.rotary is not None:
            freqs = self.rotary.freqs(packed_seq_params, query.device)
            query, key = self._rope(query, freqs), self._rope(key, freqs)
        kwargs = {"backend": self.fcp.backend, "timeout_s": self.fcp.exchange_timeout_s,
                  "verify_plan": not self._inputs_checked}
        if self.fcp.heads_split(sched.cp) > 1:  # a plan of the nodes: this rank's node's view
            if self._head_groups is None:  # looked up once: every call of the layer uses the same groups
                self._head_groups = head_parallel_groups(self.cp_group)
            node_group, across_group = self._head_groups
            out = head_parallel_attention(query.contiguous(), key.contiguous(), value.contiguous(), sched,
                                          node_group, across_group if sched.cp > 1 else None, self.softmax_scale,
                                          **kwargs)
        else:  # a plan of the CP ranks (p2p; also heads with one CP rank per node: nothing to split)
            group = self.cp_group if sched.cp > 1 else None
            out = fcp_attention(query.contiguous(), key.contiguous(), value.contiguous(), sched, group,
                                self.softmax_scale, **kwargs)
        self._inputs_checked = True
        return out.reshape(out.shape[0], -1)


def _rotary_table(config, rope: RopeSettings, seq_length: int) -> RotaryTable:
    kv_channels = config.kv_channels or config.hidden_size // config.num_attention_heads
    rotary = RotaryEmbedding(
        kv_channels=kv_channels, rotary_percent=rope.rotary_percent, rotary_interleaved=config.rotary_interleaved,
        seq_len_interpolation_factor=rope.seq_len_interpolation_factor, rotary_base=rope.rotary_base,
        rope_scaling=rope.rope_scaling, rope_scaling_factor=rope.rope_scaling_factor,
        use_cpu_initialization=config.use_cpu_initialization)
    return RotaryTable(rotary, seq_length)


def _attention_problem(attention) -> str | None:
    """Why FCP cannot take over this self-attention spec, or None."""
    if not isinstance(attention, ModuleSpec) or not hasattr(attention.submodules, "core_attention"):
        return f"this layer spec has {type(attention).__name__} (linear attention is not supported)"
    name = getattr(attention.module, "__name__", "") + type(attention.submodules).__name__
    if "MLA" in name or "MultiLatent" in name:
        return ("it uses multi-latent attention (MLA), whose queries and keys carry a separate rotary part FCP does "
                "not apply; use standard self-attention (no --multi-latent-attention)")
    return None


def install_fcp_core_attention(spec, fcp: FcpConfig, rotary: RotaryTable | None):
    """Swap the core attention of a layer spec (or of every layer of a block spec) for FCP's, in place."""
    layers = getattr(spec, "layer_specs", None) or [spec]
    core = functools.partial(FcpCoreAttention, fcp=fcp, rotary=rotary)
    for layer in layers:
        attention = getattr(getattr(layer, "submodules", None), "self_attention", None)
        problem = _attention_problem(attention)
        if problem:
            raise InputError(f"FCP can only replace the core attention of standard self-attention layers; {problem}")
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
        rotary = _rotary_table(config, rope, fcp.seq_length) if rope is not None else None
        return install_fcp_core_attention(layer_spec, fcp, rotary)

    return dataclasses.replace(model_cfg, transformer_layer_spec=spec, position_embedding_type="none")
