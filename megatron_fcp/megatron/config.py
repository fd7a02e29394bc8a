"""FCP options for Megatron: the command-line flags, their start-up checks, and the settings object.

Nothing here imports megatron or torch, so the checks run (and are tested) before anything heavy starts.
``add_fcp_args`` is Megatron's ``extra_args_provider`` hook; ``check_fcp_args`` turns every misconfiguration it
knows into one :class:`InputError` line, raised before Megatron's own validation and long before training.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from megatron_fcp.errors import InputError
from megatron_fcp.planner.api import STRATEGIES
from megatron_fcp.planner.stages import DEFAULT_KV_BUDGET, parse_kv_budget

CP_MODES = ("ring", "fcp")
SCHEDULERS = tuple(s for s in STRATEGIES if s != "nocp")
BACKENDS = ("auto", "cpu", "reference", "torch-flash", "flash-attn", "te")
"""Attention backend names (``megatron_fcp.kernels.BACKENDS``, repeated here to keep this module free
of torch; a test keeps the two equal)."""
AUTO_BLOCK_SIZE = 128
"""The block size ``auto`` picks: the attention kernels' tile (flash-attn and cuDNN work in 128-token tiles)."""


@dataclass(frozen=True, kw_only=True)
class FcpConfig:
    """What the FCP data hooks and attention need to know, independent of Megatron's global args."""

    cp_size: int
    seq_length: int
    """Tokens of one packed micro-batch over the whole CP group; each CP rank holds ``seq_length / cp_size``."""
    mask: str = "causal"
    scheduler: str = "fcp"
    block_size: int = AUTO_BLOCK_SIZE
    """Planner granularity in tokens: the kernel tile that cut costs are modeled with (see planner.fcp)."""
    backend: str = "auto"
    debug_checks: bool = False
    exchange_timeout_s: float = 600.0
    kv_budget_tokens: int | str | None = DEFAULT_KV_BUDGET
    """Key/value tokens received per stage of the exchange (``auto``: a rank's own tokens; None: one stage)."""

    @property
    def tokens_per_rank(self) -> int:
        return self.seq_length // self.cp_size


