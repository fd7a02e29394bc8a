"""FCP options for Megatron: the settings object, the command-line flags, and the start-up checks.

Nothing here imports megatron or torch, so the checks run (and are tested) before anything heavy starts.

- :class:`FcpConfig` is everything FCP's hooks need, validated when it is made: each problem is one
  :class:`InputError` line naming the flag and a value that would work. Each of its settings is declared once, on
  its field (:mod:`megatron_fcp.megatron.settings`): flag, launch config key, default, help and reader.
- :func:`add_fcp_args` is Megatron's ``extra_args_provider`` hook: ``--context-parallel-mode`` and ``--fcp-*``,
  one flag per setting (:data:`FLAG_SETTINGS`).
- :func:`fcp_config_from_args` turns a parsed namespace into an :class:`FcpConfig`.
- :func:`fcp_arg_problems` also checks the Megatron settings FCP depends on (parallel layout, loss reduction,
  model and data, process-group timeout, the nodes the CP groups span) and the GPU the run is on, and lists every
  problem with its flag. The layout rules take plain values and the names to say them with (:class:`Names`), so
  the launch config runs the same functions in its own keys' terms; :func:`check_fcp_args` raises the first,
  before Megatron's own validation and long before training. The GPU rule reads this process's CUDA device
  (importing torch) only when ``--fcp-attention-backend te`` asks for it.
- The node layout: GPUs per node come from ``--fcp-ranks-per-node``, else torchrun's ``LOCAL_WORLD_SIZE``
  (:func:`resolve_ranks_per_node`); the start-up rule (:func:`ranks_per_node_problem`) checks every CP group as
  Megatron will make it, and at run time :meth:`FcpConfig.with_nodes` puts the node of each CP rank into the
  plans.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from megatron_fcp.errors import InputError
from megatron_fcp.megatron import settings as st
from megatron_fcp.megatron.settings import Setting
from megatron_fcp.planner.api import STRATEGIES
from megatron_fcp.planner.pairs import MASKS
from megatron_fcp.planner.stages import DEFAULT_KV_BUDGET
from megatron_fcp.planner.topology import check_cp_node, cp_nodes

CP_MODES = ("ring", "fcp")
SCHEDULERS = tuple(s for s in STRATEGIES if s != "nocp")
BACKENDS = ("auto", "cpu", "flash-attn", "reference", "te", "torch-flash")
"""Attention backend names (``megatron_fcp.kernels.BACKENDS``, repeated here to keep this module free of torch;
a test keeps the two equal)."""
DEFAULT_TILE_SIZE = 128
"""The attention kernels' tile in tokens (flash-attn and cuDNN work in 128-token tiles): what ``auto`` means."""
TILE_FLAG = "--fcp-edge-cost-tile-size"
TIMEOUT_FLAG = "--fcp-exchange-timeout"
RANKS_PER_NODE_FLAG = "--fcp-ranks-per-node"
NODE_EXCHANGES = ("p2p", "heads", "auto")
"""How key/values reach the CP ranks of a node (``--fcp-node-exchange``): ``p2p``, the staged point-to-point exchange
between CP ranks (node-aware: node rings and relays); ``heads``, heads split inside each node by all-to-alls and
the staged exchange between nodes (:mod:`megatron_fcp.attention.head_parallel`); or ``auto``, per micro-batch the one
with the shorter modeled step (:func:`megatron_fcp.megatron.batch.plan_micro_batch`)."""
HEAD_SPLITTING = ("heads", "auto")
"""The settings of :data:`NODE_EXCHANGES` under which a micro-batch may split heads inside the node."""
LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"
"""The environment variable torchrun sets to the processes (GPUs) of this node: the ranks per node by default."""
DEFAULT_DISTRIBUTED_TIMEOUT_MINUTES = 10
"""Megatron's ``--distributed-timeout-minutes`` default: every process group (and NCCL's watchdog) gives up then."""
TE_MIN_CAPABILITY = (9, 0)
"""The oldest GPU on which backend ``te`` runs (Transformer Engine's THD fused attention: sm90); repeated from
``megatron_fcp.kernels.te.MIN_CAPABILITY`` to keep this module free of torch (a test keeps the two equal)."""
THIS_GPU = "this-gpu"
"""``compute_capability`` of :func:`fcp_arg_problems`: read it from this process's CUDA device when needed."""


