"""Modeled attention cost of a plan on a hardware profile: compute, communication, overlap, MFU.

Every figure here is *modeled*, not measured. The model, per attention layer, forward plus backward:

- Kernel work of one kernel sequence (a query range against a contiguous set of keys) is counted in
  effective pairs: ``pairs + tile/2 * (q + k) + tile**2 / 4``: the exact query-key pairs plus the partly
  filled tiles at the edges, so tiny pieces cost more per pair than large ones (FlashAttention computes whole
  ``tile x tile`` blocks). Forward FLOPs per pair are ``4 * heads * head_dim``; backward does
  ``bwd_flops_factor`` times that; each runs at its modeled fraction of peak. Each kernel call adds a launch.
- Key/value bytes are ``2 * kv_heads * head_dim * bytes_per_element`` per token. A transfer runs at NVLink
  speed between GPUs of one node and InfiniBand speed across nodes, plus a latency per peer.
- ``p2p`` plans (FCP, MagiAttention-style, no CP): the rank computes against its own keys while remote keys
  arrive, then against the remote keys in up to ``P2P_MAX_STAGES`` stages, each as soon as its sources'
  key/values are in: ``fwd = max(local + remote, comm + remote / stages)``. Backward mirrors it, sending each
  stage's key/value gradients back while it computes the next and the local part: ``bwd = max(remote + local,
  remote / stages + comm)``. With one stage this is ``max(local, comm) + remote`` and ``remote + max(local,
  comm)``. A rank's communication waits for the slowest of its senders.
- ``ring`` plans (Transformer Engine): ``cp`` lockstep steps; each step overlaps one ring transfer with one
  step of compute, and the slowest rank and the slowest link set every step. Backward moves key/values and
  their gradients.
- ``group_ring`` plans (Megatron hybrid CP): a ring per document inside its group, documents one after another;
  groups larger than a node step at InfiniBand speed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from megatron_fcp.errors import InputError
from megatron_fcp.planner.pairs import arange_within, block_pairs, needed_kv_end, q_pairs
from megatron_fcp.planner.plan import Plan


@dataclass(frozen=True, kw_only=True)
class HardwareProfile:
    """A GPU node and the attention layer being modeled (see configs/hardware/*.yaml for sources)."""

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

    @property
    def fwd_flops_per_pair(self) -> float:
        return 4.0 * self.num_heads * self.head_dim

    @property
    def kv_bytes_per_token(self) -> float:
        return 2.0 * self.num_kv_heads * self.head_dim * self.bytes_per_element

    def seconds_fwd(self, eff_pairs):
        flops = eff_pairs * self.fwd_flops_per_pair
        return flops / (self.peak_bf16_dense_tflops * 1e12 * self.attention_fwd_efficiency)

    def seconds_bwd(self, eff_pairs):
        flops = eff_pairs * self.fwd_flops_per_pair * self.bwd_flops_factor
        return flops / (self.peak_bf16_dense_tflops * 1e12 * self.attention_bwd_efficiency)

    def seconds_transfer(self, num_bytes, inter_node: bool):
        bw = self.ib_gbps_per_direction * self.ib_efficiency if inter_node else \
            self.nvlink_gbps_per_direction * self.nvlink_efficiency
        return num_bytes / (bw * 1e9)


HARDWARE = ("h100_node", "h200_node")


def load_hardware(name_or_path: str | Path = "h100_node") -> HardwareProfile:
    """Load a shipped profile by name (``h100_node``, ``h200_node``) or a YAML file of the same fields."""
    if isinstance(name_or_path, str) and name_or_path in HARDWARE:
        text = (resources.files("megatron_fcp") / "data" / "hardware" / f"{name_or_path}.yaml").read_text()
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise InputError(f"hardware profile {str(name_or_path)!r} is neither {HARDWARE} nor an existing file")
        text = path.read_text()
    raw = yaml.safe_load(text)
    flat = {k: v for k, v in raw.items() if k != "model"} | dict(raw.get("model", {}))
    names = {f.name for f in fields(HardwareProfile)}
    missing, unknown = names - flat.keys(), flat.keys() - names
    if missing or unknown:
        raise InputError(
            f"hardware profile {name_or_path}: missing fields {sorted(missing)}, unknown fields {sorted(unknown)}"
        )
    return HardwareProfile(**flat)


@dataclass(frozen=True)
class PlanCost:
    """Per-rank modeled figures of one plan (arrays of shape ``[cp]``) and the step they add up to."""

    pairs: np.ndarray
    """Exact query-key pairs each rank computes."""
    compute_s: np.ndarray
    """Modeled kernel seconds (forward + backward), communication excluded."""
    recv_bytes: np.ndarray
    """Key/value bytes received in forward (the same volume of gradients travels back in backward)."""
    step_s: np.ndarray
    """Modeled attention seconds per rank (forward + backward, with overlap)."""

    @property
    def step_time_s(self) -> float:
        return float(self.step_s.max())


def evaluate(plan: Plan, hw: HardwareProfile) -> PlanCost:
    """Model one plan on ``hw``."""
    pairs = rank_pairs(plan)
    if plan.exchange == "ring":
        compute, step = _ring_cost(plan, hw, pairs)
    elif plan.exchange == "group_ring":
        compute, step = _group_ring_cost(plan, hw)
    else:
        compute, step = _p2p_cost(plan, hw)
    recv = plan.recv_tokens * hw.kv_bytes_per_token
    return PlanCost(pairs=pairs, compute_s=compute, recv_bytes=recv.astype(np.float64), step_s=step)


def useful_flops(plan: Plan, hw: HardwareProfile, pairs: np.ndarray | None = None) -> float:
    """FLOPs of the exact attention pairs (``rank_pairs(plan)`` unless given), forward plus backward (the
    numerator of MFU)."""
    pairs = rank_pairs(plan) if pairs is None else pairs
    return float(pairs.sum()) * hw.fwd_flops_per_pair * (1.0 + hw.bwd_flops_factor)


def mfu(plan: Plan, hw: HardwareProfile, cost: PlanCost) -> float:
    """Modeled attention MFU: useful FLOPs over ``cp`` GPUs' peak during the modeled step."""
    return useful_flops(plan, hw, cost.pairs) / (plan.cp * hw.peak_bf16_dense_tflops * 1e12 * cost.step_time_s)


def rank_pairs(plan: Plan) -> np.ndarray:
    """float64 ``[cp]``: exact attention pairs (query-key pairs the mask allows) each rank computes."""
    q = plan.q
    pairs = q_pairs(q[:, 2], q[:, 3], plan.doc_lens[q[:, 1]], plan.mask)
    return np.bincount(q[:, 0], weights=pairs, minlength=plan.cp)


def _eff_pairs(pairs, q_tokens, k_tokens, tile: int):
    """Effective pairs of kernel sequences: exact pairs plus partly filled edge tiles (zero where no pairs)."""
    return np.where(pairs > 0, pairs + tile / 2 * (q_tokens + k_tokens) + tile * tile / 4, 0.0)


# -- point-to-point (FCP, MagiAttention-style, no CP) -------------------------------------------------
def _local_split(plan: Plan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per q row: pairs against the rank's own keys, own key tokens it sees, and all pairs it computes."""
    q = plan.q
    lens = plan.doc_lens[q[:, 1]]
    total = q_pairs(q[:, 2], q[:, 3], lens, plan.mask)
    order = np.lexsort((q[:, 1], q[:, 0]))
    key = q[order, 0] * lens.shape[0] + q[order, 1]
    starts = np.concatenate([[True], key[1:] != key[:-1]])
    group_id = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    size = np.bincount(group_id)
    reps = size[group_id]
    i = np.repeat(order, reps)
    j = order[np.repeat(first[group_id], reps) + arange_within(reps)]
    pair_ij = block_pairs(q[i, 2], q[i, 3], q[j, 2], q[j, 3], plan.mask)
    local = np.bincount(i, weights=pair_ij, minlength=q.shape[0])
    seen = np.where(pair_ij > 0, q[j, 3] - q[j, 2], 0)
    local_keys = np.bincount(i, weights=seen, minlength=q.shape[0])
    return local, local_keys, total


def _p2p_cost(plan: Plan, hw: HardwareProfile) -> tuple[np.ndarray, np.ndarray]:
    q, cp, tile = plan.q, plan.cp, hw.tile_size
    local, local_keys, total = _local_split(plan)
    remote = total - local
    need = needed_kv_end(q[:, 3], plan.doc_lens[q[:, 1]], plan.mask)
    remote_keys = np.maximum(need - local_keys, 0)
    n_q = q[:, 3] - q[:, 2]
    eff_local = np.bincount(q[:, 0], weights=_eff_pairs(local, n_q, local_keys, tile), minlength=cp)
    eff_remote = np.bincount(q[:, 0], weights=_eff_pairs(remote, n_q, remote_keys, tile), minlength=cp)
    peers_in, peers_out = _peer_counts(plan)
    stages = np.minimum(peers_in, P2P_MAX_STAGES).astype(np.float64)
    launches = hw.kernel_launch_us * 1e-6 * (1 + stages)
    loc_f, rem_f = hw.seconds_fwd(eff_local), hw.seconds_fwd(eff_remote)
    loc_b, rem_b = hw.seconds_bwd(eff_local), hw.seconds_bwd(eff_remote)
    comm = _p2p_comm_seconds(plan, hw, peers_in, peers_out)
    last = np.maximum(stages, 1)
    fwd = np.maximum(loc_f + rem_f, comm + rem_f / last)
    bwd = np.maximum(rem_b + loc_b, rem_b / last + comm)
    compute = loc_f + rem_f + loc_b + rem_b
    return compute + 2 * launches, fwd + bwd + 2 * launches


P2P_MAX_STAGES = 4
"""Remote key/values are computed in at most this many stages, in order of arrival (grouped by source)."""


def _peer_counts(plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """Per rank: how many distinct peers it receives from, and sends to."""
    pairs = np.unique(plan.kv[:, :2], axis=0)
    return np.bincount(pairs[:, 0], minlength=plan.cp), np.bincount(pairs[:, 1], minlength=plan.cp)


def _p2p_comm_seconds(plan: Plan, hw: HardwareProfile, peers_in: np.ndarray, peers_out: np.ndarray) -> np.ndarray:
    """Per rank: time until all its key/values have arrived (its receives and its senders' sends)."""
    kv, cp = plan.kv, plan.cp
    if kv.shape[0] == 0:
        return np.zeros(cp)
    nbytes = (kv[:, 4] - kv[:, 3]) * hw.kv_bytes_per_token
    inter = (kv[:, 0] // hw.gpus_per_node) != (kv[:, 1] // hw.gpus_per_node)
    latency = hw.p2p_latency_us * 1e-6

    def link_time(rank_col: int, peers: np.ndarray) -> np.ndarray:
        t_ib = hw.seconds_transfer(np.bincount(kv[:, rank_col], weights=nbytes * inter, minlength=cp), True)
        t_nvl = hw.seconds_transfer(np.bincount(kv[:, rank_col], weights=nbytes * ~inter, minlength=cp), False)
        return np.maximum(t_ib, t_nvl) + latency * peers

    recv, send = link_time(0, peers_in), link_time(1, peers_out)
    wait = recv.copy()
    np.maximum.at(wait, kv[:, 0], send[kv[:, 1]])
    return wait


# -- ring (Transformer Engine) -----------------------------------------------------------------------
def _ring_overheads(plan: Plan, group_of_doc: np.ndarray, tile: int) -> np.ndarray:
    """Per q row: edge-tile work of running that row's chunk against every chunk of its ring group."""
    q = plan.q
    holders = np.bincount(q[:, 1], minlength=plan.doc_lens.shape[0])  # non-empty chunks per document
    steps = np.minimum(holders[q[:, 1]], group_of_doc[q[:, 1]]).astype(np.float64)
    if plan.mask == "causal":
        steps = np.maximum(steps / 2, 1)
    n_q = q[:, 3] - q[:, 2]
    return steps * (tile / 2 * n_q + tile * tile / 4) + tile / 2 * plan.doc_lens[q[:, 1]] / 2


def _ring_cost(plan: Plan, hw: HardwareProfile, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cp = plan.cp
    over = np.bincount(plan.q[:, 0], weights=_ring_overheads(plan, np.full(plan.doc_lens.shape, cp), hw.tile_size),
                       minlength=cp)
    eff = pairs + over
    launch = hw.kernel_launch_us * 1e-6
    comp_f, comp_b = hw.seconds_fwd(eff), hw.seconds_bwd(eff)
    step_bytes = float(plan.num_tokens.max()) * hw.kv_bytes_per_token
    comm = hw.seconds_transfer(step_bytes, cp > hw.gpus_per_node) + hw.p2p_latency_us * 1e-6
    slow_f, slow_b = comp_f.max() / cp + launch, comp_b.max() / cp + launch
    fwd = slow_f + (cp - 1) * max(slow_f, comm)
    bwd = slow_b + (cp - 1) * max(slow_b, 2 * comm)
    return comp_f + comp_b, np.full(cp, fwd + bwd)


# -- group ring (Megatron hybrid CP) -----------------------------------------------------------------
def _group_ring_cost(plan: Plan, hw: HardwareProfile) -> tuple[np.ndarray, np.ndarray]:
    q, cp = plan.q, plan.cp
    lens = plan.doc_lens
    rank_doc, row_group = np.unique(q[:, [0, 1]], axis=0, return_inverse=True)
    group = np.maximum(np.bincount(rank_doc[:, 1], minlength=lens.shape[0]), 1)
    pairs = q_pairs(q[:, 2], q[:, 3], lens[q[:, 1]], plan.mask)
    eff = np.bincount(row_group.ravel(), weights=pairs + _ring_overheads(plan, group, hw.tile_size))
    g = group[rank_doc[:, 1]].astype(np.float64)
    chunk_bytes = np.ceil(lens[rank_doc[:, 1]] / g) * hw.kv_bytes_per_token
    comm = np.where(g > hw.gpus_per_node, hw.seconds_transfer(chunk_bytes, True),
                    hw.seconds_transfer(chunk_bytes, False)) + hw.p2p_latency_us * 1e-6 * (g > 1)
    launch = hw.kernel_launch_us * 1e-6
    per_f = hw.seconds_fwd(eff) / g + launch
    per_b = hw.seconds_bwd(eff) / g + launch
    fwd = per_f + (g - 1) * np.maximum(per_f, comm)
    bwd = per_b + (g - 1) * np.maximum(per_b, 2 * comm)
    compute = np.bincount(rank_doc[:, 0], weights=hw.seconds_fwd(eff) + hw.seconds_bwd(eff), minlength=cp)
    return compute, np.bincount(rank_doc[:, 0], weights=fwd + bwd, minlength=cp)
