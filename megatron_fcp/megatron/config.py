"""FCP options for Megatron: the settings object, the command-line flags, and the start-up checks.

Nothing here imports megatron or torch, so the checks run (and are tested) before anything heavy starts.

- :class:`FcpConfig` is everything FCP's hooks need, validated when it is made: each problem is one
  :class:`InputError` line naming the flag and a value that would work.
- :func:`add_fcp_args` is Megatron's ``extra_args_provider`` hook: ``--context-parallel-mode`` and ``--fcp-*``.
- :func:`fcp_config_from_args` turns a parsed namespace into an :class:`FcpConfig`.
- :func:`fcp_arg_problems` also checks the Megatron settings FCP depends on (parallel layout, loss reduction,
  model and data, process-group timeout) and the GPU the run is on, and lists every problem with its flag;
  :func:`check_fcp_args` raises the first, before Megatron's own validation and long before training. The GPU
  rule reads this process's CUDA device (importing torch) only when ``--fcp-attention-backend te`` asks for it.
"""

from __future__ import annotations

import argparse
import math
import numbers
import warnings
from dataclasses import dataclass

from megatron_fcp.errors import InputError
from megatron_fcp.planner.api import STRATEGIES
from megatron_fcp.planner.pairs import MASKS
from megatron_fcp.planner.stages import DEFAULT_KV_BUDGET, parse_kv_budget

CP_MODES = ("ring", "fcp")
SCHEDULERS = tuple(s for s in STRATEGIES if s != "nocp")
BACKENDS = ("auto", "cpu", "flash-attn", "reference", "te", "torch-flash")
"""Attention backend names (``megatron_fcp.kernels.BACKENDS``, repeated here to keep this module free of torch;
a test keeps the two equal)."""
DEFAULT_TILE_SIZE = 128
"""The attention kernels' tile in tokens (flash-attn and cuDNN work in 128-token tiles)."""
TILE_FLAG = "--fcp-edge-cost-tile-size"
DEPRECATED_TILE_FLAG = "--fcp-block-size"
"""The old name of :data:`TILE_FLAG` (it never set a block size: the planner cuts at any token); accepted with a
warning until the next release."""
TIMEOUT_FLAG = "--fcp-exchange-timeout"
DEFAULT_DISTRIBUTED_TIMEOUT_MINUTES = 10
"""Megatron's ``--distributed-timeout-minutes`` default: every process group (and NCCL's watchdog) gives up then."""
TE_MIN_CAPABILITY = (9, 0)
"""The oldest GPU on which backend ``te`` runs (Transformer Engine's THD fused attention: sm90); repeated from
``megatron_fcp.kernels.te.MIN_CAPABILITY`` to keep this module free of torch (a test keeps the two equal)."""
THIS_GPU = "this-gpu"
"""``compute_capability`` of :func:`fcp_arg_problems`: read it from this process's CUDA device when needed."""

FLAGS = {
    "cp": "--context-parallel-size",
    "seq_length": "--seq-length",
    "mask": "mask",
    "scheduler": "--fcp-scheduler",
    "tile_size": TILE_FLAG,
    "backend": "--fcp-attention-backend",
    "kv_budget_tokens": "--fcp-kv-budget-tokens",
    "exchange_timeout_s": TIMEOUT_FLAG,
    "planning_workers": "--fcp-planning-workers",
}
"""The command-line flag of each :class:`FcpConfig` field, for messages."""