class FlagError(InputError):
    """An :class:`InputError` about one command-line flag (``flag``)."""

    def __init__(self, flag: str, message: str):
        super().__init__(message)
        self.flag = flag


def parse_exchange_timeout(value) -> float | None:
    """The text of :data:`TIMEOUT_FLAG`: a number of seconds, or None for unset or ``none`` (no timed wait).

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


def _auto_tile(size: int | str) -> int:
    return DEFAULT_TILE_SIZE if size == "auto" else size


MODE = Setting(
    default="ring", config_default="fcp", read=st.choice(CP_MODES), choices=CP_MODES,
    flag="--context-parallel-mode", key="mode",
    help="ring: Megatron's own context parallelism, unchanged. fcp: token-exact sharding of packed variable-length "
         "micro-batches with planned peer-to-peer key/value exchange.")
"""Whether FCP runs: ``fcp``, or ``ring`` (Megatron's own context parallelism). The flag leaves Megatron
unchanged by default; a launch config runs FCP by default."""
MOCK_DOCLENS = Setting(
    default=None, flag="--fcp-mock-doclens",
    help="with --mock-data: draw document lengths from this length file or shipped distribution (linux_files, "
         "linux_dirs, spamassassin, magi_hist)")
"""Mock documents' lengths (the launch config's ``data.mock_doclens``, checked with the data)."""


@dataclass(frozen=True, kw_only=True)
class FcpConfig:
    """What FCP's data hooks and attention need, independent of Megatron's global args. Validated on creation.

    Each field but ``cp`` and ``seq_length`` (Megatron's own flags) carries its :class:`Setting`: flag, launch config
    key, default, help and reader."""

    cp: int
    """Context-parallel size: the ranks that share one packed micro-batch (``--context-parallel-size``)."""
    seq_length: int
    """Tokens of one packed micro-batch over the whole CP group (``--seq-length``); each CP rank holds
    ``seq_length / cp`` token slots, so it must be a multiple of ``cp``."""
    cp_node: tuple[int, ...] | None = None
    """The node of each CP rank, which every plan carries (``Plan.cp_node``, in the digest the CP ranks agree on); set
    at run time from the CP group's global ranks (:meth:`with_nodes`). None: no layout (the group taken as one
    node)."""
    attention_shape: tuple[int, int, int] | None = None
    """Query heads, key/value heads and head dimension of one rank's attention (after tensor parallelism), with which
    ``--fcp-node-exchange auto`` models each micro-batch's two exchanges; set from Megatron's model flags
    (:func:`fcp_config_from_args`). None: the cost profile's own layer (Llama-3 70B: 64, 8, 128)."""
    mask: str = st.setting(default="causal", read=st.choice(MASKS))
    """Attention mask inside a document: ``causal`` (GPT) or ``full``."""
    scheduler: str = st.setting(
        default="fcp", read=st.choice(SCHEDULERS), choices=SCHEDULERS, flag="--fcp-scheduler", key="scheduler",
        worker_flag="--scheduler",
        help="how blocks are placed on CP ranks: fcp (this project) or a baseline placement (ring, hybrid, magi) run "
             "on the same peer-to-peer exchange")
    """How document pieces are placed on CP ranks (``--fcp-scheduler``): ``fcp`` (this project) or a baseline
    placement (``ring``, ``hybrid``, ``magi``) run on the same peer-to-peer exchange."""
    backend: str = st.setting(
        default="auto", read=st.choice(BACKENDS), choices=BACKENDS, flag="--fcp-attention-backend",
        key="attention_backend", help="attention kernels: auto picks torch-flash on GPU and cpu on CPU")
    """Attention kernels (``--fcp-attention-backend``): ``auto`` picks ``torch-flash`` on GPU and ``cpu`` on CPU;
    see :mod:`megatron_fcp.kernels`."""
    kv_budget_tokens: int | str | None = st.setting(
        default=DEFAULT_KV_BUDGET, read=st.kv_budget, flag="--fcp-kv-budget-tokens", key="kv_budget_tokens",
        worker_flag="--kv-budget-tokens", metavar="N|auto|none", want="a whole number of tokens >= 1, auto or none",
        help="bounds the key/values a CP rank holds from other ranks in each attention layer: they arrive in stages of "
             "at most N tokens, at most 2 stages are held at once and at most N tokens are kept from forward to "
             "backward (the other stages are fetched again in backward). auto (default): the rank's own tokens, "
             "--seq-length / --context-parallel-size; none: one unbounded stage (everything received is held and "
             "kept)")
    """Key/value tokens received per stage of the exchange (``--fcp-kv-budget-tokens``): a positive number,
    ``auto`` (a rank's own token slots) or None (one unbounded stage). Strings such as ``"4096"`` or ``"none"``
    are parsed on creation."""
    tile_size: int = st.setting(
        default="auto", read=st.tile_size, resolve=_auto_tile, flag=TILE_FLAG, key="edge_cost_tile_size",
        old_flag="--fcp-block-size", metavar="N|auto", want="a whole number of tokens >= 1 or auto",
        help="the attention kernel's tile in tokens, with which the FCP scheduler models the cost of each piece's "
             f"partly filled edge tiles; the planner still cuts documents at any token. 'auto' = {DEFAULT_TILE_SIZE}")
    """The attention kernel's tile in tokens (``--fcp-edge-cost-tile-size``; ``auto``: :data:`DEFAULT_TILE_SIZE`).
    The ``fcp`` scheduler charges each piece the partly filled tiles at its edges with it; it does not round cuts
    to it (pieces start and end at any token)."""
    planning_workers: int = st.setting(
        default=2, read=st.whole_at_least_zero, flag="--fcp-planning-workers", key="planning_workers", flag_type=int,
        want="a whole number >= 0",
        help="data-loader worker processes that plan micro-batches ahead of the step (raises --num-workers to this "
             "if lower; 0 plans in the training process)")
    """Data-loader worker processes that plan micro-batches ahead of the step (``--fcp-planning-workers``;
    0 plans in the training process)."""
    exchange_timeout_s: float | None = st.setting(
        default=None, read=st.optional_seconds, flag=TIMEOUT_FLAG, key="exchange_timeout_s",
        flag_type=parse_exchange_timeout, metavar="SECONDS", want="a number of seconds > 0, or null",
        help="for debugging hangs: give up waiting for a CP peer's key/values after SECONDS and name the silent peer. "
             "Unset (default) or 'none': no timed wait (on NCCL the stream waits, no host synchronisation; a stuck "
             "peer ends in the process group's own timeout). A number makes the CPU poll every exchange round on "
             "NCCL, a host synchronisation per round; it must be below --distributed-timeout-minutes x 60")
    """Debugging hangs (``--fcp-exchange-timeout``): None (default) waits for a CP peer's key/values as torch does
    (on NCCL the stream waits, no host synchronisation; a stuck peer ends in the process group's own timeout); a
    number of seconds makes every wait give up after that long naming the silent peer, at the price of the CPU
    polling each exchange round on NCCL. Must be shorter than ``--distributed-timeout-minutes``."""
    debug_checks: bool = st.setting(
        default=False, read=st.switch, flag="--fcp-debug-checks", key="debug_checks",
        help="check every plan (ownership, delivery, token counts) and every attention input; slow")
    """Check every plan (ownership, delivery, token counts) and every attention input; slow
    (``--fcp-debug-checks``)."""
    ranks_per_node: int | None = st.setting(
        default=None, read=st.optional_positive, flag=RANKS_PER_NODE_FLAG, key="ranks_per_node",
        worker_flag="--ranks-per-node", metavar="N", want="a whole number >= 1, or null",
        help="GPUs (global ranks) per node, not CP ranks per node: each plan records the node of every CP rank "
             "(global rank // N) for the node-aware key/value exchange. Unset (default): torchrun's LOCAL_WORLD_SIZE; "
             "where that is unset too, the whole CP group is taken as one node (pass N with launchers that do not "
             "set LOCAL_WORLD_SIZE, e.g. srun with one task per GPU). N must divide the world size, and every node "
             "must hold the same number of CP ranks; checked at start-up")
    """GPUs (global ranks, processes) per node (``--fcp-ranks-per-node``), from which each plan gets the node of every
    CP rank (:attr:`cp_node`). None: ``LOCAL_WORLD_SIZE`` of the environment (torchrun sets it), and where that is
    unset too, no layout (the whole CP group taken as one node)."""
    node_exchange: str = st.setting(
        default="p2p", read=st.choice(NODE_EXCHANGES), choices=NODE_EXCHANGES, flag="--fcp-node-exchange",
        key="node_exchange", worker_flag="--node-exchange",
        help="how key/values reach the CP ranks of a node: p2p (default), the staged point-to-point exchange between "
             "CP ranks; heads, all-to-alls inside each node give every rank 1/g of the heads of the node's tokens (g: "
             "CP ranks per node, which must divide the attention heads and the query groups) and the staged exchange "
             "runs between nodes, so each key/value crosses into a node once (the planner then plans nodes); auto, "
             "per micro-batch the one whose step the cost model (H100 profile, this model's heads) finds shorter")
    """How key/values reach the CP ranks of a node (``--fcp-node-exchange``, :data:`NODE_EXCHANGES`): ``p2p``,
    ``heads`` (plans are made for the nodes, :attr:`plan_ranks`) or ``auto`` (either, per micro-batch)."""

    def __post_init__(self):
        for name in ("cp", "seq_length"):
            value = getattr(self, name)
            if not st.is_whole(value) or value < 1:
                flag = getattr(FLAG_NAMES, name)
                raise FlagError(flag, f"{flag} must be a whole number >= 1, got {value!r}")
        if self.seq_length % self.cp:
            fits = self.seq_length - self.seq_length % self.cp + self.cp
            raise FlagError("--seq-length", f"--seq-length {self.seq_length} is not a multiple of "
                                            f"--context-parallel-size {self.cp}: each CP rank holds seq_length / cp "
                                            f"tokens (try --seq-length {fits})")
        for name, described in SETTINGS.items():
            object.__setattr__(self, name, _read_field(described, getattr(self, name), name))
        if self.cp_node is not None:
            object.__setattr__(self, "cp_node", tuple(check_cp_node(self.cp_node, self.cp).tolist()))

    @property
    def tokens_per_rank(self) -> int:
        return self.seq_length // self.cp

    @property
    def heads_per_node(self) -> int:
        """Under ``node_exchange`` ``heads`` or ``auto``: the CP ranks of a node, which split the heads when the heads
        exchange runs (the whole CP group where there is no layout); 1 otherwise. Raises :class:`InputError` unless
        every node holds consecutive CP ranks."""
        if self.node_exchange not in HEAD_SPLITTING or self.cp == 1:
            return 1
        if self.cp_node is None:
            return self.cp
        g = self.cp // (max(self.cp_node) + 1)
        if list(self.cp_node) != [r // g for r in range(self.cp)]:
            raise FlagError("--fcp-node-exchange", f"--fcp-node-exchange {self.node_exchange} needs each node to hold "
                                                   f"consecutive CP ranks; the CP ranks lie on nodes "
                                                   f"{list(self.cp_node)}")
        return g

    @property
    def plan_ranks(self) -> int:
        """The ranks a heads-exchange plan is made for: the nodes (each of :attr:`heads_per_node` x
        :attr:`tokens_per_rank` token slots); the CP size where heads are not split."""
        return self.cp // self.heads_per_node

    def heads_split(self, plan_cp: int) -> int:
        """The CP ranks that split the heads of a micro-batch whose plan (or schedule) is over ``plan_cp`` ranks: a plan
        over fewer ranks than the CP group is a plan of the nodes (the heads exchange), each of ``cp / plan_cp`` CP
        ranks; a plan of the CP ranks splits nothing (1). Needs no node layout, so the layer can ask it too."""
        return self.cp // plan_cp if self.node_exchange in HEAD_SPLITTING else 1

    def with_nodes(self, global_ranks, environ: Mapping[str, str] | None = None) -> FcpConfig:
        """This config with :attr:`cp_node` set for the CP group of ``global_ranks`` (by CP rank: Megatron's
        ``parallel_state.get_context_parallel_global_ranks()``), placed on nodes of :attr:`ranks_per_node` global
        ranks, else of ``LOCAL_WORLD_SIZE`` in ``environ`` (default: this process's environment); neither: no layout.
        Raises :class:`InputError` (one line naming where the ranks per node came from) for a layout with unequal
        nodes."""
        per_node, source = resolve_ranks_per_node(self.ranks_per_node, RANKS_PER_NODE_FLAG, environ)
        if per_node is None:
            return dataclasses.replace(self, cp_node=None)
        try:
            nodes = cp_nodes(global_ranks, per_node)
        except InputError as err:
            raise FlagError(RANKS_PER_NODE_FLAG, f"{source} {per_node}: {err}") from None
        return dataclasses.replace(self, cp_node=tuple(nodes.tolist()))


SETTINGS = st.settings_of(FcpConfig)
"""The :class:`Setting` of each field of :class:`FcpConfig`, by field name."""
FLAG_SETTINGS = (MODE, *(x for x in SETTINGS.values() if x.flag), MOCK_DOCLENS)
"""Every FCP flag's setting, in the order ``--help`` lists them."""
CONFIG_SETTINGS = (MODE, *(x for x in SETTINGS.values() if x.key))
"""The settings of the launch config's ``context_parallel`` section, in key order."""


def _read_field(described: Setting, value, name: str):
    """An :class:`FcpConfig` field's value as FCP reads it; :class:`FlagError` naming its flag if it is wrong."""
    label = described.flag or name
    try:
        value = described.read(value, label)
    except InputError as err:
        raise FlagError(label, str(err)) from None
    return described.resolve(value) if described.resolve else value


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


def _add_flag(group, described: Setting) -> None:
    """``described``'s flag (and its deprecated name, if any) in ``group``."""
    if described.switch:
        group.add_argument(described.flag, action="store_true", help=described.help)
        return
    group.add_argument(described.flag, default=described.default, choices=described.choices,
                       type=described.flag_type, metavar=described.metavar, help=described.help)
    if described.old_flag:
        group.add_argument(described.old_flag, dest=described.dest, action=_DeprecatedAlias, new_flag=described.flag,
                           metavar=described.metavar, help=f"deprecated name of {described.flag}")


def add_fcp_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron ``extra_args_provider``: ``--context-parallel-mode`` and the ``--fcp-*`` options (one per setting
    in :data:`FLAG_SETTINGS`)."""
    group = parser.add_argument_group(title="megatron-fcp")
    for described in FLAG_SETTINGS:
        _add_flag(group, described)
    return parser


def fcp_config_from_args(args) -> FcpConfig:
    """The :class:`FcpConfig` of Megatron's parsed namespace (raises :class:`InputError` naming a bad flag); a flag
    missing from the namespace takes its default."""
    values = {name: getattr(args, x.dest, x.default) for name, x in SETTINGS.items() if x.flag}
    cp = int(getattr(args, "context_parallel_size", 1) or 1)
    return FcpConfig(cp=cp, seq_length=getattr(args, "seq_length", None), attention_shape=_attention_shape(args),
                     **values)


def _attention_shape(args) -> tuple[int, int, int] | None:
    """One rank's (query heads, key/value heads, head dimension) from Megatron's model flags, or None where they are
    missing or do not divide by the tensor-parallel size (the start-up checks report that)."""
    heads, hidden = getattr(args, "num_attention_heads", None), getattr(args, "hidden_size", None)
    groups = getattr(args, "num_query_groups", None) if getattr(args, "group_query_attention", False) else heads
    tp = int(getattr(args, "tensor_model_parallel_size", 1) or 1)
    if not heads or not groups or heads % tp or groups % tp:
        return None
    dim = getattr(args, "kv_channels", None) or (hidden // heads if hidden else None)
    return (heads // tp, groups // tp, int(dim)) if dim else None


# -- Megatron settings FCP depends on ---------------------------------------------------------------------------
Problem = tuple[str, str]
"""``(name, one-line message)``: the flag (or config key) a problem is about, and what is wrong and what to do."""


@dataclass(frozen=True)
class Names:
    """What the settings the layout rules read are called where they were given: Megatron's flags
    (:data:`FLAG_NAMES`) or the launch config's keys. Each rule below takes plain values and these names, so the
    entry point and the launch config run the same rules and each says them in its own terms."""

    cp: str
    tp: str
    pp: str
    seq_length: str
    micro_batch_size: str
    global_batch_size: str
    heads: str
    query_groups: str
    sequence_parallel: str
    exchange_timeout: str
    distributed_timeout: str


FLAG_NAMES = Names(cp="--context-parallel-size", tp="--tensor-model-parallel-size", pp="--pipeline-model-parallel-size",
                   seq_length="--seq-length", micro_batch_size="--micro-batch-size",
                   global_batch_size="--global-batch-size", heads="--num-attention-heads",
                   query_groups="--num-query-groups", sequence_parallel="--sequence-parallel",
                   exchange_timeout=TIMEOUT_FLAG, distributed_timeout="--distributed-timeout-minutes")


def layout_problem(world_size: int, tp: int, pp: int, cp: int, names: Names,
                   processes: str = "launched processes") -> Problem | None:
    """The parallel layout: tensor x pipeline x context sizes must divide the processes (the rest is data
    parallel). ``processes`` says what the ``world_size`` processes are."""
    model_parallel = tp * pp * cp
    if world_size % model_parallel == 0:
        return None
    room = world_size // (tp * pp) if world_size % (tp * pp) == 0 else 0
    if room:
        fits = max(d for d in range(1, cp + 1) if room % d == 0)
        fix = f"use a {names.cp} that divides {room}, e.g. {fits}"
    else:
        fix = f"{names.tp} x {names.pp} = {tp * pp} alone does not divide them; change {names.tp} or {names.pp}"
    return names.cp, (f"{names.tp} {tp} x {names.pp} {pp} x {names.cp} {cp} = {model_parallel} does not divide the "
                      f"{world_size} {processes}; {fix}")


def pipeline_problem(pp: int, names: Names) -> Problem | None:
    if pp == 1:
        return None
    return names.pp, (f"FCP does not support pipeline parallelism yet ({names.pp} {pp}); use {names.pp} 1 with "
                      "tensor, data and context parallelism")


def micro_batch_problem(micro_batch_size: int, names: Names) -> Problem | None:
    if micro_batch_size == 1:
        return None
    return names.micro_batch_size, (f"FCP packs one micro-batch of {names.seq_length} tokens over the CP group; use "
                                    f"{names.micro_batch_size} 1 (got {micro_batch_size}) and more micro-batches per "
                                    f"step via {names.global_batch_size}")


def sequence_problem(seq: int, cp: int, tp: int, sequence_parallel: bool, names: Names) -> Problem | None:
    """``seq`` tokens split into whole CP-rank shares (Megatron's own rule with CP > 1: a multiple of 2 x cp), each
    split evenly over TP ranks with sequence parallelism."""
    unit = 2 * cp if cp > 1 else 1  # Megatron's own rule for CP > 1 (validate_args); FCP needs seq_length / cp
    if seq % unit:
        why = " x 2, which Megatron requires with CP" if cp > 1 else ""
        return names.seq_length, (f"{names.seq_length} {seq} is not a multiple of {names.cp} {cp}{why} (try "
                                  f"{names.seq_length} {seq - seq % unit + unit})")
    if sequence_parallel and (seq // cp) % tp:
        return names.seq_length, (f"with {names.sequence_parallel} each CP rank's {seq // cp} tokens must split "
                                  f"evenly over {names.tp} {tp}; pick {names.seq_length} a multiple of "
                                  f"{math.lcm(unit, cp * tp)}")
    return None


def heads_problem(heads: int, groups: int, tp: int, names: Names) -> Problem | None:
    """Grouped-query heads: whole query groups, and whole heads and groups on each TP rank."""
    if groups < 1 or heads % groups:
        return names.heads, (f"{names.heads} {heads} is not a multiple of {names.query_groups} {groups}; "
                             "grouped-query attention needs heads % query groups == 0")
    if heads % tp or groups % tp:
        return names.heads, (f"{names.heads} {heads} and {names.query_groups} {groups} must both divide by "
                             f"{names.tp} {tp} (each TP rank holds whole heads)")
    return None


def exchange_timeout_problem(timeout_s, minutes, names: Names) -> Problem | None:
    """A timed FCP wait must end before the process group's own timeout (``minutes``; None: Megatron's default), or
    it never names the silent peer."""
    if not st.is_positive_seconds(timeout_s):
        return None  # unset: no timed wait; a bad value is the setting's own problem
    minutes = minutes or DEFAULT_DISTRIBUTED_TIMEOUT_MINUTES
    limit_s = minutes * 60
    if timeout_s < limit_s:
        return None
    t, d = names.exchange_timeout, names.distributed_timeout
    return t, (f"{t} {timeout_s:g} s is not shorter than {d} {minutes:g} ({limit_s:g} s), so the process group would "
               f"abort before FCP names the silent peer; pass {t} {limit_s / 2:g} (below {limit_s:g}), raise {d} to "
               f"{math.floor(timeout_s / 60) + 1} or more, or leave {t} unset (no timed wait)")


def resolve_ranks_per_node(value: int | None, name: str,
                           environ: Mapping[str, str] | None = None) -> tuple[int | None, str]:
    """Global ranks (GPUs, processes) per node and what gave the number: ``value`` (the setting as read, given under
    ``name``), else :data:`LOCAL_WORLD_SIZE` of ``environ`` (default: this process's environment; torchrun sets it),
    else ``(None, "")``: no layout, the whole CP group taken as one node. Raises :class:`InputError` for a
    ``LOCAL_WORLD_SIZE`` that is not a whole number >= 1."""
    if value is not None:
        return value, name
    text = (os.environ if environ is None else environ).get(LOCAL_WORLD_SIZE, "").strip()
    if not text:
        return None, ""
    try:
        per_node = int(text)
    except ValueError:
        per_node = 0
    if per_node < 1:
        raise InputError(f"{LOCAL_WORLD_SIZE}={text!r} in the environment is not a whole number >= 1; set it to the "
                         f"processes (GPUs) of each node, as torchrun does, or pass {name} N")
    return per_node, LOCAL_WORLD_SIZE


def megatron_cp_groups(world_size: int, tp: int, cp: int) -> np.ndarray:
    """int64 ``[world_size // cp, cp]``: the global ranks of every CP group, each ordered by CP rank, as Megatron
    makes them (order ``tp-cp-ep-dp-pp``, TP fastest: each block of ``tp x cp`` consecutive ranks holds ``tp`` CP
    groups, whose members are ``tp`` apart). ``tp x cp`` must divide ``world_size``."""
    block_starts = np.arange(world_size // (tp * cp), dtype=np.int64) * (tp * cp)
    group_starts = (block_starts[:, None] + np.arange(tp)).reshape(-1)
    return group_starts[:, None] + tp * np.arange(cp)


def ranks_per_node_problem(world_size: int, tp: int, cp: int, ranks_per_node: int | None, source: str,
                           processes: str = "launched processes") -> str | None:
    """The problem of placing the ``world_size`` processes on nodes of ``ranks_per_node`` (given under ``source``):
    it must divide them, and every node must hold the same number of ranks of each CP group (Megatron's groups,
    :func:`megatron_cp_groups`); None when it fits, when no number is given, or when ``tp x cp`` does not divide the
    processes (the layout rule's problem). A message (one line, starting with ``source``), not a :data:`Problem`:
    each caller reports it under its own name."""
    if ranks_per_node is None or world_size % (tp * cp):
        return None
    if world_size % ranks_per_node:
        return (f"{source} {ranks_per_node} does not divide the {world_size} {processes}; give the processes (GPUs) "
                "of each node")
    if cp == 1:
        return None
    groups = megatron_cp_groups(world_size, tp, cp)
    # groups laid out alike over their nodes give the same layout: check one of each pattern
    patterns = groups - (groups[:, :1] // ranks_per_node) * ranks_per_node
    _, first = np.unique(patterns, axis=0, return_index=True)
    for group in groups[np.sort(first)]:
        try:
            cp_nodes(group, ranks_per_node)
        except InputError as err:
            return f"{source} {ranks_per_node}: {err}"
    return None


def _get(args, name, default=None):
    return getattr(args, name, default)


def _sizes(args) -> tuple[int, int, int]:
    """``(cp, tp, pp)`` of the namespace."""
    return tuple(int(_get(args, f"{name}_parallel_size", 1) or 1)
                 for name in ("context", "tensor_model", "pipeline_model"))


def _pipeline_problem(args, world_size: int) -> Problem | None:
    return pipeline_problem(_sizes(args)[2], FLAG_NAMES)


def _layout_problem(args, world_size: int) -> Problem | None:
    cp, tp, pp = _sizes(args)
    return layout_problem(world_size, tp, pp, cp, FLAG_NAMES)


def _loss_problem(args, world_size: int) -> Problem | None:
    if not _get(args, "calculate_per_token_loss", False):
        return ("--calculate-per-token-loss",
                "FCP gives CP ranks different numbers of loss tokens, so the loss must be reduced per token: add "
                "--calculate-per-token-loss")
    return None


def _micro_batch_problem(args, world_size: int) -> Problem | None:
    return micro_batch_problem(int(_get(args, "micro_batch_size", 1) or 1), FLAG_NAMES)


def _sequence_problem(args, world_size: int) -> Problem | None:
    cp, tp, _ = _sizes(args)
    seq = _get(args, "seq_length")
    if seq is None or seq < 1:
        return "--seq-length", "FCP needs --seq-length (tokens of one packed micro-batch over the whole CP group)"
    return sequence_problem(seq, cp, tp, bool(_get(args, "sequence_parallel", False)), FLAG_NAMES)


def _heads_problem(args, world_size: int) -> Problem | None:
    heads = _get(args, "num_attention_heads")
    groups = _get(args, "num_query_groups") if _get(args, "group_query_attention", False) else heads
    if heads is None or groups is None:
        return None
    return heads_problem(heads, groups, _sizes(args)[1], FLAG_NAMES)


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
        if not _get(args, MOCK_DOCLENS.dest):
            return ("--fcp-mock-doclens", "with --mock-data, FCP needs documents: add --fcp-mock-doclens NAME|FILE "
                                          "(linux_files, linux_dirs, spamassassin, magi_hist, or a file of one "
                                          "length per line)")
    elif not _get(args, "reset_position_ids", False):
        return ("--reset-position-ids", "FCP needs document boundaries in the data: add --reset-position-ids (and "
                                        "--reset-attention-mask --eod-mask-loss as usual), so each document starts "
                                        "at position 0")
    return None


def _exchange_timeout_problem(args, world_size: int) -> Problem | None:
    timeout_s = _get(args, SETTINGS["exchange_timeout_s"].dest)
    return exchange_timeout_problem(timeout_s, _get(args, "distributed_timeout_minutes"), FLAG_NAMES)


def _ranks_per_node_problem(args, world_size: int) -> Problem | None:
    described = SETTINGS["ranks_per_node"]
    try:
        value = described.read(_get(args, described.dest), described.flag)
    except InputError:
        return None  # the setting's own problem (FcpConfig reports it)
    try:
        per_node, source = resolve_ranks_per_node(value, described.flag)
    except InputError as err:
        return described.flag, str(err)
    cp, tp, _ = _sizes(args)
    problem = ranks_per_node_problem(world_size, tp, cp, per_node, source)
    if problem and source == LOCAL_WORLD_SIZE:
        problem += f" (read from the environment; {described.flag} N overrides it)"
    return (described.flag, problem) if problem else None


def node_exchange_problem(exchange: str, heads: int, groups: int, tp: int, cp: int,
                          ranks_per_node: int | None) -> str | None:
    """Why ``--fcp-node-exchange heads`` (or ``auto``) cannot split the heads of CP groups laid out on nodes of
    ``ranks_per_node`` global ranks (None: one node), or None: each rank's share of the heads (``heads / tp``,
    ``groups / tp``) must divide by the CP ranks of a node (Megatron orders ranks tp-cp-...: a CP group's ranks are
    ``tp`` apart)."""
    if exchange not in HEAD_SPLITTING or cp == 1:
        return None
    cp_ranks = [r * tp for r in range(cp)]
    per_node = cp if ranks_per_node is None else sum(r // ranks_per_node == 0 for r in cp_ranks)
    for what, count in (("attention heads", heads), ("query groups", groups)):
        if (count // tp) % per_node:
            return (f"--fcp-node-exchange {exchange} splits each rank's {what} over the {per_node} CP ranks of a "
                    f"node, but a rank has {count // tp} ({count} over tensor-parallel size {tp}); use "
                    "--fcp-node-exchange p2p or a layout whose nodes hold a divisor of them")
    return None


def _node_exchange_problem(args, world_size: int) -> Problem | None:
    described = SETTINGS["node_exchange"]
    try:
        exchange = described.read(_get(args, described.dest, described.default), described.flag)
        per_node, _ = resolve_ranks_per_node(SETTINGS["ranks_per_node"].read(
            _get(args, SETTINGS["ranks_per_node"].dest), SETTINGS["ranks_per_node"].flag), RANKS_PER_NODE_FLAG)
    except InputError:
        return None  # the settings' own problems (FcpConfig, _ranks_per_node_problem) report them
    heads = _get(args, "num_attention_heads")
    groups = _get(args, "num_query_groups") if _get(args, "group_query_attention", False) else heads
    if heads is None or groups is None:
        return None
    cp, tp, _ = _sizes(args)
    problem = node_exchange_problem(exchange, heads, groups, tp, cp, per_node)
    return (described.flag, problem) if problem else None


_MEGATRON_CHECKS = (_pipeline_problem, _layout_problem, _loss_problem, _micro_batch_problem, _sequence_problem,
                    _heads_problem, _attention_problem, _data_problem, _exchange_timeout_problem,
                    _ranks_per_node_problem, _node_exchange_problem)
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
    backend = _get(args, SETTINGS["backend"].dest, SETTINGS["backend"].default)
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
    if _get(args, MODE.dest, MODE.default) != "fcp":
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
