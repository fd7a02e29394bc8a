"""Modeled attention cost of a plan on a hardware profile: compute, communication, overlap, memory, MFU.

Every figure here is *modeled*, not measured. The model, per attention layer, forward plus backward:

- Kernel work of one kernel sequence (a query range against a contiguous set of keys) is counted in
  effective pairs: ``pairs + tile/2 * (q + k) + tile**2 / 4``: the exact query-key pairs plus the partly
  filled tiles at the edges, so tiny pieces cost more per pair than large ones (FlashAttention computes whole
  ``tile x tile`` blocks). Forward FLOPs per pair are ``4 * heads * head_dim``; backward does
  ``bwd_flops_factor`` times that; each runs at its modeled fraction of peak. Each kernel call adds a launch.
- Key/value bytes are ``2 * kv_heads * head_dim * bytes_per_element`` per token
  (:attr:`HardwareProfile.kv_bytes_per_token`; key/value gradients travel in the same dtype, so the same bytes).
  A transfer runs at NVLink speed between GPUs of one node and InfiniBand speed across nodes, plus a latency
  per peer; a rank's NVLink and InfiniBand traffic of one round run at the same time (the slower one counts).

``p2p`` plans (FCP, MagiAttention-style, no CP) follow the engine's staged exchange
(:mod:`megatron_fcp.planner.stages`, :mod:`megatron_fcp.attention.engine`). A rank receiving ``R`` tokens under
a budget of ``B`` tokens per stage has ``n = ceil(R / B)`` stages (one without a budget); forward round ``j``
brings stage ``j``, the last stage is kept, backward round ``t`` fetches stage ``n - 1 - t`` again (``t >= 1``)
and sends that stage's key/value gradients back to their owners. Per rank:

- ``c_j`` / ``c'_j``: forward / backward seconds of stage ``j``, one kernel call: every query row of the rank
  against the stage's keys of its document that it sees (causal: pieces ending at or before the row's start),
  effective pairs per (row, stage), plus one launch. ``L`` / ``L'``: the local (own-key) calls, with their
  launches (one, plus one under a causal mask where a row sees earlier own rows).
- ``comm_j``: the slower of the rank's receive of stage ``j`` (NVLink and InfiniBand bytes, each at its rate)
  and every sender's sends of round ``j`` (all its destinations), plus a latency per sender. Backward refetch
  rounds the same for the stage fetched again. ``gcomm_t``: the slower of sending stage ``n - 1 - t``'s
  gradients back and receiving the gradients of own key/values that come back in round ``t``, plus a latency
  per peer.
- forward: ``a_0 = comm_0; f = L``; for ``j = 0..n-1``: ``s = max(f, a_j); a_{j+1} = s + comm_{j+1};
  f = s + c_j``; ``fwd = f``.
- backward (stages ``n-1, ..., 0`` in rounds ``t = 0..n-1``): ``a_1 = refetch_1`` (posted at 0), ``f = g = 0``;
  ``s = max(f, a_t)`` (``s = 0`` at ``t = 0``: the kept stage); ``a_{t+1} = s + refetch_{t+1}``;
  ``f = max(s + c'_{n-1-t}, g)`` (the previous gradient round travels during the compute);
  ``g = f + gcomm_t``; ``bwd = max(f + L', g)``.
- With one stage this is ``fwd = max(L, comm) + c`` and ``bwd = c' + max(L', gcomm)``. A rank does not wait
  for its senders' compute (only for their links).

``ring`` plans (Transformer Engine): ``cp`` lockstep steps; each step overlaps one ring transfer with one step of
compute, and the slowest rank and the slowest link set every step. Backward moves key/values and their
gradients. ``group_ring`` plans (Megatron hybrid CP): a ring per document inside its group, documents one after
another; groups larger than a node step at InfiniBand speed. Neither is staged by the budget.

Memory (:func:`plan_memory`, per rank and layer, in key/value tokens; bytes = tokens x ``kv_bytes_per_token``;
``own`` = the rank's token slots ``T``):

- ``p2p``, receiving ``R``: peak remote key/values held at once ``min(R, 2B)``, kept for backward ``min(R, B)``,
  fetched again in backward ``max(R - B, 0)``; gradients: the largest stage (computed, then sent back), and the
  most own-key/value gradients returned in one round (:func:`megatron_fcp.planner.stages.p2p_memory`).
- ``ring``: ``recv = refetch = (cp - 1) T``, ``peak = min(cp - 1, 2) T`` (two blocks in flight), kept ``0``,
  gradient peak ``min(cp - 1, 2) T`` (dK/dV travel the ring with them), returned ``0``, ``cp - 1`` steps.
- ``group_ring``: per document the rank holds with a group of ``g > 1`` ranks, ``chunk`` = its tokens of it:
  ``peak = max_doc min(g - 1, 2) chunk`` (gradient peak the same), ``recv = refetch = sum_doc (g - 1) chunk``,
  kept ``0``, returned ``0``, ``max(g - 1)`` steps.

Bytes moved per rank and layer: forward receive + backward refetch + key/value gradients sent back (for ring
``3 (cp - 1) T``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from megatron_fcp.errors import InputError
from megatron_fcp.planner.columns import Piece, Q, Transfer
from megatron_fcp.planner.pairs import arange_within, block_pairs, edge_pairs, matching_rows, q_pairs
from megatron_fcp.planner.plan import Plan
from megatron_fcp.planner.relay import all_transfers
from megatron_fcp.planner.stages import (
    DEFAULT_KV_BUDGET,
    MEMORY_FIELDS,
    p2p_memory,
    resolve_kv_budget,
    split_stages,
)
from megatron_fcp.sim.calibration import KernelLaw, law_seconds, laws_from_yaml


@dataclass(frozen=True, kw_only=True)
class HardwareProfile:
    """A GPU node and the attention layer being modeled (see megatron_fcp/data/hardware/*.yaml for sources)."""

    name: str
    gpus_per_node: int
    peak_bf16_dense_tflops: float
    attention_fwd_efficiency: float
    attention_bwd_efficiency: float
    bwd_flops_factor: float
    nvlink_gbps_per_direction: float
    nvlink_efficiency: float
    ib_gbps_per_direction: float
    ib_efficiency: float
    p2p_latency_us: float
    kernel_launch_us: float
    tile_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    bytes_per_element: int
    kernel_laws: str | None = None
    """Calibration file of kernel time laws (:mod:`megatron_fcp.sim.calibration`), by name in the shipped
    folder or a path; used in place of the fixed efficiencies (launch and tile stay). None: fixed efficiencies."""
    laws: dict[tuple[str, str], KernelLaw] | None = field(default=None, compare=False, repr=False)
    """The loaded laws of ``kernel_laws`` (set by :func:`load_hardware`)."""

    @property
    def fwd_flops_per_pair(self) -> float:
        return 4.0 * self.num_heads * self.head_dim

    @property
    def kv_bytes_per_token(self) -> float:
        """Bytes of one key/value token (one K row and one V row of every key/value head): ``2 * kv_heads *
        head_dim * bytes_per_element``. Multiply any ``*_kv_tokens`` figure of :func:`plan_memory` by it."""
        return 2.0 * self.num_kv_heads * self.head_dim * self.bytes_per_element

    def seconds_fwd(self, eff_pairs):
        flops = eff_pairs * self.fwd_flops_per_pair
        return flops / (self.peak_bf16_dense_tflops * 1e12 * self.attention_fwd_efficiency)

    def seconds_bwd(self, eff_pairs):
        flops = eff_pairs * self.fwd_flops_per_pair * self.bwd_flops_factor
        return flops / (self.peak_bf16_dense_tflops * 1e12 * self.attention_bwd_efficiency)

    def call_seconds(self, pass_: str, mask: str, eff_pairs, rows, calls):
        """Seconds of kernel calls of one pass (``fwd``/``bwd``) and mask (``causal`` diagonal or ``full``):
        ``calls`` launches plus the work ``eff_pairs`` (exact pairs and edge tiles) over ``rows`` query rows, at
        the fixed efficiencies or, with :attr:`laws`, at the calibrated law of that pass and mask."""
        launch = self.kernel_launch_us * 1e-6 * np.asarray(calls, dtype=np.float64)
        if self.laws is None:
            return (self.seconds_fwd(eff_pairs) if pass_ == "fwd" else self.seconds_bwd(eff_pairs)) + launch
        return law_seconds(self.laws[pass_, mask], pass_, eff_pairs, rows, self.fwd_flops_per_pair,
                           self.peak_bf16_dense_tflops, 0.0) + launch

    def seconds_transfer(self, num_bytes, inter_node: bool):
        bw = self.ib_gbps_per_direction * self.ib_efficiency if inter_node else \
            self.nvlink_gbps_per_direction * self.nvlink_efficiency
        return num_bytes / (bw * 1e9)


HARDWARE = ("h100_node", "h200_node", "h100_node_fa2_published", "h200_node_fa2_published",
            "h100_node_fa3_published")
OPTIONAL_FIELDS = ("kernel_laws",)


def _shipped(folder: str, name: str) -> str:
    """A shipped YAML file: ``hardware`` (profiles) or ``kernel_laws`` (fitted kernel time laws)."""
    return (resources.files("megatron_fcp") / "data" / folder / f"{name}.yaml").read_text()


def node_layout(cp: int, hw: HardwareProfile) -> np.ndarray | None:
    """The node of each CP rank on the profile's nodes (``gpus_per_node`` consecutive ranks each), as the runtime
    reads it (``--fcp-ranks-per-node``, ``LOCAL_WORLD_SIZE``); None where the group fits one node."""
    return np.arange(cp) // hw.gpus_per_node if cp > hw.gpus_per_node else None


def load_hardware(name_or_path: str | Path = "h100_node") -> HardwareProfile:
    """Load a shipped profile by name (:data:`HARDWARE`) or a YAML file of the same fields. ``kernel_laws`` names
    a shipped calibration file or a path (relative to the profile's folder)."""
    folder = None
    if isinstance(name_or_path, str) and name_or_path in HARDWARE:
        text = _shipped("hardware", name_or_path)
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise InputError(f"hardware profile {str(name_or_path)!r} is neither a shipped profile "
                             f"({', '.join(HARDWARE)}) nor an existing file; pass one of those names or a YAML file")
        text, folder = path.read_text(), path.parent
    raw = yaml.safe_load(text)
    if isinstance(raw, dict) and {"kernel", "laws"} <= raw.keys():
        raise InputError(f"{name_or_path} is a kernel-law file, not a hardware profile; name it in a profile's "
                         f"kernel_laws field, or pass a profile ({', '.join(HARDWARE)}) or a profile YAML")
    flat = {k: v for k, v in raw.items() if k != "model"} | dict(raw.get("model", {}))
    names = {f.name for f in fields(HardwareProfile)} - {"laws"}
    missing, unknown = names - flat.keys() - set(OPTIONAL_FIELDS), flat.keys() - names
    if missing or unknown:
        raise InputError(
            f"hardware profile {name_or_path}: missing fields {sorted(missing)}, unknown fields {sorted(unknown)}"
        )
    laws_name = flat.get("kernel_laws")
    if laws_name:
        candidates = [] if folder is None else [folder / laws_name, folder / f"{laws_name}.yaml"]
        local = next((path for path in candidates if path.is_file()), None)
        if local is not None:
            laws_text = local.read_text()
        else:
            try:
                laws_text = _shipped("kernel_laws", laws_name)
            except FileNotFoundError:
                raise InputError(f"hardware profile {name_or_path}: kernel_laws {laws_name!r} is neither a shipped "
                                 "calibration (megatron_fcp/data/kernel_laws) nor a file next to the profile") from None
        flat["laws"] = laws_from_yaml(laws_text)
    return HardwareProfile(**flat)


@dataclass(frozen=True)
class PlanCost:
    """Per-rank modeled figures of one plan (arrays of shape ``[cp]``) and the step they add up to."""

    pairs: np.ndarray
    """Exact query-key pairs each rank computes."""
    compute_s: np.ndarray
    """Modeled kernel seconds (forward + backward, launches included), communication excluded."""
    recv_bytes: np.ndarray
    """Key/value bytes received in forward."""
    step_s: np.ndarray
    """Modeled attention seconds per rank (forward + backward, with overlap)."""
    bwd_bytes: np.ndarray
    """Key/value bytes moved in backward: fetched again plus key/value gradients sent back to their owners."""
    memory: dict
    """Per-rank key/value memory in tokens (:func:`plan_memory`, keys ``MEMORY_FIELDS``)."""
    kv_budget_tokens: int | None
    """Tokens per stage the figures assume (resolved; None: one stage). Ring and hybrid are not staged."""

    @property
    def step_time_s(self) -> float:
        return float(self.step_s.max())

    @property
    def moved_bytes(self) -> np.ndarray:
        """Key/value bytes each rank moves in forward and backward (receive, refetch, gradients sent back)."""
        return self.recv_bytes + self.bwd_bytes


def evaluate(plan: Plan, hw: HardwareProfile, kv_budget_tokens=DEFAULT_KV_BUDGET) -> PlanCost:
    """Model one plan on ``hw``; point-to-point plans under a key/value budget per stage (a setting as for
    :func:`megatron_fcp.planner.stages.parse_kv_budget`: tokens, ``"auto"`` or None)."""
    budget = resolve_kv_budget(kv_budget_tokens, int(plan.num_tokens.max(initial=1)))
    pairs = plan.rank_pairs()
    if plan.exchange == "ring":
        compute, step = _ring_cost(plan, hw, pairs)
    elif plan.exchange == "group_ring":
        compute, step = _group_ring_cost(plan, hw)
    else:
        compute, step = _p2p_cost(plan, hw, budget)
    memory = plan_memory(plan, budget)
    recv = plan.recv_tokens * hw.kv_bytes_per_token
    bwd = (memory["refetch_kv_tokens"] + memory["recv_kv_tokens"]) * hw.kv_bytes_per_token
    return PlanCost(pairs=pairs, compute_s=compute, recv_bytes=recv.astype(np.float64), step_s=step,
                    bwd_bytes=bwd.astype(np.float64), memory=memory, kv_budget_tokens=budget)


def plan_memory(plan: Plan, kv_budget_tokens=DEFAULT_KV_BUDGET) -> dict[str, np.ndarray]:
    """Per-rank key/value memory and traffic of a plan in tokens (int64 ``[cp]`` per ``MEMORY_FIELDS`` name; see
    the module docstring). The budget (tokens per stage, ``"auto"``: the rank's token slots, None: one stage)
    stages point-to-point plans only; ring and hybrid keep their own schedules."""
    cp, own = plan.cp, plan.num_tokens.astype(np.int64)
    if plan.exchange == "p2p":
        return p2p_memory(own, plan.pieces, kv_budget_tokens)
    if plan.exchange == "ring":
        steps = cp - 1
        recv = steps * own
        held = min(steps, 2) * own
        zero = np.zeros(cp, np.int64)
        out = {"own_kv_tokens": own.copy(), "recv_kv_tokens": recv, "num_stages": np.full(cp, steps, np.int64),
               "peak_remote_kv_tokens": held, "saved_remote_kv_tokens": zero, "refetch_kv_tokens": recv.copy(),
               "peak_grad_tokens": held.copy(), "peak_returned_grad_tokens": zero.copy()}
        return {k: out[k] for k in MEMORY_FIELDS}
    return _group_ring_memory(plan)


def _group_ring_memory(plan: Plan) -> dict[str, np.ndarray]:
    q, cp = plan.q, plan.cp
    rank_doc, inv = np.unique(q[:, [Q.CP_RANK, Q.DOC]], axis=0, return_inverse=True)
    rank, doc = rank_doc.T
    chunk = np.bincount(inv.reshape(-1), weights=q[:, Q.END] - q[:, Q.START], minlength=rank_doc.shape[0])
    chunk = chunk.astype(np.int64)
    group = np.bincount(doc, minlength=plan.doc_lens.shape[0])[doc]
    ring = group > 1
    held = np.where(ring, np.minimum(group - 1, 2) * chunk, 0)
    recv = np.bincount(rank, weights=np.where(ring, (group - 1) * chunk, 0), minlength=cp).astype(np.int64)
    peak = np.zeros(cp, np.int64)
    np.maximum.at(peak, rank, held)
    steps = np.zeros(cp, np.int64)
    np.maximum.at(steps, rank, np.where(ring, group - 1, 0))
    zero = np.zeros(cp, np.int64)
    return {"own_kv_tokens": plan.num_tokens.astype(np.int64), "recv_kv_tokens": recv, "num_stages": steps,
            "peak_remote_kv_tokens": peak, "saved_remote_kv_tokens": zero, "refetch_kv_tokens": recv.copy(),
            "peak_grad_tokens": peak.copy(), "peak_returned_grad_tokens": zero.copy()}


def useful_flops(plan: Plan, hw: HardwareProfile, pairs: np.ndarray | None = None) -> float:
    """FLOPs of the exact attention pairs (``plan.rank_pairs()`` unless given), forward plus backward (the
    numerator of MFU)."""
    pairs = plan.rank_pairs() if pairs is None else pairs
    return float(pairs.sum()) * hw.fwd_flops_per_pair * (1.0 + hw.bwd_flops_factor)


def mfu(plan: Plan, hw: HardwareProfile, cost: PlanCost) -> float:
    """Modeled attention MFU: useful FLOPs over ``cp`` GPUs' peak during the modeled step."""
    return useful_flops(plan, hw, cost.pairs) / (plan.cp * hw.peak_bf16_dense_tflops * 1e12 * cost.step_time_s)


def _eff_pairs(pairs, q_tokens, k_tokens, tile: int):
    """Effective pairs of kernel sequences: exact pairs plus partly filled edge tiles (zero where no pairs)."""
    return np.where(pairs > 0, pairs + edge_pairs(q_tokens + k_tokens, 1, tile), 0.0)


# -- point-to-point (FCP, MagiAttention-style, no CP): the staged exchange ---------------------------------------
def _local_split(plan: Plan) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per q row: pairs against the rank's own keys, own key tokens it sees, all pairs it computes, and the pairs
    against the rank's *other* own rows of the document (under a causal mask the ``earlier`` kernel call)."""
    q = plan.q
    rank, doc, start, end = q.T
    lens = plan.doc_lens[doc]
    total = q_pairs(start, end, lens, plan.mask)
    order = np.lexsort((doc, rank))
    key = rank[order] * plan.doc_lens.shape[0] + doc[order]  # one key per (rank, document)
    starts = np.concatenate([[True], key[1:] != key[:-1]])
    group_id = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    size = np.bincount(group_id)
    reps = size[group_id]
    i = np.repeat(order, reps)
    j = order[np.repeat(first[group_id], reps) + arange_within(reps)]
    pair_ij = block_pairs(start[i], end[i], start[j], end[j], plan.mask)
    local = np.bincount(i, weights=pair_ij, minlength=q.shape[0])
    seen = np.where(pair_ij > 0, end[j] - start[j], 0)
    local_keys = np.bincount(i, weights=seen, minlength=q.shape[0])
    other = np.bincount(i, weights=np.where(i != j, pair_ij, 0), minlength=q.shape[0])
    return local, local_keys, total, other


@dataclass(frozen=True)
class StagedExchange:
    """What the staged exchange of a point-to-point plan computes and moves, per rank and round (arrays
    ``[cp, rounds]``, ``rounds`` the most stages of any rank). Forward round ``j`` brings stage ``j``; backward
    round ``t`` handles the rank's stage ``n - 1 - t``. Times exclude kernel launches."""

    budget: int | None
    """Tokens per stage (resolved; None: one stage)."""
    num_stages: np.ndarray
    """int64 ``[cp]``: stages of each rank."""
    pairs: np.ndarray
    """Exact pairs of the rank's queries against stage ``j``."""
    eff_pairs: np.ndarray
    """Effective pairs of stage ``j`` (edge tiles counted per query row and stage); one kernel call where > 0."""
    fwd_comm_s: np.ndarray
    """Forward round ``j``: from its post until stage ``j`` is in."""
    refetch_comm_s: np.ndarray
    """Backward round ``t``: from its post until stage ``n - 1 - t`` is in again (round 0: the kept stage, 0)."""
    grad_comm_s: np.ndarray
    """Backward round ``t``: sending stage ``n - 1 - t``'s key/value gradients to their owners and receiving the
    gradients of own key/values that come back in the round."""
    rows: np.ndarray | None = None
    """Query rows of the rank that compute against stage ``j`` (the kernel call's query tokens; needed with
    kernel laws only)."""
    fwd_hop_s: np.ndarray | None = None
    """With the same-round hop (:func:`megatron_fcp.planner.relay.relay_transfers` ``hop=True``): forward round
    ``j``'s second phase, from its post (once the rank's and its landers' first phases are in) until it is through
    (a lander's sends and a node-mate's receives over NVLink); None: no second phase."""
    refetch_hop_s: np.ndarray | None = None
    """The same for the refetch of backward round ``t``."""
    fwd_landers: tuple | None = None
    """Per forward round: ``(lander, receiver)`` int64 arrays of the round's hops (a receiver's second phase starts
    once its landers' first phases are in)."""
    refetch_landers: tuple | None = None
    """The same per backward round (refetch)."""


COMM_FIELDS = ("fwd_comm_s", "refetch_comm_s", "grad_comm_s", "fwd_hop_s", "refetch_hop_s")
"""The :class:`StagedExchange` fields that time transfers (the hop's are None without it)."""


def free_transfers(x: StagedExchange) -> StagedExchange:
    """``x`` with every transfer taking no time (what the compute alone gives)."""
    return replace(x, **{name: np.zeros_like(value) for name in COMM_FIELDS
                         if (value := getattr(x, name)) is not None})


def _link_seconds(hw: HardwareProfile, slot: np.ndarray, nbytes: np.ndarray, inter: np.ndarray,
                  size: int) -> np.ndarray:
    """Seconds per slot: its bytes over NVLink and over InfiniBand at the same time (the slower of the two)."""
    t_ib = hw.seconds_transfer(np.bincount(slot, weights=nbytes * inter, minlength=size), True)
    t_nvl = hw.seconds_transfer(np.bincount(slot, weights=nbytes * ~inter, minlength=size), False)
    return np.maximum(t_ib, t_nvl)


def _distinct_peers(slot: np.ndarray, peer: np.ndarray, size: int, cp: int) -> np.ndarray:
    """How many distinct peers each slot talks to."""
    return np.bincount(np.unique(slot * cp + peer) // cp, minlength=size)


def _round_comm(hw: HardwareProfile, dst, src, rnd, nbytes, inter, cp: int, rounds: int) -> np.ndarray:
    """``[cp, rounds]``: until a receiver's messages of a round are in: the slower of its own receive and the
    sends of each of its senders in that round (all their destinations), plus a latency per sender."""
    size = cp * rounds
    into, out_of = dst * rounds + rnd, src * rounds + rnd
    recv = _link_seconds(hw, into, nbytes, inter, size)
    send = _link_seconds(hw, out_of, nbytes, inter, size)
    wait = recv.copy()
    np.maximum.at(wait, into, send[out_of])
    wait += hw.p2p_latency_us * 1e-6 * _distinct_peers(into, src, size, cp)
    return wait.reshape(cp, rounds)


def staged_exchange(plan: Plan, hw: HardwareProfile, kv_budget_tokens=DEFAULT_KV_BUDGET, hop: bool = False
                    ) -> StagedExchange:
    """Stage work and round communication of a point-to-point plan under a budget (see the module docstring).
    ``hop``: a node-aware plan's key/values with the same-round hop as well (a design the runtime does not run
    yet: docs/node_aware_exchange.md step 5)."""
    cp, tile = plan.cp, hw.tile_size
    q_rank, q_doc, q_start, q_end = plan.q.T
    q_lens = q_end - q_start
    budget = resolve_kv_budget(kv_budget_tokens, int(plan.num_tokens.max(initial=1)))
    pieces = plan.pieces
    index, offset, length, stage, n = split_stages(pieces[:, Piece.POS], pieces[:, Piece.END] - pieces[:, Piece.START],
                                                   pieces[:, Piece.TOTAL], budget)
    rounds = max(int(n.max(initial=0)), 1)
    num_stages = np.zeros(cp, np.int64)
    dst, src, doc = pieces[index, Piece.DST], pieces[index, Piece.SRC], pieces[index, Piece.DOC]
    np.maximum.at(num_stages, dst, n)
    end = pieces[index, Piece.START] + offset + length

    # compute: every query row of the receiver in the piece's document that sees it (causal: the piece ends at or
    # before the row starts; received ranges never straddle a row's start), summed per (query row, stage)
    num_docs = plan.doc_lens.shape[0]
    order = np.lexsort((q_doc, q_rank))
    rep, at = matching_rows(q_rank[order] * num_docs + q_doc[order], dst * num_docs + doc)
    row = order[at]
    if plan.mask == "causal":
        seen = end[rep] <= q_start[row]
        rep, row = rep[seen], row[seen]
    q_len = q_lens[row]
    group, inv = np.unique(row * rounds + stage[rep], return_inverse=True)
    inv = inv.reshape(-1)
    pairs = np.bincount(inv, weights=q_len * length[rep], minlength=group.shape[0])
    keys = np.bincount(inv, weights=length[rep], minlength=group.shape[0])
    g_row, g_stage = group // rounds, group % rounds
    eff = _eff_pairs(pairs, q_lens[g_row], keys, tile)
    slot = q_rank[g_row] * rounds + g_stage
    stage_pairs = np.bincount(slot, weights=pairs, minlength=cp * rounds).reshape(cp, rounds)
    stage_eff = np.bincount(slot, weights=eff, minlength=cp * rounds).reshape(cp, rounds)
    g_rows = np.where(pairs > 0, q_lens[g_row], 0)
    stage_rows = np.bincount(slot, weights=g_rows, minlength=cp * rounds).reshape(cp, rounds)

    # communication per round
    if plan.exchange == "p2p" and plan.cp_node is not None and int(plan.cp_node.max(initial=0)) > 0:
        fwd, refetch, grad, hops = _relayed_comm(plan, hw, budget, rounds, hop)
        return StagedExchange(budget=budget, num_stages=num_stages, pairs=stage_pairs, eff_pairs=stage_eff,
                              rows=stage_rows, fwd_comm_s=fwd, refetch_comm_s=refetch, grad_comm_s=grad, **hops)
    nbytes = length * hw.kv_bytes_per_token
    inter = (dst // hw.gpus_per_node) != (src // hw.gpus_per_node)
    fwd = _round_comm(hw, dst, src, stage, nbytes, inter, cp, rounds)
    back = n - 1 - stage  # the backward round of each sub-piece
    again = back >= 1
    refetch = _round_comm(hw, dst[again], src[again], back[again], nbytes[again], inter[again], cp, rounds)
    grad = _grad_comm(hw, dst, src, back, nbytes, inter, cp, rounds)  # the receiver sends in its backward round
    return StagedExchange(budget=budget, num_stages=num_stages, pairs=stage_pairs, eff_pairs=stage_eff,
                          rows=stage_rows, fwd_comm_s=fwd, refetch_comm_s=refetch, grad_comm_s=grad)


def _grad_comm(hw: HardwareProfile, sender, owner, rnd, nbytes, inter, cp: int, rounds: int) -> np.ndarray:
    """``[cp, rounds]``: a backward round's gradient messages, each rank's the slower of what it sends and what comes
    back to it in the round, plus a latency per peer."""
    size = cp * rounds
    sent, returned = sender * rounds + rnd, owner * rounds + rnd
    grad = np.maximum(_link_seconds(hw, sent, nbytes, inter, size), _link_seconds(hw, returned, nbytes, inter, size))
    peers = _distinct_peers(np.concatenate([sent, returned]), np.concatenate([owner, sender]), size, cp)
    return (grad + hw.p2p_latency_us * 1e-6 * peers).reshape(cp, rounds)


def _relayed_comm(plan: Plan, hw: HardwareProfile, budget: int | None, rounds: int, hop: bool = False):
    """The rounds' communication ``[cp, rounds]`` (forward, refetch, gradients) of the node-aware exchange the
    runtime runs on a plan whose ranks lie on several nodes (:func:`megatron_fcp.planner.relay.relay_transfers`:
    key/values taken from a node-mate that holds them in the round before, gradients summed in a node-mate's next
    stage), each transfer on the link between its two ranks' nodes (``plan.cp_node``); and the
    :class:`StagedExchange` fields of the same-round hop (``hop``; else none)."""
    node, out, hops = plan.cp_node, [], {}
    for movement, t in all_transfers(plan.pieces, node, budget, hop=hop).items():
        second = t[:, Transfer.PHASE] == 1
        if second.any():
            h = t[second]
            name = "fwd" if movement == "forward" else "refetch"
            hops[f"{name}_hop_s"] = _hop_comm(hw, h, plan.cp, rounds)
            h = h[np.argsort(h[:, Transfer.ROUND], kind="stable")]
            bounds = np.searchsorted(h[:, Transfer.ROUND], np.arange(rounds + 1))
            hops[f"{name}_landers"] = tuple((h[a:b, Transfer.SRC], h[a:b, Transfer.DST])
                                            for a, b in zip(bounds[:-1], bounds[1:], strict=True))
            t = t[~second]
        dst, src, rnd = t[:, Transfer.DST], t[:, Transfer.SRC], t[:, Transfer.ROUND]
        nbytes = (t[:, Transfer.END] - t[:, Transfer.START]) * hw.kv_bytes_per_token
        inter = node[dst] != node[src]
        if movement == "gradients":  # the computing rank sends, in its round, to the owner or a node-mate
            out.append(_grad_comm(hw, src, dst, rnd, nbytes, inter, plan.cp, rounds))
        else:
            out.append(_round_comm(hw, dst, src, rnd, nbytes, inter, plan.cp, rounds))
    return (*out, hops)


def _hop_comm(hw: HardwareProfile, t: np.ndarray, cp: int, rounds: int) -> np.ndarray:
    """``[cp, rounds]``: a round's second phase (NVLink, inside nodes): until a rank's hops are through, the slower
    of what it receives (with its landers' sends) and what it sends as a lander, plus a latency per peer."""
    dst, src, rnd = t[:, Transfer.DST], t[:, Transfer.SRC], t[:, Transfer.ROUND]
    nbytes = (t[:, Transfer.END] - t[:, Transfer.START]) * hw.kv_bytes_per_token
    inter = np.zeros(dst.shape, bool)
    size = cp * rounds
    out_of = src * rounds + rnd
    send = _link_seconds(hw, out_of, nbytes, inter, size)
    send += hw.p2p_latency_us * 1e-6 * _distinct_peers(out_of, dst, size, cp)
    return np.maximum(_round_comm(hw, dst, src, rnd, nbytes, inter, cp, rounds), send.reshape(cp, rounds))


def _with_hop(arrive: np.ndarray, hop_s: np.ndarray | None, landers, j: int) -> np.ndarray:
    """When a rank's round ``j`` is in, with the round's second phase (posted right after the first on the same
    stream, so it starts once the rank's and its landers' first phases are in and runs while the rank computes):
    ``arrive`` the first phase's arrival per rank."""
    if hop_s is None:
        return arrive
    lander, receiver = landers[j]
    ready = arrive.copy()
    np.maximum.at(ready, receiver, arrive[lander])
    return np.where(hop_s[:, j] > 0, ready + hop_s[:, j], arrive)


def staged_times(x: StagedExchange, local_fwd_s: np.ndarray, local_bwd_s: np.ndarray, hw: HardwareProfile,
                 stage_extra_s: np.ndarray | None = None, slowed=None, stage_extra_bwd_s: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per rank: forward and backward seconds of the engine's rounds, and kernel seconds (local times include
    their launches; every stage with work adds one kernel launch, forward and backward).

    Optional costs (:mod:`megatron_fcp.sim.published` uses them): ``stage_extra_s`` ``[cp, rounds]`` seconds
    added to each remote stage's compute in both passes (merging its partial output, accumulating its ``dq``),
    ``stage_extra_bwd_s`` the same in backward only, and
    ``slowed(compute_s, comm_s)``: the seconds of compute that overlaps a transfer of ``comm_s`` (the transfer's
    kernels holding SMs); without it compute and transfers overlap for free."""
    cp, rounds = x.eff_pairs.shape
    calls = x.eff_pairs > 0  # received pieces are whole earlier ranges (causal) or any range (full): full calls
    c_fwd = hw.call_seconds("fwd", "full", x.eff_pairs, x.rows, calls)
    c_bwd = hw.call_seconds("bwd", "full", x.eff_pairs, x.rows, calls)
    if stage_extra_s is not None:
        c_fwd, c_bwd = c_fwd + stage_extra_s, c_bwd + stage_extra_s
    if stage_extra_bwd_s is not None:  # backward only (FA3's GQA accumulators of the stage's call)
        c_bwd = c_bwd + stage_extra_bwd_s
    no_comm = np.zeros(cp)
    # forward: local blocks while stage 0 travels; then wait stage j, post round j + 1, compute stage j
    f, arrive = np.asarray(local_fwd_s, dtype=np.float64).copy(), x.fwd_comm_s[:, 0].copy()
    if slowed:
        f = slowed(f, arrive) * (f > 0) + f * (f <= 0)
    arrive = _with_hop(arrive, x.fwd_hop_s, x.fwd_landers, 0)
    for j in range(rounds):
        s = np.maximum(f, arrive)
        if j + 1 < rounds:
            arrive = _with_hop(s + x.fwd_comm_s[:, j + 1], x.fwd_hop_s, x.fwd_landers, j + 1)
        f = s + (slowed(c_fwd[:, j], x.fwd_comm_s[:, j + 1] if j + 1 < rounds else no_comm) if slowed
                 else c_fwd[:, j])
    fwd = f
    # backward round t computes stage n - 1 - t (the kept one at t = 0, no wait); refetch round 1 is posted at
    # time 0; then wait the refetched stage, post the next refetch, compute, wait the previous gradient round
    # (it travelled during the compute), post the stage's gradients; local blocks after the loop, then the last
    # gradient round
    j = x.num_stages[:, None] - 1 - np.arange(rounds)[None, :]
    c_back = np.where(j >= 0, np.take_along_axis(c_bwd, np.maximum(j, 0), axis=1), 0.0)
    f, arrive, g = np.zeros(cp), np.zeros(cp), np.zeros(cp)
    for t in range(rounds):
        s = np.maximum(f, arrive)
        refetch = x.refetch_comm_s[:, t + 1] if t + 1 < rounds else no_comm
        arrive = (_with_hop(s + refetch, x.refetch_hop_s, x.refetch_landers, t + 1) if t + 1 < rounds
                  else np.zeros(cp))
        compute = c_back[:, t]
        if slowed:  # overlaps the next refetch and the previous round's gradients
            compute = slowed(compute, np.maximum(refetch, x.grad_comm_s[:, t - 1] if t > 0 else 0.0))
        f = np.maximum(s + compute, g)
        g = f + x.grad_comm_s[:, t]
    bwd = np.maximum(f + local_bwd_s, g)
    compute = local_fwd_s + local_bwd_s + c_fwd.sum(axis=1) + c_bwd.sum(axis=1)
    return fwd, bwd, compute


def _p2p_cost(plan: Plan, hw: HardwareProfile, kv_budget_tokens=DEFAULT_KV_BUDGET
              ) -> tuple[np.ndarray, np.ndarray]:
    x = staged_exchange(plan, hw, kv_budget_tokens)
    local_fwd, local_bwd = _local_seconds(plan, hw)
    fwd, bwd, compute = staged_times(x, local_fwd, local_bwd, hw)
    return compute, fwd + bwd


def _local_seconds(plan: Plan, hw: HardwareProfile) -> tuple[np.ndarray, np.ndarray]:
    """Per rank: forward and backward seconds of the calls on its own key/values, launches included. Causal: the
    diagonal call (each row against itself) and the ``earlier`` call (rows against the rank's earlier own rows
    of the document, a full block); full mask: one call against all own keys."""
    q, cp = plan.q, plan.cp
    local, local_keys, _, other = _local_split(plan)
    rank, n_q = q[:, Q.CP_RANK], q[:, Q.END] - q[:, Q.START]
    calls = (np.bincount(rank, minlength=cp) > 0).astype(np.float64)  # own: diagonal (causal) or all own keys
    if plan.mask == "causal":
        calls += np.bincount(rank, weights=other, minlength=cp) > 0  # earlier: the rank's earlier own rows
    if hw.laws is None:  # one efficiency for every call: the own-key work in one sum
        eff_local = np.bincount(rank, weights=_eff_pairs(local, n_q, local_keys, hw.tile_size), minlength=cp)
        launches = hw.kernel_launch_us * 1e-6 * calls
        return hw.seconds_fwd(eff_local) + launches, hw.seconds_bwd(eff_local) + launches
    tile = hw.tile_size
    if plan.mask == "causal":
        diagonal = local - other
        parts = [("causal", _eff_pairs(diagonal, n_q, n_q, tile), np.where(diagonal > 0, n_q, 0), diagonal > 0),
                 ("full", _eff_pairs(other, n_q, local_keys - n_q, tile), np.where(other > 0, n_q, 0), other > 0)]
    else:
        parts = [("full", _eff_pairs(local, n_q, local_keys, tile), np.where(local > 0, n_q, 0), local > 0)]
    out = []
    for pass_ in ("fwd", "bwd"):
        total = np.zeros(cp)
        for mask, eff, rows, used in parts:
            work, n_rows = np.bincount(rank, eff, cp), np.bincount(rank, rows, cp)
            total += hw.call_seconds(pass_, mask, work, n_rows, np.bincount(rank, used, cp) > 0)
        out.append(total)
    return out[0], out[1]


# -- ring (Transformer Engine) -----------------------------------------------------------------------
def _ring_overheads(plan: Plan, group_of_doc: np.ndarray, tile: int) -> np.ndarray:
    """Per q row: edge-tile work of running that row's chunk against every chunk of its ring group."""
    doc, n_q = plan.q[:, Q.DOC], plan.q[:, Q.END] - plan.q[:, Q.START]
    holders = np.bincount(doc, minlength=plan.doc_lens.shape[0])  # non-empty chunks per document
    steps = np.minimum(holders[doc], group_of_doc[doc]).astype(np.float64)
    if plan.mask == "causal":
        steps = np.maximum(steps / 2, 1)
    return edge_pairs(steps * n_q + plan.doc_lens[doc] / 2, steps, tile)


def _ring_cost(plan: Plan, hw: HardwareProfile, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cp = plan.cp
    over = np.bincount(plan.q[:, Q.CP_RANK],
                       weights=_ring_overheads(plan, np.full(plan.doc_lens.shape, cp), hw.tile_size), minlength=cp)
    eff = pairs + over
    launch = hw.kernel_launch_us * 1e-6
    step_bytes = float(plan.num_tokens.max()) * hw.kv_bytes_per_token
    comm = hw.seconds_transfer(step_bytes, cp > hw.gpus_per_node) + hw.p2p_latency_us * 1e-6
    if hw.laws is None:  # every step one cp-th of the rank's work
        comp_f, comp_b = hw.seconds_fwd(eff), hw.seconds_bwd(eff)
        slow_f, slow_b = comp_f.max() / cp + launch, comp_b.max() / cp + launch
        fwd = slow_f + (cp - 1) * max(slow_f, comm)
        bwd = slow_b + (cp - 1) * max(slow_b, 2 * comm)
        return comp_f + comp_b, np.full(cp, fwd + bwd)
    # calibrated laws: step 0 is the rank's own chunks (a causal diagonal under a causal mask), each later step an
    # equal share of the rest, a full block; the work (edge tiles included) is split in proportion to the pairs
    own = np.bincount(plan.q[:, Q.CP_RANK], weights=_local_split(plan)[0], minlength=cp)
    share = np.divide(own, pairs, out=np.zeros(cp), where=pairs > 0)
    rows = plan.num_tokens.astype(np.float64)
    first_mask = "causal" if plan.mask == "causal" else "full"
    total, step = np.zeros(cp), 0.0
    for pass_, ring_comm in (("fwd", comm), ("bwd", 2 * comm)):
        first = hw.call_seconds(pass_, first_mask, eff * share, rows, 0)
        later = hw.call_seconds(pass_, "full", eff * (1 - share) / max(cp - 1, 1), rows, 0)
        total += first + (cp - 1) * later  # kernel work without launches, as without laws
        step += first.max() + launch + (cp - 1) * max(later.max() + launch, ring_comm)
    return total, np.full(cp, step)


# -- group ring (Megatron hybrid CP) -----------------------------------------------------------------
def _group_ring_cost(plan: Plan, hw: HardwareProfile) -> tuple[np.ndarray, np.ndarray]:
    q, cp = plan.q, plan.cp
    lens = plan.doc_lens
    rank_doc, row_group = np.unique(q[:, [Q.CP_RANK, Q.DOC]], axis=0, return_inverse=True)
    rank, doc = rank_doc.T  # per (rank, document) of the rows: the rank's chunk of the document
    group = np.maximum(np.bincount(doc, minlength=lens.shape[0]), 1)
    pairs = q_pairs(q[:, Q.START], q[:, Q.END], lens[q[:, Q.DOC]], plan.mask)
    eff = np.bincount(row_group.ravel(), weights=pairs + _ring_overheads(plan, group, hw.tile_size))
    g = group[doc].astype(np.float64)
    chunk_bytes = np.ceil(lens[doc] / g) * hw.kv_bytes_per_token
    comm = np.where(g > hw.gpus_per_node, hw.seconds_transfer(chunk_bytes, True),
                    hw.seconds_transfer(chunk_bytes, False)) + hw.p2p_latency_us * 1e-6 * (g > 1)
    launch = hw.kernel_launch_us * 1e-6
    if hw.laws is None:
        per_f = hw.seconds_fwd(eff) / g + launch
        per_b = hw.seconds_bwd(eff) / g + launch
        compute = np.bincount(rank, weights=hw.seconds_fwd(eff) + hw.seconds_bwd(eff), minlength=cp)
    else:  # calibrated laws: each of the g steps one call of the rank's chunk rows (the document's mask)
        chunk_rows = np.bincount(row_group.ravel(), weights=q[:, Q.END] - q[:, Q.START])
        mask = "causal" if plan.mask == "causal" else "full"
        per_f = hw.call_seconds("fwd", mask, eff / g, chunk_rows, 1)
        per_b = hw.call_seconds("bwd", mask, eff / g, chunk_rows, 1)
        compute = np.bincount(rank, weights=g * (per_f + per_b - 2 * launch), minlength=cp)
    fwd = per_f + (g - 1) * np.maximum(per_f, comm)
    bwd = per_b + (g - 1) * np.maximum(per_b, 2 * comm)
    return compute, np.bincount(rank, weights=fwd + bwd, minlength=cp)