class FlagError(InputError):
    """An :class:`InputError` about one command-line flag (``flag``)."""

    def __init__(self, flag: str, message: str):
        super().__init__(message)
        self.flag = flag


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_seconds(value) -> bool:
    """Whether ``value`` is a finite number of seconds > 0 (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclass(frozen=True, kw_only=True)
class FcpConfig:
    """What FCP's data hooks and attention need, independent of Megatron's global args. Validated on creation."""

    cp: int
    """Context-parallel size: the ranks that share one packed micro-batch (``--context-parallel-size``)."""
    seq_length: int
    """Tokens of one packed micro-batch over the whole CP group (``--seq-length``); each CP rank holds
    ``seq_length / cp`` token slots, so it must be a multiple of ``cp``."""
    mask: str = "causal"
    """Attention mask inside a document: ``causal`` (GPT) or ``full``."""
    scheduler: str = "fcp"
    """How document pieces are placed on CP ranks (``--fcp-scheduler``): ``fcp`` (this project) or a baseline
    placement (``ring``, ``hybrid``, ``magi``) run on the same peer-to-peer exchange."""
    tile_size: int = DEFAULT_TILE_SIZE
    """The attention kernel's tile in tokens (``--fcp-edge-cost-tile-size``). The ``fcp`` scheduler charges each
    piece the partly filled tiles at its edges with it; it does not round cuts to it (pieces start and end at
    any token)."""
    backend: str = "auto"
    """Attention kernels (``--fcp-attention-backend``): ``auto`` picks ``torch-flash`` on GPU and ``cpu`` on CPU;
    see :mod:`megatron_fcp.kernels`."""
    debug_checks: bool = False
    """Check every plan (ownership, delivery, token counts) and every attention input; slow
    (``--fcp-debug-checks``)."""
    exchange_timeout_s: float | None = None
    """Debugging hangs (``--fcp-exchange-timeout``): None (default) waits for a CP peer's key/values as torch does
    (on NCCL the stream waits, no host synchronisation; a stuck peer ends in the process group's own timeout); a
    number of seconds makes every wait give up after that long naming the silent peer, at the price of the CPU
    polling each exchange round on NCCL. Must be shorter than ``--distributed-timeout-minutes``."""
    kv_budget_tokens: int | str | None = DEFAULT_KV_BUDGET
    """Key/value tokens received per stage of the exchange (``--fcp-kv-budget-tokens``): a positive number,
    ``auto`` (a rank's own token slots) or None (one unbounded stage). Strings such as ``"4096"`` or ``"none"``
    are parsed on creation."""
    planning_workers: int = 2
    """Data-loader worker processes that plan micro-batches ahead of the step (``--fcp-planning-workers``;
    0 plans in the training process)."""

    def __post_init__(self):
        try:
            budget = parse_kv_budget(self.kv_budget_tokens, flag=FLAGS["kv_budget_tokens"])
        except InputError as err:
            raise FlagError(FLAGS["kv_budget_tokens"], str(err)) from None
        object.__setattr__(self, "kv_budget_tokens", budget)
        problem = self._problem()
        if problem:
            raise FlagError(FLAGS[problem[0]], problem[1])

    def _problem(self) -> tuple[str, str] | None:
        """The first problem of this configuration as ``(field, one-line message)``, or None."""
        for name in ("cp", "seq_length", "tile_size"):
            value = getattr(self, name)
            if not _whole(value) or value < 1:
                return name, f"{FLAGS[name]} must be a whole number >= 1, got {value!r}"
        if self.seq_length % self.cp:
            fits = self.seq_length - self.seq_length % self.cp + self.cp
            return "seq_length", (f"--seq-length {self.seq_length} is not a multiple of --context-parallel-size "
                                  f"{self.cp}: each CP rank holds seq_length / cp tokens (try --seq-length {fits})")
        choices = {"mask": MASKS, "scheduler": SCHEDULERS, "backend": BACKENDS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                return name, f"{FLAGS[name]} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
        if self.exchange_timeout_s is not None and not _positive_seconds(self.exchange_timeout_s):
            return "exchange_timeout_s", (f"{TIMEOUT_FLAG} must be > 0 seconds and finite, got "
                                          f"{self.exchange_timeout_s!r} (leave it unset for no timed wait)")
        if not _whole(self.planning_workers) or self.planning_workers < 0:
            return "planning_workers", f"{FLAGS['planning_workers']} must be >= 0, got {self.planning_workers!r}"
        return None

    @property
    def tokens_per_rank(self) -> int:
        return self.seq_length // self.cp


class _DeprecatedAlias(argparse.Action):
    """An old flag name: warns, then stores its value under the new flag's destination."""

    def __init__(self, option_strings, dest, new_flag: str, **kwargs):
        self.new_flag = new_flag
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(f"{option_string} is deprecated and will be removed in the next release: use {self.new_flag} "
                      "(the kernel tile the planner models edge costs with; it never set a block size)",
                      FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, values)


def add_fcp_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron ``extra_args_provider``: ``--context-parallel-mode`` and the ``--fcp-*`` options."""
    group = parser.add_argument_group(title="megatron-fcp")
    group.add_argument("--context-parallel-mode", choices=CP_MODES, default="ring",
                       help="ring: Megatron's own context parallelism, unchanged. fcp: token-exact sharding of packed "
                            "variable-length micro-batches with planned peer-to-peer key/value exchange.")
    group.add_argument(TILE_FLAG, dest="fcp_edge_cost_tile_size", default="auto", metavar="N|auto",
                       help="the attention kernel's tile in tokens, with which the FCP scheduler models the cost of "
                            "each piece's partly filled edge tiles; the planner still cuts documents at any token. "
                            f"'auto' = {DEFAULT_TILE_SIZE}")
    group.add_argument(DEPRECATED_TILE_FLAG, dest="fcp_edge_cost_tile_size", action=_DeprecatedAlias,
                       new_flag=TILE_FLAG, metavar="N|auto", help=f"deprecated name of {TILE_FLAG}")
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
    group.add_argument(TIMEOUT_FLAG, type=parse_exchange_timeout, default=None, metavar="SECONDS",
                       help="for debugging hangs: give up waiting for a CP peer's key/values after SECONDS and name "
                            "the silent peer. Unset (default) or 'none': no timed wait (on NCCL the stream waits, "
                            "no host synchronisation; a stuck peer ends in the process group's own timeout). A "
                            "number makes the CPU poll every exchange round on NCCL, a host synchronisation per "
                            "round; it must be below --distributed-timeout-minutes x 60")
    group.add_argument("--fcp-mock-doclens", default=None,
                       help="with --mock-data: draw document lengths from this length file or shipped "
                            "distribution (linux_files, linux_dirs, spamassassin, magi_hist)")
    return parser


def parse_tile_size(value) -> int:
    """The value of :data:`TILE_FLAG`: a whole number of tokens, or ``auto``."""
    if value in (None, "auto"):
        return DEFAULT_TILE_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise FlagError(TILE_FLAG, f"{TILE_FLAG} must be a positive integer or 'auto', got {value!r}") from None
    if size < 1:
        raise FlagError(TILE_FLAG, f"{TILE_FLAG} must be a positive integer or 'auto', got {value!r}")
    return size


def parse_exchange_timeout(value) -> float | None:
    """The value of :data:`TIMEOUT_FLAG`: a number of seconds, or None for unset or ``none`` (no timed wait).

    Raises ``argparse.ArgumentTypeError`` (argparse reports it with the flag) for anything else; whether the number
    is > 0 is :class:`FcpConfig`'s check.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{TIMEOUT_FLAG} takes a number of seconds or 'none', got {value!r}") \
            from None


def fcp_config_from_args(args) -> FcpConfig:
    """The :class:`FcpConfig` of Megatron's parsed namespace (raises :class:`InputError` naming a bad flag)."""
    return FcpConfig(
        cp=int(getattr(args, "context_parallel_size", 1) or 1),
        seq_length=getattr(args, "seq_length", None),
        scheduler=getattr(args, "fcp_scheduler", "fcp"),
        tile_size=parse_tile_size(getattr(args, "fcp_edge_cost_tile_size", "auto")),
        backend=getattr(args, "fcp_attention_backend", "auto"),
        debug_checks=bool(getattr(args, "fcp_debug_checks", False)),
        exchange_timeout_s=getattr(args, "fcp_exchange_timeout", None),
        kv_budget_tokens=getattr(args, "fcp_kv_budget_tokens", DEFAULT_KV_BUDGET),
        planning_workers=int(getattr(args, "fcp_planning_workers", 2)),
    )


# -- Megatron settings FCP depends on ---------------------------------------------------------------------------
Problem = tuple[str, str]
"""``(flag, one-line message)``: the flag a problem is about, and what is wrong and what to do."""


def _get(args, name, default=None):
    return getattr(args, name, default)


def _sizes(args) -> tuple[int, int, int]:
    """``(cp, tp, pp)`` of the namespace."""
    return tuple(int(_get(args, f"{name}_parallel_size", 1) or 1)
                 for name in ("context", "tensor_model", "pipeline_model"))


def _pipeline_problem(args, world_size: int) -> Problem | None:
    pp = _sizes(args)[2]
    if pp != 1:
        return ("--pipeline-model-parallel-size",
                f"FCP does not support pipeline parallelism yet (--pipeline-model-parallel-size {pp}); use "
                "--pipeline-model-parallel-size 1 with tensor, data and context parallelism")
    return None


def _layout_problem(args, world_size: int) -> Problem | None:
    cp, tp, _ = _sizes(args)
    if world_size % (tp * cp):
        return ("--context-parallel-size",
                f"--context-parallel-size {cp} x --tensor-model-parallel-size {tp} = {tp * cp} does not divide the "
                f"{world_size} launched processes; launch a multiple of {tp * cp} processes or change the parallel "
                "sizes")
    return None


def _loss_problem(args, world_size: int) -> Problem | None:
    if not _get(args, "calculate_per_token_loss", False):
        return ("--calculate-per-token-loss",
                "FCP gives CP ranks different numbers of loss tokens, so the loss must be reduced per token: add "
                "--calculate-per-token-loss")
    return None


def _micro_batch_problem(args, world_size: int) -> Problem | None:
    if int(_get(args, "micro_batch_size", 1) or 1) != 1:
        return ("--micro-batch-size",
                f"FCP packs one micro-batch of --seq-length tokens over the CP group; use --micro-batch-size 1 (got "
                f"{_get(args, 'micro_batch_size')}) and more micro-batches per step via --global-batch-size")
    return None


def _sequence_problem(args, world_size: int) -> Problem | None:
    cp, tp, _ = _sizes(args)
    seq = _get(args, "seq_length")
    if seq is None or seq < 1:
        return "--seq-length", "FCP needs --seq-length (tokens of one packed micro-batch over the whole CP group)"
    unit = 2 * cp if cp > 1 else 1  # Megatron's own rule for CP > 1 (validate_args); FCP needs seq_length / cp
    if seq % unit:
        why = " x 2, which Megatron requires with CP" if cp > 1 else ""
        return ("--seq-length", f"--seq-length {seq} is not a multiple of --context-parallel-size {cp}{why} (try "
                                f"--seq-length {seq - seq % unit + unit})")
    if bool(_get(args, "sequence_parallel", False)) and (seq // cp) % tp:
        return ("--seq-length", f"with --sequence-parallel each CP rank's {seq // cp} tokens must split evenly over "
                                f"--tensor-model-parallel-size {tp}; pick --seq-length a multiple of "
                                f"{math.lcm(unit, cp * tp)}")
    return None


def _heads_problem(args, world_size: int) -> Problem | None:
    tp = _sizes(args)[1]
    heads = _get(args, "num_attention_heads")
    groups = _get(args, "num_query_groups") if _get(args, "group_query_attention", False) else heads
    if heads is None or groups is None:
        return None
    if groups < 1 or heads % groups:
        return ("--num-attention-heads", f"--num-attention-heads {heads} is not a multiple of --num-query-groups "
                                         f"{groups}; grouped-query attention needs heads % query groups == 0")
    if heads % tp or groups % tp:
        return ("--num-attention-heads", f"--num-attention-heads {heads} and --num-query-groups {groups} must both "
                                         f"divide by --tensor-model-parallel-size {tp} (each TP rank holds whole "
                                         "heads)")
    return None


def _attention_problem(args, world_size: int) -> Problem | None:
    if _get(args, "multi_latent_attention", False):
        return ("--multi-latent-attention", "FCP replaces the core attention of standard self-attention; multi-latent "
                                            "attention (MLA) carries a separate rotary part FCP does not apply: drop "
                                            "--multi-latent-attention or use --context-parallel-mode ring")
    dropout = float(_get(args, "attention_dropout", 0.0) or 0.0)
    if dropout:
        return ("--attention-dropout", f"FCP attention kernels have no attention dropout (--attention-dropout "
                                       f"{dropout}); pass --attention-dropout 0")
    pos = _get(args, "position_embedding_type", "learned_absolute")
    if pos not in ("rope", "none"):
        return ("--position-embedding-type", f"FCP places blocks anywhere and applies rotary embeddings from "
                                             f"per-token positions; --position-embedding-type {pos} is not "
                                             "supported, use rope or none")
    if str(_get(args, "attention_backend", "")).endswith("local"):
        return ("--attention-backend", "--attention-backend local replaces every core attention, FCP's too; leave "
                                       "--attention-backend at auto (FCP picks its kernels with "
                                       "--fcp-attention-backend)")
    return None


def _data_problem(args, world_size: int) -> Problem | None:
    if _get(args, "sft", False):
        return ("--sft", "FCP does not take --sft datasets yet; use GPT pretraining data with --reset-position-ids "
                         "(document boundaries) or --mock-data --fcp-mock-doclens NAME")
    if _get(args, "mock_data", False):
        if not _get(args, "fcp_mock_doclens"):
            return ("--fcp-mock-doclens", "with --mock-data, FCP needs documents: add --fcp-mock-doclens NAME|FILE "
                                          "(linux_files, linux_dirs, spamassassin, magi_hist, or a file of one "
                                          "length per line)")
    elif not _get(args, "reset_position_ids", False):
        return ("--reset-position-ids", "FCP needs document boundaries in the data: add --reset-position-ids (and "
                                        "--reset-attention-mask --eod-mask-loss as usual), so each document starts "
                                        "at position 0")
    return None


def _exchange_timeout_problem(args, world_size: int) -> Problem | None:
    """A timed FCP wait must end before the process group's own timeout, or it never names the silent peer."""
    timeout_s = _get(args, "fcp_exchange_timeout")
    if not _positive_seconds(timeout_s):
        return None  # unset: no timed wait; a bad value is FcpConfig's problem
    minutes = _get(args, "distributed_timeout_minutes") or DEFAULT_DISTRIBUTED_TIMEOUT_MINUTES
    limit_s = minutes * 60
    if timeout_s < limit_s:
        return None
    return (TIMEOUT_FLAG,
            f"{TIMEOUT_FLAG} {timeout_s:g} s is not shorter than --distributed-timeout-minutes {minutes:g} "
            f"({limit_s:g} s), so the process group would abort before FCP names the silent peer; pass "
            f"{TIMEOUT_FLAG} {limit_s / 2:g} (below {limit_s:g}), raise --distributed-timeout-minutes to "
            f"{math.floor(timeout_s / 60) + 1} or more, or leave {TIMEOUT_FLAG} unset (no timed wait)")


_MEGATRON_CHECKS = (_pipeline_problem, _layout_problem, _loss_problem, _micro_batch_problem, _sequence_problem,
                    _heads_problem, _attention_problem, _data_problem, _exchange_timeout_problem)
"""Each rule of the Megatron settings FCP depends on, in the order their problems are reported."""


def this_gpu_capability() -> tuple[int, int] | None:
    """The compute capability ``(major, minor)`` of this process's CUDA device, or None without torch or CUDA.

    Imports torch (and initialises CUDA): called only at start-up, by a rule that needs the GPU.
    """
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())


def te_capability_problem(backend: str, capability: tuple[int, int] | None) -> Problem | None:
    """``--fcp-attention-backend te`` on a GPU older than sm90, where Transformer Engine has no THD fused attention;
    None for other backends, a new enough GPU, or an unknown one (``capability`` None)."""
    if backend != "te" or capability is None or tuple(capability) >= TE_MIN_CAPABILITY:
        return None
    need = f"sm{TE_MIN_CAPABILITY[0]}{TE_MIN_CAPABILITY[1]}"
    return ("--fcp-attention-backend",
            f"--fcp-attention-backend te needs a {need} (Hopper) or newer GPU, where Transformer Engine runs THD "
            f"fused attention; this GPU has compute capability {capability[0]}.{capability[1]} "
            f"(sm{capability[0]}{capability[1]}): use --fcp-attention-backend torch-flash (or flash-attn)")


def _gpu_problems(args, compute_capability) -> list[Problem]:
    """The rules that depend on the GPU the run is on (see :func:`fcp_arg_problems` for ``compute_capability``)."""
    backend = _get(args, "fcp_attention_backend", "auto")
    if backend != "te":
        return []  # no need to look at the GPU (nor to import torch)
    capability = this_gpu_capability() if compute_capability == THIS_GPU else compute_capability
    problem = te_capability_problem(backend, capability)
    return [problem] if problem else []


def fcp_arg_problems(args, world_size: int,
                     compute_capability: tuple[int, int] | str | None = THIS_GPU) -> list[Problem]:
    """Every problem FCP finds in Megatron's parsed namespace, each ``(flag, one-line message)``, in check order:
    the Megatron settings first, then the GPU, then FCP's own flags (:class:`FcpConfig`); empty in ring mode
    (Megatron's path, left to Megatron's checks). ``world_size`` is the launcher's WORLD_SIZE.

    ``compute_capability``: the ``(major, minor)`` of the GPU the run is on; None when it is not known here (a
    launcher on another machine: the GPU rules are skipped); :data:`THIS_GPU` (default) reads this process's CUDA
    device when a rule needs it (None without CUDA).
    """
    if _get(args, "context_parallel_mode", "ring") != "fcp":
        return []
    problems = [p for check in _MEGATRON_CHECKS if (p := check(args, world_size)) is not None]
    problems += _gpu_problems(args, compute_capability)
    try:
        fcp_config_from_args(args)
    except FlagError as err:
        if err.flag not in {flag for flag, _ in problems}:
            problems.append((err.flag, str(err)))
    return problems


def check_fcp_args(args, world_size: int, compute_capability: tuple[int, int] | str | None = THIS_GPU) -> None:
    """Raise :class:`InputError` (one line: what is wrong and what to do) for the first configuration problem FCP
    cannot run with (see :func:`fcp_arg_problems`, also for ``compute_capability``).

    ``args`` is Megatron's parsed namespace (before ``validate_args``); ``world_size`` the launcher's WORLD_SIZE.
    """
    problems = fcp_arg_problems(args, world_size, compute_capability)
    if problems:
        raise FlagError(*problems[0])


def with_fcp_args(provider=None):
    """An ``extra_args_provider`` that adds FCP's flags after ``provider``'s (for Megatron-LM's own scripts)."""

    def extra_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        if provider is not None:
            parser = provider(parser)
        return add_fcp_args(parser)

    return extra_args