def add_fcp_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron ``extra_args_provider``: ``--context-parallel-mode`` and the ``--fcp-*`` options."""
    group = parser.add_argument_group(title="megatron-fcp")
    group.add_argument("--context-parallel-mode", choices=CP_MODES, default="ring",
                       help="ring: Megatron's own context parallelism, unchanged. fcp: block-level sharding of packed "
                            "variable-length micro-batches with planned peer-to-peer key/value exchange.")
    group.add_argument("--fcp-block-size", default="auto",
                       help="planner granularity in tokens (the attention kernel tile cut costs are modeled with); "
                            f"'auto' = {AUTO_BLOCK_SIZE}")
    group.add_argument("--fcp-scheduler", choices=SCHEDULERS, default="fcp",
                       help="how blocks are placed on CP ranks: fcp (this project) or a baseline placement "
                            "(ring, hybrid, magi) run on the same peer-to-peer exchange")
    group.add_argument("--fcp-planning-workers", type=int, default=2,
                       help="data-loader worker processes that plan micro-batches ahead of the step (raises "
                            "--num-workers to this if lower; 0 plans in the training process)")
    group.add_argument("--fcp-attention-backend", choices=BACKENDS, default="auto",
                       help="attention kernels: auto picks torch-flash on GPU and cpu on CPU")
    group.add_argument("--fcp-debug-checks", action="store_true",
                       help="check every plan (ownership, delivery, token counts) and every attention input; slow")
    group.add_argument("--fcp-kv-budget-tokens", default=DEFAULT_KV_BUDGET, metavar="N|auto|none",
                       help="bounds the key/values a CP rank holds from other ranks in each attention layer: they "
                            "arrive in stages of at most N tokens, at most 2 stages are held at once and at most N "
                            "tokens are kept from forward to backward (the other stages are fetched again in "
                            "backward). auto (default): the rank's own tokens, --seq-length / "
                            "--context-parallel-size; none: one unbounded stage (everything received is held and "
                            "kept)")
    group.add_argument("--fcp-exchange-timeout", type=float, default=600.0,
                       help="seconds to wait for a CP peer's key/values before failing with the peer's rank")
    group.add_argument("--fcp-mock-doclens", default=None,
                       help="with --mock-data: draw document lengths from this length file or shipped "
                            "distribution (linux_files, linux_dirs, spamassassin, magi_hist)")
    return parser


def parse_block_size(value) -> int:
    if value in (None, "auto"):
        return AUTO_BLOCK_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise InputError(f"--fcp-block-size must be a positive integer or 'auto', got {value!r}") from None
    if size < 1:
        raise InputError(f"--fcp-block-size must be a positive integer or 'auto', got {value!r}")
    return size


def _get(args, name, default=None):
    return getattr(args, name, default)


def check_fcp_args(args, world_size: int) -> None:
    """Raise :class:`InputError` (one line: what is wrong and what to do) for configurations FCP cannot run.

    ``args`` is Megatron's parsed namespace (before ``validate_args``); ``world_size`` the launcher's WORLD_SIZE.
    Ring mode is Megatron's own path and is left to Megatron's checks.
    """
    if _get(args, "context_parallel_mode", "ring") != "fcp":
        return
    cp = int(_get(args, "context_parallel_size", 1) or 1)
    tp = int(_get(args, "tensor_model_parallel_size", 1) or 1)
    pp = int(_get(args, "pipeline_model_parallel_size", 1) or 1)
    seq = _get(args, "seq_length")
    if pp != 1:
        raise InputError(f"FCP does not support pipeline parallelism yet (--pipeline-model-parallel-size {pp}); "
                         "use --pipeline-model-parallel-size 1 with tensor, data and context parallelism")
    if world_size % (tp * pp * cp):
        raise InputError(f"--context-parallel-size {cp} x --tensor-model-parallel-size {tp} = {tp * cp} does not "
                         f"divide the {world_size} launched processes; launch a multiple of {tp * cp} processes or "
                         "change the parallel sizes")
    if not _get(args, "calculate_per_token_loss", False):
        raise InputError("FCP gives CP ranks different numbers of loss tokens, so the loss must be reduced per token: "
                         "add --calculate-per-token-loss")
    if int(_get(args, "micro_batch_size", 1) or 1) != 1:
        raise InputError(f"FCP packs one micro-batch of --seq-length tokens over the CP group; use "
                         f"--micro-batch-size 1 (got {_get(args, 'micro_batch_size')}) and more micro-batches per step "
                         "via --global-batch-size")
    if seq is None or seq < 1:
        raise InputError("FCP needs --seq-length (tokens of one packed micro-batch over the whole CP group)")
    unit = 2 * cp if cp > 1 else 1  # Megatron's own rule for CP > 1 (validate_args); FCP needs seq_length / cp
    if seq % unit:
        raise InputError(f"--seq-length {seq} is not a multiple of --context-parallel-size {cp}"
                         f"{' x 2, which Megatron requires with CP' if cp > 1 else ''} "
                         f"(try --seq-length {seq - seq % unit + unit})")
    if bool(_get(args, "sequence_parallel", False)) and (seq // cp) % tp:
        raise InputError(f"with --sequence-parallel each CP rank's {seq // cp} tokens must split evenly over "
                         f"--tensor-model-parallel-size {tp}; pick --seq-length a multiple of "
                         f"{math.lcm(unit, cp * tp)}")
    block = parse_block_size(_get(args, "fcp_block_size", "auto"))
    if block > seq:
        raise InputError(f"--fcp-block-size {block} is larger than the sequence (--seq-length {seq}); use a block "
                         "size of at most the sequence length, or 'auto'")
    heads = _get(args, "num_attention_heads")
    groups = _get(args, "num_query_groups") if _get(args, "group_query_attention", False) else heads
    if heads is not None and groups is not None:
        if groups < 1 or heads % groups:
            raise InputError(f"--num-attention-heads {heads} is not a multiple of --num-query-groups {groups}; "
                             "grouped-query attention needs heads % query groups == 0")
        if heads % tp or groups % tp:
            raise InputError(f"--num-attention-heads {heads} and --num-query-groups {groups} must both divide by "
                             f"--tensor-model-parallel-size {tp} (each TP rank holds whole heads)")
    dropout = float(_get(args, "attention_dropout", 0.0) or 0.0)
    if dropout:
        raise InputError(f"FCP attention kernels have no attention dropout (--attention-dropout {dropout}); pass "
                         "--attention-dropout 0")
    pos = _get(args, "position_embedding_type", "learned_absolute")
    if pos not in ("rope", "none"):
        raise InputError(f"FCP places blocks anywhere and applies rotary embeddings from per-token positions; "
                         f"--position-embedding-type {pos} is not supported, use rope or none")
    if _get(args, "attention_backend") is not None and str(_get(args, "attention_backend")).endswith("local"):
        raise InputError("--attention-backend local replaces every core attention, FCP's too; leave "
                         "--attention-backend at auto (FCP picks its kernels with --fcp-attention-backend)")
    if _get(args, "sft", False):
        raise InputError("FCP does not take --sft datasets yet; use GPT pretraining data with "
                         "--reset-position-ids (document boundaries) or --mock-data --fcp-mock-doclens NAME")
    if _get(args, "mock_data", False):
        if not _get(args, "fcp_mock_doclens"):
            raise InputError("with --mock-data, FCP needs documents: add --fcp-mock-doclens NAME|FILE (linux_files, "
                             "linux_dirs, spamassassin, magi_hist, or a file of one length per line)")
    elif not _get(args, "reset_position_ids", False):
        raise InputError("FCP needs document boundaries in the data: add --reset-position-ids (and "
                         "--reset-attention-mask --eod-mask-loss as usual), so each document starts at position 0")
    if int(_get(args, "fcp_planning_workers", 0)) < 0:
        raise InputError(f"--fcp-planning-workers must be >= 0, got {_get(args, 'fcp_planning_workers')}")
    parse_kv_budget(_get(args, "fcp_kv_budget_tokens", DEFAULT_KV_BUDGET), flag="--fcp-kv-budget-tokens")
    if float(_get(args, "fcp_exchange_timeout", 1.0)) <= 0:
        raise InputError(f"--fcp-exchange-timeout must be > 0 seconds, got {_get(args, 'fcp_exchange_timeout')}")


def fcp_config_from_args(args) -> FcpConfig:
    """The :class:`FcpConfig` of a checked Megatron namespace."""
    return FcpConfig(
        cp_size=int(args.context_parallel_size),
        seq_length=int(args.seq_length),
        mask="causal",
        scheduler=args.fcp_scheduler,
        block_size=parse_block_size(args.fcp_block_size),
        backend=args.fcp_attention_backend,
        debug_checks=bool(args.fcp_debug_checks),
        exchange_timeout_s=float(args.fcp_exchange_timeout),
        kv_budget_tokens=parse_kv_budget(getattr(args, "fcp_kv_budget_tokens", DEFAULT_KV_BUDGET),
                                         flag="--fcp-kv-budget-tokens"),
    )


def with_fcp_args(provider=None):
    """An ``extra_args_provider`` that adds FCP's flags after ``provider``'s (for Megatron-LM's own scripts)."""

    def extra_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        if provider is not None:
            parser = provider(parser)
        return add_fcp_args(parser)

    return extra_args
