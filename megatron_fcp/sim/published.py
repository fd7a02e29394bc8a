"""Modeled forward and backward times of the context-parallel strategies of MagiAttention's published H100
benchmark, as that benchmark ran them, and of FCP on the same workload. Modeled, not measured.

Everything is per attention call of one pass (``fwd`` or ``bwd``, timed apart as the benchmark did), in seconds
of the slowest rank. Kernel calls use the profile's kernel time laws (:meth:`HardwareProfile.call_seconds`,
work = exact pairs plus edge tiles per document segment, per-row cost, one launch), so every kernel is the same
model as the rest of the simulator. What :mod:`megatron_fcp.sim.model` does not have, and is added here
(:class:`Extras`, each with its stated figure; ``docs/model_vs_published.md``):

- memory-bound elementwise kernels at HBM speed (3.35 TB/s datasheet x ``hbm_efficiency``): partial-output
  merging after ring steps (read the step's output, read-modify-write the result: ``3 x`` query-sized bf16
  bytes), gradient accumulation (``dq``, ``dkv``: the same), the baselines' unpad/pad copies around every FA3
  call (the benchmark's ``_fa3_varlen_forward``/``_backward`` gather q, k, v (and out, dout) to the valid
  tokens and scatter the results into zeroed padded tensors), the half-tensor copies of the zigzag ring, the
  Ulysses layout copies around its all-to-alls;
- FA3's backward under grouped-query attention (:func:`fa3_gqa_bwd_bytes`): fp32 dK/dV accumulators zero-filled
  over the call's keys plus a block per document, every query head's block added atomically in fp32, and the
  conversion to bf16 (the calibration shapes are multi-head and have none of it); MagiAttention's FFA calls pay the
  same without the padding block (:func:`dkv_accum_bwd_s`, ``"ffa"``: its runtime always accumulates partial dK/dV
  in fp32);
- host issue: a call that launches ``n`` small kernels costs at least ``n x kernel_launch_us``; in the
  ring-flash-attention anchor every host synchronisation the code makes (``.item()``, boolean-mask indexing
  with a CPU mask) leaves the GPU idle for :data:`SYNC_IDLE_LAUNCHES` launches;
- NCCL (or native group-collective) kernels hold SMs while they overlap attention: during the overlap the
  attention kernel runs at ``1 - sms / 132`` of its speed (:func:`overlapped`);
- the rendezvous of every ring round (send and receive both posted before the transfer starts) and a latency
  per round; the slowest link of the ring (InfiniBand where it crosses nodes) sets everybody's pace through
  the rendezvous (:func:`ring_times` simulates the ranks step by step);
- collectives: all-to-all (each rank's ``(n - 1)/n`` share over NVLink inside the node, the rest over its NIC),
  all-gather and reduce-scatter (NCCL rings: ``S (n - 1)/n`` bytes through every GPU's NVLink and ``S (n - 1)/
  (n g)`` through every NIC for a gathered size ``S`` over ``g`` GPUs per node).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from megatron_fcp.errors import InputError
from megatron_fcp.planner.baselines import plan_hybrid, plan_magi
from megatron_fcp.planner.columns import Piece, Q
from megatron_fcp.planner.fcp import plan_fcp
from megatron_fcp.planner.pairs import edge_pairs
from megatron_fcp.planner.plan import Plan
from megatron_fcp.planner.relay import PHASES, relay_figures
from megatron_fcp.planner.stages import DEFAULT_KV_BUDGET, split_stages
from megatron_fcp.sim.model import (
    HardwareProfile,
    StagedExchange,
    _link_seconds,
    _local_seconds,
    _round_comm,
    free_transfers,
    node_layout,
    staged_exchange,
    staged_times,
)

STRATEGIES = ("ulysses", "ring_p2p", "ring_allgather", "usp", "hybrid_dcp", "magi_attn-a2av", "magi_attn-native",
              "fcp", "fcp_heads")
"""Strategies modeled here (legend names of the published figures, plus ``fcp``: FCP's default node exchange,
``--fcp-node-exchange p2p``, and ``fcp_heads``: ``--fcp-node-exchange heads``); LoongTrain is not modeled."""


@dataclass(frozen=True)
class Extras:
    """The costs the base model lacks, each with its figure and where it comes from. ``enabled`` False: none
    of them (the base model's view: kernels, transfers, latencies)."""

    hbm_gbps: float = 3350.0
    """HBM3 bandwidth of an H100 SXM5, GB/s (NVIDIA datasheet)."""
    hbm_efficiency: float = 0.8
    """Modeled fraction of it that memory-bound elementwise kernels reach (as the profile's link efficiencies)."""
    num_sms: int = 132
    """SMs of an H100 SXM5 (NVIDIA datasheet)."""
    nccl_sms: int = 16
    """SMs an NCCL kernel holds while it overlaps attention (modeled: NCCL runs one CTA per channel; 16
    channels for a send/receive pair or an all-to-all on H100)."""
    grpcoll_sms: int = 48
    """SMs of MagiAttention's native group collectives in the benchmark (``benchmark_conf.py``: ``num_sms =
    48``)."""
    rendezvous_us: float = 10.0
    """Extra wait of a ring round's blocking send/receive pair beyond the message latency (modeled: one more
    message latency of the profile)."""
    enabled: bool = True

    def hbm_s(self, nbytes):
        """Seconds of a memory-bound kernel moving ``nbytes`` (reads plus writes)."""
        return np.asarray(nbytes, np.float64) / (self.hbm_gbps * 1e9 * self.hbm_efficiency) if self.enabled else \
            np.zeros_like(np.asarray(nbytes, np.float64))

    def sm_share(self, sms: int) -> float:
        return sms / self.num_sms if self.enabled else 0.0


BASE = Extras(enabled=False)


def overlapped(compute_s, comm_s, share: float):
    """Seconds of ``compute_s`` of kernel work that starts together with a transfer of ``comm_s`` holding a
    ``share`` of the SMs: the work runs at ``1 - share`` while the transfer lasts (not below the transfer)."""
    compute_s, comm_s = np.asarray(compute_s, np.float64), np.asarray(comm_s, np.float64)
    slowed = compute_s + share * np.minimum(comm_s, compute_s / (1.0 - share))
    return np.maximum(slowed, comm_s)


def q_bytes(hw: HardwareProfile, rows):
    """Bytes of query-sized bf16 tensors (q, out, dout, dq) of ``rows`` tokens, all query heads."""
    return np.asarray(rows, np.float64) * hw.num_heads * hw.head_dim * hw.bytes_per_element


def kv_bytes(hw: HardwareProfile, rows):
    """Bytes of key and value of ``rows`` tokens (the profile's key/value bytes per token)."""
    return np.asarray(rows, np.float64) * hw.kv_bytes_per_token


def call_s(hw: HardwareProfile, pass_: str, mask: str, q, k, pairs, head_share: float = 1.0) -> float:
    """One varlen FA3 call: segments of ``q`` query and ``k`` key tokens with ``pairs`` exact pairs each
    (segments without pairs skipped), on a ``head_share`` of the query heads."""
    q, k, pairs = (np.asarray(a, np.float64).reshape(-1) for a in (q, k, pairs))
    used = pairs > 0
    if not used.any():
        return 0.0
    q, k, pairs = q[used], k[used], pairs[used]
    # a segment costs at least the tiles it touches (FA3 varlen starts every segment on a tile boundary); on
    # the calibration shapes (segments of 512 tokens or more) the edge-tile work is the larger
    t = hw.tile_size
    mq, mk = np.ceil(q / t), np.ceil(k / t)
    tiles = np.where(mask == "causal", np.minimum(mq, mk) * (np.minimum(mq, mk) + 1) / 2
                     + np.maximum(mk - mq, 0) * mq, mq * mk)
    work = float(np.maximum(pairs + edge_pairs(q + k, 1, t), tiles * t * t).sum())
    # backward runs over key blocks (FA3 parallelises dK/dV per key block, dQ by atomics): its per-row cost is
    # taken half per query and half per key row, which is the fitted law on the square calibration shapes
    # the per-row cost is paid per tile row: a segment's rows rounded up to whole tiles
    rows = float((mq * t).sum()) if pass_ == "fwd" else float((mq * t + mk * t).sum()) / 2
    return float(hw.call_seconds(pass_, mask, work * head_share, rows * head_share, 1))


def issue(x: Extras, hw: HardwareProfile, gpu_s, kernels: int):
    """A stretch of GPU work issued as ``kernels`` launches: not faster than the host issues them."""
    if not x.enabled:
        return gpu_s
    return np.maximum(gpu_s, kernels * hw.kernel_launch_us * 1e-6)


FA3_BWD_BLOCK_N = 128
"""Key rows per FA3 backward block for head dimension 128 (``hopper/flash_bwd_launch_template.h``: the
backward's grid and its fp32 accumulators are laid out in blocks of ``kBlockN`` keys; 128 for hdim 128)."""


def fa3_gqa_bwd_bytes(hw: HardwareProfile, k, pairs, q_heads: int | None = None, kv_heads: int | None = None):
    """HBM bytes the FA3 backward adds for grouped-query attention beyond what the (multi-head) calibration
    shapes have, per call; ``k``, ``pairs``: per document segment of the call (last axis), segments without
    pairs still in the call's batch. FA3 (``hopper/flash_api.cpp``, ``mha_varlen_bwd``) allocates ``dk_accum``
    and ``dv_accum`` as fp32 zeros of ``kv_heads x (total_k + batch x kBlockN) x d`` when ``q_heads !=
    kv_heads``; the GQA epilogue (``CollectiveEpilogueBwdGQA``) atomically adds every query head's dK/dV block
    in fp32 (4 bytes an element where the multi-head epilogue writes bf16's 2 per tensor), and two more
    kernels convert the accumulators to bf16 (read fp32, write bf16). Each byte moves once."""
    q_heads = hw.num_heads if q_heads is None else q_heads
    kv_heads = hw.num_kv_heads if kv_heads is None else kv_heads
    k, pairs = np.asarray(k, np.float64), np.asarray(pairs, np.float64)
    if q_heads == kv_heads:
        return np.zeros(k.shape[:-1])
    used = np.where(pairs > 0, np.ceil(k / FA3_BWD_BLOCK_N) * FA3_BWD_BLOCK_N, 0.0).sum(axis=-1)
    return _gqa_bwd_bytes(hw.head_dim, q_heads, kv_heads, used, k.sum(axis=-1), k.shape[-1])


def _gqa_bwd_bytes(d: int, q_heads: int, kv_heads: int, used, total, segments):
    """:func:`fa3_gqa_bwd_bytes` of calls given per call: key rows in the blocks of segments with pairs (``used``),
    all key rows (``total``) and segments."""
    padded = total + segments * FA3_BWD_BLOCK_N
    atomics = q_heads * used * d * 2 * (4 - 2)  # dK and dV: fp32 atomic add instead of a bf16 write
    zeros = 2 * kv_heads * padded * d * 4
    convert = 2 * kv_heads * padded * d * 4 + 2 * kv_heads * total * d * 2
    return atomics + zeros + convert


# FA3 wrapper of the baselines: gathers to the valid tokens before the call, zero-fill + scatter after
FWD_WRAPPER_KERNELS, BWD_WRAPPER_KERNELS = 8, 14


def wrapper_bytes(hw: HardwareProfile, pass_: str, q_rows, kv_rows):
    """HBM bytes of the benchmark's unpad/pad copies around one FA3 call: forward gathers q, k, v (read +
    write) and zero-fills + scatters out (3x); backward gathers q, out, dout, k, v and zero-fills + scatters
    dq, dk, dv."""
    if pass_ == "fwd":
        return 5 * q_bytes(hw, q_rows) + 2 * kv_bytes(hw, kv_rows)
    return 9 * q_bytes(hw, q_rows) + 5 * kv_bytes(hw, kv_rows)


# -- collectives -----------------------------------------------------------------------------------------------
def _nvl_bw(hw):
    return hw.nvlink_gbps_per_direction * hw.nvlink_efficiency * 1e9


def _ib_bw(hw):
    return hw.ib_gbps_per_direction * hw.ib_efficiency * 1e9


def all_to_all_s(hw: HardwareProfile, nbytes: float, n: int) -> float:
    """An equal all-to-all over ``n`` consecutive ranks, each holding ``nbytes`` (an ``n``-th to each peer): the
    peers in the node over NVLink, the others over the rank's NIC, at the same time; one latency."""
    if n <= 1:
        return 0.0
    g = min(n, hw.gpus_per_node)
    nvl = nbytes * (g - 1) / n / _nvl_bw(hw)
    ib = nbytes * (n - g) / n / _ib_bw(hw)
    return max(nvl, ib) + hw.p2p_latency_us * 1e-6


def all_gather_s(hw: HardwareProfile, nbytes: float, n: int) -> float:
    """NCCL ring all-gather (or reduce-scatter) of ``nbytes`` per rank over ``n`` ranks (``S = n x nbytes``):
    ``S (n - 1)/n`` through each GPU's NVLink, across nodes ``S (n - 1)/(n g)`` through each NIC (one ring per
    NIC); one latency per ring step."""
    if n <= 1:
        return 0.0
    total = nbytes * n * (n - 1) / n
    nvl = total / _nvl_bw(hw)
    ib = total / hw.gpus_per_node / _ib_bw(hw) if n > hw.gpus_per_node else 0.0
    return max(nvl, ib) + (n - 1) * hw.p2p_latency_us * 1e-6 / 8


# -- the zigzag split of Transformer Engine's ring (per document, padded to 2n chunks) ------------------------
def zigzag_chunks(lens: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per rank and document ``[n, docs]``: tokens of the rank's first chunk ``a`` (chunk ``r``) and second chunk
    ``b`` (chunk ``2n - 1 - r``) and their start positions; each document padded to a multiple of ``2n`` and
    cut into ``2n`` equal chunks."""
    lens = np.asarray(lens, np.int64)
    c = -(-lens // (2 * n))
    r = np.arange(n)[:, None]
    a_start = np.minimum(r * c, lens)
    b_start = np.minimum((2 * n - 1 - r) * c, lens)
    a = np.clip(lens - r * c, 0, c)
    b = np.clip(lens - (2 * n - 1 - r) * c, 0, c)
    return a, b, a_start, b_start


def ring_step_work(lens: np.ndarray, n: int, mask: str):
    """Per rank and ring step ``[n, n]``, the segments of the step's call as arrays ``[n, n, docs]``: query
    tokens, key tokens, exact pairs; the padded tokens per rank ``[n]``; and per step whether the call takes
    half the queries. Step 0: own chunks (causal diagonal under a causal mask); step ``i``: the key/values of
    rank ``r - i``: under a causal mask all queries against the source's first chunk (source before the rank)
    or the second query chunk against both source chunks (source after it), else everything."""
    a, b, _, _ = zigzag_chunks(lens, n)
    c = -(-np.asarray(lens, np.int64) // (2 * n))
    padded = np.full(n, 2 * c.sum(), np.int64)
    r = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    s = (r - i) % n  # source rank of step i
    own = (a + b)[:, None, :]
    src_a, src_all = a[s], (a + b)[s]
    if mask == "causal":
        before = (i <= r)[..., None] & (i > 0)[..., None]
        q = np.where(before, own, b[:, None, :])
        k = np.where(before, src_a, src_all)
        pairs = q * k
        pairs[:, 0, :] = own[:, 0, :] * (own[:, 0, :] + 1) // 2
        q[:, 0, :], k[:, 0, :] = own[:, 0, :], own[:, 0, :]
        half_q = ~before[..., 0]
        half_q[:, 0] = False
    else:
        q = np.broadcast_to(own, src_all.shape).copy()
        k = src_all
        pairs = q * k
        half_q = np.zeros((n, n), bool)
    return q, k, pairs, padded, half_q


def ring_times(hw: HardwareProfile, x: Extras, lens: np.ndarray, n: int, mask: str, pass_: str,
               first_rank: int = 0) -> np.ndarray:
    """Per rank of a ring of ``n`` consecutive ranks starting at ``first_rank``: seconds of the benchmark's ring
    P2P (Transformer Engine's zigzag split, FA3 per step, as ``exps/dist_attn/baselines/ring_attn.py`` runs it)
    on documents ``lens``. Each step posts the transfer of the next key/value block (backward: key/values and
    the accumulated key/value gradients), computes, and waits for its own receive and its send (the
    rendezvous), so a rank starts step ``i + 1`` when it, its sender and its receiver have all posted step
    ``i`` and the transfers are through. Forward merges the steps' partial outputs after the loop; backward
    accumulates ``dq`` and ``dkv`` every step."""
    q, k, pairs, padded, half_q = ring_step_work(lens, n, mask)
    rows = padded[0]
    launch = hw.kernel_launch_us * 1e-6
    comp = np.zeros((n, n))
    for r in range(n):
        for i in range(n):
            m = "causal" if (mask == "causal" and i == 0) else "full"
            comp[r, i] = call_s(hw, pass_, m, q[r, i], k[r, i], pairs[r, i]) + (0.0 if x.enabled else launch)
    step_q_rows = np.where(half_q, rows / 2, rows)
    half_kv = (mask == "causal") & ~half_q & (np.arange(n)[None, :] > 0)
    step_kv_rows = np.where(half_kv, rows / 2, rows)
    if pass_ == "fwd":
        extra = x.hbm_s(wrapper_bytes(hw, "fwd", step_q_rows, step_kv_rows)
                        + np.where(half_q, q_bytes(hw, rows), 0) + np.where(half_kv, kv_bytes(hw, rows), 0))
        kernels = FWD_WRAPPER_KERNELS + 2
        block = kv_bytes(hw, rows) * np.ones(n)  # step i sends the block for step i + 1
    else:
        extra = x.hbm_s(wrapper_bytes(hw, "bwd", step_q_rows, step_kv_rows)
                        + np.where(half_q, 3 * q_bytes(hw, rows), 0)  # q, out, dout halves copied
                        + 3 * q_bytes(hw, step_q_rows)  # dq accumulation
                        + 2 * kv_bytes(hw, step_kv_rows) + 3 * kv_bytes(hw, rows)  # cat dk dv, dkv accumulation
                        + fa3_gqa_bwd_bytes(hw, k, pairs))  # FA3's fp32 dK/dV accumulators under GQA
        kernels = BWD_WRAPPER_KERNELS + 5
        block = kv_bytes(hw, rows) * np.where(np.arange(n) == 0, 1, np.where(np.arange(n) == n - 1, 1, 2))
    work = issue(x, hw, comp + extra, kernels)
    ranks = first_rank + np.arange(n)
    inter = (ranks // hw.gpus_per_node) != (np.roll(ranks, -1) // hw.gpus_per_node)  # link r -> r + 1
    lat = hw.p2p_latency_us * 1e-6 + (x.rendezvous_us * 1e-6 if x.enabled else 0.0)
    share = x.sm_share(x.nccl_sms)
    start = np.zeros(n)
    for i in range(n):
        if n == 1 or (pass_ == "fwd" and i == n - 1):  # forward's last step sends nothing
            start = start + work[:, i]
            continue
        t_link = np.array([hw.seconds_transfer(block[i], bool(inter[r])) for r in range(n)])  # r -> r + 1
        go = np.maximum(start, np.roll(start, -1))  # the pair r -> r + 1 has both posted
        sent = go + t_link + lat
        recv = np.roll(sent, 1)  # from r - 1
        through = np.maximum(sent, recv)
        start = np.maximum(start + overlapped(work[:, i], through - start, share), through)
    end = start
    if pass_ == "fwd":
        # the last step computes without a transfer; then the merges: per step read the partial output, read-
        # modify-write the result (3x query bytes), plus the softmax statistics
        merges = x.hbm_s(3 * q_bytes(hw, step_q_rows).sum(axis=1) + 12.0 * rows * hw.num_heads * n)
        end = end + issue(x, hw, merges, 3 * n)
    return end


def ring_p2p(hw, x, lens, cp, mask, pass_):
    return float(ring_times(hw, x, lens, cp, mask, pass_).max())


# -- Ulysses ---------------------------------------------------------------------------------------------------
def ulysses(hw: HardwareProfile, x: Extras, lens: np.ndarray, cp: int, mask: str, pass_: str,
            rows_per_rank: int | None = None) -> float:
    """DeepSpeed-Ulysses as the benchmark ran it: all-to-all q, k, v over heads, one FA3 call on the whole
    sequence with ``heads / cp`` query heads, all-to-all the output back; backward the all-to-all of ``dout``, the
    call, and the all-to-alls of ``dq``, ``dk``, ``dv``. With ``cp`` above the 8 key/value heads the benchmark
    repeats every key/value head ``cp / 8`` times before the all-to-all (``run_benchmark.py``), so the key/value
    all-to-alls carry ``cp / 8`` times the bytes (each rank gets one key/value head)."""
    lens = np.asarray(lens, np.float64)
    rows = float(lens.sum()) / cp if rows_per_rank is None else rows_per_rank
    rep = max(1, cp // hw.num_kv_heads)
    qb, kvb = float(q_bytes(hw, rows)), float(kv_bytes(hw, rows)) * rep
    pairs = lens * (lens + 1) / 2 if mask == "causal" else lens * lens
    kern = call_s(hw, pass_, mask, lens, lens, pairs, 1.0 / cp) + (0.0 if x.enabled else hw.kernel_launch_us * 1e-6)
    if pass_ == "fwd":
        comm = 2 * all_to_all_s(hw, qb, cp) + all_to_all_s(hw, kvb, cp)
        copies = x.hbm_s(4 * qb + 4 * kvb + 2 * qb) + x.hbm_s(wrapper_bytes(hw, "fwd", rows, rows * rep))
        return comm + issue(x, hw, kern + copies, 3 * 3 + FWD_WRAPPER_KERNELS + 2)
    comm = 2 * all_to_all_s(hw, qb, cp) + all_to_all_s(hw, kvb, cp)
    gqa = fa3_gqa_bwd_bytes(hw, lens, pairs, max(1, hw.num_heads // cp), max(1, hw.num_kv_heads * rep // cp))
    copies = x.hbm_s(2 * qb + 4 * qb + 4 * kvb + (kvb if rep > 1 else 0) + gqa) + x.hbm_s(
        wrapper_bytes(hw, "bwd", rows, rows * rep))
    return comm + issue(x, hw, kern + copies, 3 * 3 + BWD_WRAPPER_KERNELS + 2)


# -- Ring All-Gather (Llama-3 style) ---------------------------------------------------------------------------
def ring_allgather(hw: HardwareProfile, x: Extras, lens: np.ndarray, cp: int, mask: str, pass_: str) -> float:
    """All-gather every key/value of the sequence (k and v apart, then reordered), then two FA3 calls per rank,
    one per zigzag chunk of queries against the keys it sees (causal: the document's prefix up to the chunk);
    backward gathers again, accumulates ``dk``/``dv`` of both calls over the whole sequence and reduce-scatters
    them (``ring_attn.py``, ``FA3RingAGAttnFunc``). Ranks are symmetric but their work is not: the slowest
    rank's calls count."""
    lens = np.asarray(lens, np.int64)
    a, b, a_start, b_start = zigzag_chunks(lens, cp)
    c = -(-lens // (2 * cp))
    rows = 2 * int(c.sum())  # padded tokens per rank
    all_rows = rows * cp
    kern = np.zeros(cp)
    gqa = np.zeros(cp)
    for r in range(cp):
        for q_len, start in ((a[r], a_start[r]), (b[r], b_start[r])):
            if mask == "causal":
                k_len = start + q_len
                pairs = q_len * start + q_len * (q_len + 1) / 2
            else:
                k_len, pairs = lens, q_len * lens
            kern[r] += call_s(hw, pass_, mask, q_len, k_len, pairs)
            gqa[r] += float(fa3_gqa_bwd_bytes(hw, k_len, pairs))
    if not x.enabled:
        kern += 2 * hw.kernel_launch_us * 1e-6
    half = rows / 2
    gather = 2 * all_gather_s(hw, float(kv_bytes(hw, rows)) / 2, cp)
    reorder = x.hbm_s(2 * kv_bytes(hw, all_rows))  # k and v reordered after the gather (read + write)
    if pass_ == "fwd":
        copies = x.hbm_s(2 * wrapper_bytes(hw, "fwd", half, all_rows) + 2 * q_bytes(hw, half) * 2)
        return float(gather + issue(x, hw, kern.max() + copies + reorder, 2 * FWD_WRAPPER_KERNELS + 6))
    accumulate = x.hbm_s(2 * 3 * kv_bytes(hw, all_rows) + 2 * kv_bytes(hw, all_rows) + 2 * q_bytes(hw, half) * 2)
    kern = kern + x.hbm_s(gqa)  # FA3's fp32 dK/dV accumulators under GQA, per rank
    copies = x.hbm_s(2 * wrapper_bytes(hw, "bwd", half, all_rows))
    scatter = 2 * all_gather_s(hw, float(kv_bytes(hw, rows)) / 2, cp)
    return float(gather + issue(x, hw, kern.max() + copies + reorder + accumulate, 2 * BWD_WRAPPER_KERNELS + 10)
                 + scatter)


# -- USP: Ulysses inside the node, ring across nodes -------------------------------------------------------------
def usp(hw: HardwareProfile, x: Extras, lens: np.ndarray, cp: int, mask: str, pass_: str) -> float:
    """Unified sequence parallel as the benchmark grouped it (``run_benchmark.py``): Ulysses over the 8 GPUs of
    a node, a ring P2P over the ``cp / 8`` nodes. Modeled as the Ulysses all-to-alls inside the node plus a
    ring of ``cp / 8`` steps whose calls each carry 1/8 of the heads of 8 ranks' tokens (the zigzag split over
    ``cp / 8`` ring ranks) and whose transfers go over InfiniBand."""
    g = min(cp, hw.gpus_per_node)
    n = max(1, cp // g)
    lens = np.asarray(lens, np.int64)
    if n == 1:
        return ulysses(hw, x, lens, cp, mask, pass_)
    # the ring on heads/g of the node's tokens: scale a ring of n ranks on the sequence by 1/g of the heads
    comm, copies, hw_ring = node_heads(hw, x, lens, cp)
    ring = float(ring_times(hw_ring, x, lens, n, mask, pass_).max())
    return comm + ring + copies


def node_heads(hw: HardwareProfile, x: Extras, lens: np.ndarray, cp: int) -> tuple[float, float, HardwareProfile]:
    """The node part of USP and of FCP's ``heads`` exchange, per pass: seconds of the Ulysses all-to-alls inside a
    node of ``g = gpus_per_node`` ranks (forward q, k and v in and the output back; backward dout in and the
    gradients back: query bytes twice, key/value bytes once) and of their layout copies; and the profile of one head
    shard (``1 / g`` of the heads) on node-sized ranks, every link across nodes."""
    g = min(cp, hw.gpus_per_node)
    rows = float(np.sum(lens)) / cp
    qb, kvb = float(q_bytes(hw, rows)), float(kv_bytes(hw, rows))
    comm = 2 * all_to_all_s(hw, qb, g) + all_to_all_s(hw, kvb, g)
    shard = dataclasses.replace(hw, num_heads=hw.num_heads // g, num_kv_heads=max(1, hw.num_kv_heads // g),
                                gpus_per_node=1)
    return comm, float(x.hbm_s(6 * qb + 4 * kvb)), shard


# -- hybrid CP (Megatron) ---------------------------------------------------------------------------------------
def hybrid_dcp(hw: HardwareProfile, x: Extras, lens: np.ndarray, cp: int, mask: str, pass_: str,
               tokens_per_rank: int) -> float:
    """Megatron's hybrid/dynamic CP as the benchmark ran it: each document (sample) on a group of ranks
    (:func:`megatron_fcp.planner.baselines.plan_hybrid`: power-of-two groups, greedy placement), a ring P2P
    call per document inside its group (a plain FA3 call for a group of one), the rank's documents one after
    another; the slowest rank counts."""
    plan = plan_hybrid(np.asarray(lens, np.int64), cp, tokens_per_rank, mask)
    q = plan.q
    per_rank = np.zeros(cp)
    launch = hw.kernel_launch_us * 1e-6
    for doc in np.unique(q[:, Q.DOC]):
        ranks = np.unique(q[q[:, Q.DOC] == doc, Q.CP_RANK])
        g = int(2 ** np.ceil(np.log2(max(len(ranks), 1))))
        first = int(ranks.min() // g * g)
        n_tok = np.array([plan.doc_lens[doc]], np.int64)
        if g == 1:
            pairs = n_tok * (n_tok + 1) / 2 if mask == "causal" else n_tok * n_tok
            t = call_s(hw, pass_, mask, n_tok, n_tok, pairs) + (0.0 if x.enabled else launch)
            if pass_ == "bwd":
                t += float(x.hbm_s(fa3_gqa_bwd_bytes(hw, n_tok, pairs)))
            t = float(issue(x, hw, t, 1))
            per_rank[first] += t
        else:
            per_rank[first:first + g] += ring_times(hw, x, n_tok, g, mask, pass_, first_rank=first)
    return float(per_rank.max())


# -- point-to-point plans: MagiAttention and FCP ---------------------------------------------------------------
def _sub_pieces(plan: Plan, budget):
    pieces = plan.pieces
    index, offset, length, stage, n = split_stages(pieces[:, Piece.POS], pieces[:, Piece.END] - pieces[:, Piece.START],
                                                   pieces[:, Piece.TOTAL], budget)
    start = pieces[index, Piece.START] + offset
    return (pieces[index, Piece.DST], pieces[index, Piece.SRC], pieces[index, Piece.DOC], start, start + length,
            stage, n)


def _union_bytes(keys: np.ndarray, doc: np.ndarray, start: np.ndarray, end: np.ndarray, size: int,
                 per_token: float) -> np.ndarray:
    """Per key (a slot id < ``size``): bytes of the union of token ranges ``[start, end)`` of each document."""
    out = np.zeros(size)
    if keys.shape[0] == 0:
        return out
    order = np.lexsort((start, doc, keys))
    k, d, s, e = keys[order], doc[order], start[order], end[order]
    group = np.concatenate([[True], (k[1:] != k[:-1]) | (d[1:] != d[:-1])])
    covered = np.zeros(e.shape[0], np.float64)
    reach = -1  # the furthest end so far in the (slot, document) group
    for j in range(e.shape[0]):  # ranges per group are few; a loop keeps it exact
        if group[j]:
            reach = -1
        covered[j] = max(0, e[j] - max(s[j], reach))
        reach = max(reach, e[j])
    np.add.at(out, k, covered * per_token)
    return out


def native_round_comm(hw: HardwareProfile, dst, src, doc, start, end, rnd, cp: int, rounds: int) -> np.ndarray:
    """``[cp, rounds]``: a round of MagiAttention's native group-cast: a source sends each byte over
    InfiniBand once per destination node (to its same-rail GPU there, which forwards over NVLink); a rank's
    round takes the slowest of its NIC send (deduplicated per destination node), its node's InfiniBand inflow
    shared by the node's 8 NICs, and its NVLink receive of everything it needs from other ranks; plus a
    latency per peer node."""
    g = hw.gpus_per_node
    nodes = cp // g if cp >= g else 1
    dst_node, src_node = dst // g, src // g
    inter = dst_node != src_node
    size = cp * rounds
    # NIC send of src: union per (src, dst node, round)
    key = (src * max(nodes, 1) + dst_node) * rounds + rnd
    per_key = _union_bytes(key[inter], doc[inter], start[inter], end[inter], size * max(nodes, 1),
                           hw.kv_bytes_per_token)
    send_ib = np.zeros(size)
    keys = np.arange(per_key.shape[0])
    np.add.at(send_ib, (keys // rounds // max(nodes, 1)) * rounds + keys % rounds, per_key)
    # node inflow: per (dst node, round), spread over its g NICs
    node_in = np.zeros(max(nodes, 1) * rounds)
    np.add.at(node_in, ((keys // rounds) % max(nodes, 1)) * rounds + keys % rounds, per_key)
    recv_ib = node_in.reshape(max(nodes, 1), rounds)[np.arange(cp) // g].reshape(-1) / min(g, cp)
    # NVLink: every rank receives all bytes it needs from others (forwarded or direct)
    nbytes = (end - start) * hw.kv_bytes_per_token
    recv_nvl = np.bincount(dst * rounds + rnd, weights=nbytes, minlength=size)
    t = np.maximum.reduce([send_ib / _ib_bw(hw), recv_ib / _ib_bw(hw), recv_nvl / _nvl_bw(hw)])
    peers = np.zeros(size)
    if inter.any():
        pk = np.unique((dst[inter] * max(nodes, 1) + src_node[inter]) * rounds + rnd[inter])
        np.add.at(peers, (pk // rounds // max(nodes, 1)) * rounds + pk % rounds, 1)
    peers += 1
    return (t + hw.p2p_latency_us * 1e-6 * peers).reshape(cp, rounds)


def p2p_comm(hw: HardwareProfile, plan: Plan, budget, how: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(forward, refetch, gradient) round seconds ``[cp, rounds]`` of a point-to-point plan under ``how``:
    ``a2av`` (NCCL all-to-all-v: every (source, destination) pair's bytes over its link, the model's
    :func:`megatron_fcp.sim.model._round_comm`) or ``native`` (group-cast / group-reduce deduplicated per
    destination node)."""
    dst, src, doc, start, end, stage, n = _sub_pieces(plan, budget)
    cp = plan.cp
    rounds = max(int(n.max(initial=0)), 1)
    back = n - 1 - stage
    again = back >= 1
    if how == "native":
        fwd = native_round_comm(hw, dst, src, doc, start, end, stage, cp, rounds)
        refetch = native_round_comm(hw, dst[again], src[again], doc[again], start[again], end[again], back[again],
                                    cp, rounds)
        grad = native_round_comm(hw, src, dst, doc, start, end, back, cp, rounds)  # reduce: the cast reversed
        return fwd, refetch, grad
    nbytes = (end - start) * hw.kv_bytes_per_token
    inter = (dst // hw.gpus_per_node) != (src // hw.gpus_per_node)
    fwd = _round_comm(hw, dst, src, stage, nbytes, inter, cp, rounds)
    refetch = _round_comm(hw, dst[again], src[again], back[again], nbytes[again], inter[again], cp, rounds)
    size = cp * rounds
    sent, returned = dst * rounds + back, src * rounds + back
    grad = np.maximum(_link_seconds(hw, sent, nbytes, inter, size), _link_seconds(hw, returned, nbytes, inter, size))
    return fwd, refetch, (grad + hw.p2p_latency_us * 1e-6).reshape(cp, rounds)


def staged_pass_times(hw: HardwareProfile, x: Extras, ex: StagedExchange, local_fwd, local_bwd, share: float,
                      dkv_bwd_s: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`megatron_fcp.sim.model.staged_times` (the engine's rounds) with the added costs: every remote
    stage's partial output merged into the result (forward) and its ``dq`` accumulated (backward), 3x query
    bytes of the stage's rows each, and the attention slowed by the communication's SM share while a round
    travels; ``dkv_bwd_s`` ``[cp, rounds]``: seconds added to each stage's backward call (:func:`dkv_accum_bwd_s`).
    With :data:`BASE` it is ``staged_times``."""
    calls = ex.eff_pairs > 0
    merge = np.where(calls, x.hbm_s(3 * q_bytes(hw, np.where(calls, ex.rows, 0))), 0.0)
    slowed = (lambda compute_s, comm_s: overlapped(compute_s, comm_s, share)) if share else None
    fwd, bwd, _ = staged_times(ex, local_fwd, local_bwd, hw, stage_extra_s=merge, slowed=slowed,
                               stage_extra_bwd_s=dkv_bwd_s)
    return fwd, bwd


DKV_KERNELS = ("fa3", "ffa")
"""The kernels whose backward :func:`dkv_accum_bwd_s` charges: FA3's varlen call (GQA accumulators, a block of
padding per document) and MagiAttention's FFA (fp32 partial dK/dV always)."""


def dkv_accum_bwd_s(hw: HardwareProfile, x: Extras, plan: Plan, budget, kernel: str = "fa3"
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The fp32 dK/dV accumulation a point-to-point plan's backward calls pay beyond the calibration shapes
    (multi-head FA3 calls writing bf16 dK/dV), as HBM seconds: per rank its own-key calls (taken as one call over its
    own rows, one segment per row of its plan), and ``[cp, rounds]`` per stage call (the stage's sub-pieces as
    segments). Zero with :data:`BASE`. ``kernel``:

    - ``"fa3"``: FA3's backward under grouped-query attention (:func:`fa3_gqa_bwd_bytes`; zero without GQA). FCP's
      calls are FA3 calls in this comparison, so they pay what the baselines' FA3 calls pay.
    - ``"ffa"``: MagiAttention's FFA as its distributed runtime calls it (``functional/dist_attn.py``,
      ``attn_bwd_partial``: ``partial_dkv = torch.zeros_like(kv, dtype=torch.float32)`` per call, every query head's
      dK/dV tile reduce-added into it in fp32 by the epilogue (``epilogue_bwd.hpp``: ``SM90_TMA_REDUCE_ADD`` of
      ``Element`` = the fp32 output type at the query head's key/value head), then cast down to the key/value dtype
      before the group-reduce): the bytes of :func:`fa3_gqa_bwd_bytes` without FA3's block of padding per document,
      with or without GQA."""
    if kernel not in DKV_KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; one of {DKV_KERNELS}")
    cp = plan.cp
    dst, _, _, start, end, stage, n = _sub_pieces(plan, budget)
    rounds = max(int(n.max(initial=0)), 1)
    if not x.enabled or (kernel == "fa3" and hw.num_heads == hw.num_kv_heads):
        return np.zeros(cp), np.zeros((cp, rounds))

    def seconds(slot, length, size):  # per call (slot): its segments of ``length`` keys
        total = np.bincount(slot, weights=length, minlength=size)
        used = np.bincount(slot, weights=np.ceil(length / FA3_BWD_BLOCK_N) * FA3_BWD_BLOCK_N, minlength=size)
        segments = np.bincount(slot, minlength=size)
        padding = segments if kernel == "fa3" else 0
        nbytes = _gqa_bwd_bytes(hw.head_dim, hw.num_heads, hw.num_kv_heads, used, total, padding)
        return np.where(segments > 0, x.hbm_s(nbytes), 0.0)

    q = plan.q
    local = seconds(q[:, Q.CP_RANK], (q[:, Q.END] - q[:, Q.START]).astype(np.float64), cp)
    staged = seconds(dst * rounds + stage, (end - start).astype(np.float64), cp * rounds).reshape(cp, rounds)
    return local, staged


def p2p_pass_times(hw: HardwareProfile, x: Extras, plan: Plan, how: str | None, budget, sms: int,
                   kernel: str | None = None) -> tuple[float, float]:
    """(forward, backward) seconds of the slowest rank of a point-to-point plan: the model's staged exchange
    (:func:`megatron_fcp.sim.model.staged_exchange`) with its rounds' communication replaced per ``how``
    (None: the model's own) and the added costs of ``x`` (``kernel``: the backward's fp32 dK/dV accumulation of that
    kernel too, :func:`dkv_accum_bwd_s`)."""
    ex = staged_exchange(plan, hw, budget)
    if how is not None:
        fwd_c, ref_c, grad_c = p2p_comm(hw, plan, ex.budget, how)
        ex = dataclasses.replace(ex, fwd_comm_s=fwd_c, refetch_comm_s=ref_c, grad_comm_s=grad_c)
    fwd, bwd = _rank_pass_times(hw, x, plan, ex, how is None, sms, kernel)
    return float(fwd.max()), float(bwd.max())


def _rank_pass_times(hw: HardwareProfile, x: Extras, plan: Plan, ex: StagedExchange, own_comm: bool, sms: int,
                     kernel: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per rank: forward and backward seconds of ``ex`` (the model's own rounds where ``own_comm`` and ``x`` adds
    nothing: :func:`staged_times` as it is); ``kernel``: with :func:`dkv_accum_bwd_s` of that kernel."""
    local_fwd, local_bwd = _local_seconds(plan, hw)
    if not x.enabled and own_comm:
        fwd, bwd, _ = staged_times(ex, local_fwd, local_bwd, hw)
        return fwd, bwd
    stage_dkv = None
    if kernel is not None:
        local_dkv, stage_dkv = dkv_accum_bwd_s(hw, x, plan, ex.budget, kernel)
        local_bwd = local_bwd + local_dkv
        padded = np.zeros(ex.eff_pairs.shape)
        width = min(padded.shape[1], stage_dkv.shape[1])
        padded[:, :width] = stage_dkv[:, :width]
        stage_dkv = padded
    return staged_pass_times(hw, x, ex, local_fwd, local_bwd, x.sm_share(sms), stage_dkv)


def magi_budget(plan: Plan) -> int | None:
    """MagiAttention's overlap degree 2 (``benchmark_conf.py``: static overlap, degree 2): the remote
    key/values of the rank that receives the most, in two stages."""
    most = int(plan.recv_tokens.max(initial=0))
    return max(1, -(-most // 2)) if most else None


# -- one cell ---------------------------------------------------------------------------------------------------
def strategy_seconds(strategy: str, hw: HardwareProfile, x: Extras, lens: np.ndarray, cp: int, mask: str,
                     tokens_per_rank: int) -> dict[str, float]:
    """Modeled seconds of the slowest rank, ``{"fwd": ..., "bwd": ...}``, of ``strategy`` on one pack."""
    lens = np.asarray(lens, np.int64)
    if strategy in ("ulysses", "ring_p2p", "ring_allgather", "usp", "hybrid_dcp"):
        fn = {"ulysses": ulysses, "ring_p2p": ring_p2p, "ring_allgather": ring_allgather, "usp": usp}.get(strategy)
        if fn is None:
            return {p: hybrid_dcp(hw, x, lens, cp, mask, p, tokens_per_rank) for p in ("fwd", "bwd")}
        return {p: fn(hw, x, lens, cp, mask, p) for p in ("fwd", "bwd")}
    if strategy.startswith("magi_attn"):
        plan = plan_magi(lens, cp, tokens_per_rank, mask)
        how = strategy.split("-")[1]
        sms = x.grpcoll_sms if how == "native" else x.nccl_sms
        fwd, bwd = p2p_pass_times(hw, x, plan, how, magi_budget(plan), sms, kernel="ffa")
        return {"fwd": fwd, "bwd": bwd}
    if strategy == "fcp_heads":
        return fcp_head_parallel(hw, x, lens, cp, mask, tokens_per_rank)
    if strategy == "fcp":
        fwd, bwd = p2p_pass_times(hw, x, fcp_plan(hw, lens, cp, mask, tokens_per_rank), None, DEFAULT_KV_BUDGET,
                                  x.nccl_sms, kernel="fa3")
        return {"fwd": fwd, "bwd": bwd}
    raise ValueError(f"unknown strategy {strategy!r}")


def fcp_plan(hw: HardwareProfile, lens, cp: int, mask: str, tokens_per_rank: int) -> Plan:
    """FCP's plan of one pack on the profile's nodes: the node-aware exchange the runtime runs there."""
    return dataclasses.replace(plan_fcp(np.asarray(lens, np.int64), cp, tokens_per_rank, mask),
                               cp_node=node_layout(cp, hw))


def fcp_details(hw: HardwareProfile, x: Extras, lens: np.ndarray, cp: int, mask: str, tokens_per_rank: int,
                hop: bool = False) -> dict[str, float]:
    """FCP's step on one pack as :func:`strategy_seconds` models it (``fwd``, ``bwd``: seconds, the same figures;
    ``hop``: with the same-round hop as well, a design the runtime does not run) and what it spends on
    communication:

    - ``ib_mb_max``, ``ib_mb_mean``: key/value and gradient MB (1e6 bytes) a GPU receives over InfiniBand in one
      step (forward, refetch and gradients), the most over the GPUs and the mean;
    - ``exposed_ms``: the step (forward + backward, each pass's slowest rank) minus the same step with every
      transfer free: the communication the compute does not hide;
    - ``relayed_grad_x``: the most node-mates' partial gradients a rank receives in one backward round (the only
      buffer the node-aware exchange adds), over the rank's own key/values (its token slots).
    """
    plan = fcp_plan(hw, lens, cp, mask, tokens_per_rank)
    ex = staged_exchange(plan, hw, DEFAULT_KV_BUDGET, hop)
    fwd, bwd = _rank_pass_times(hw, x, plan, ex, True, x.nccl_sms, kernel="fa3")
    fwd0, bwd0 = _rank_pass_times(hw, x, plan, free_transfers(ex), True, x.nccl_sms, kernel="fa3")
    figures = relay_figures(plan.pieces, np.arange(cp) // hw.gpus_per_node, ex.budget, cp, hop)
    received = sum(figures[f"received_across_{phase}"] for phase in PHASES.values()) * hw.kv_bytes_per_token
    return {"fwd": float(fwd.max()), "bwd": float(bwd.max()), "ib_mb_max": float(received.max()) / 1e6,
            "ib_mb_mean": float(received.mean()) / 1e6,
            "exposed_ms": 1e3 * float(fwd.max() + bwd.max() - fwd0.max() - bwd0.max()),
            "relayed_grad_x": float(figures["peak_relayed_grad_tokens"].max() / plan.num_tokens.max())}


def fcp_head_parallel(hw: HardwareProfile, x: Extras, lens: np.ndarray, cp: int, mask: str, tokens_per_rank: int
                      ) -> dict[str, float]:
    """FCP under ``--fcp-node-exchange heads`` (:mod:`megatron_fcp.attention.head_parallel`;
    docs/node_aware_exchange.md, "Head-parallel inside the node"): inside each node of ``g = gpus_per_node`` ranks,
    the Ulysses all-to-alls turn the node's ``g`` token shards into ``g`` head shards of all the node's tokens;
    across nodes, FCP's plan of ``cp / g`` node-sized ranks (``g x tokens_per_rank`` tokens each) runs the staged
    exchange on each head shard, GPU ``i`` of a node with GPU ``i`` of the others. So each key/value of a head
    shard crosses into a node once, over the NIC of the GPU that computes it, and every kernel call covers ``g``
    times the query rows at ``1 / g`` of the heads (as Ulysses and USP do). Modeled as :func:`usp` models its node
    part (the all-to-alls and their copies, per pass) plus FCP's point-to-point plan on node-sized ranks with every
    link across nodes; on one node that plan is the local call alone (as the runtime runs it: no unpad/pad copies,
    unlike the benchmark's Ulysses).
    ``{"fwd": ..., "bwd": ...}``, seconds of the slowest rank (:func:`fcp_head_parallel_details` adds what it
    spends on communication)."""
    out = fcp_head_parallel_details(hw, x, lens, cp, mask, tokens_per_rank, details=False)
    return {"fwd": out["fwd"], "bwd": out["bwd"]}


def fcp_head_parallel_details(hw: HardwareProfile, x: Extras, lens: np.ndarray, cp: int, mask: str,
                              tokens_per_rank: int, details: bool = True, node_plan: Plan | None = None,
                              budget=DEFAULT_KV_BUDGET) -> dict[str, float]:
    """:func:`fcp_head_parallel`'s step and, with ``details``, the figures of :func:`fcp_details`: InfiniBand MB a
    GPU receives (its head shard of what its node receives: key/values forward and again in backward, and
    gradients), the exposed communication (the step minus the same step with every transfer, the all-to-alls too,
    free) and ``relayed_grad_x`` (0: nothing is relayed). ``node_plan``: the plan of the nodes to model (default:
    ``plan_fcp`` of ``lens``); ``budget``: the key/value budget of the staged exchange."""
    g = min(cp, hw.gpus_per_node)
    n = cp // g
    lens = np.asarray(lens, np.int64)
    if cp % g or hw.num_heads % g:
        raise InputError(f"the head-parallel exchange needs CP ({cp}) and the query heads ({hw.num_heads}) to be "
                         f"multiples of the GPUs per node ({g})")
    a2a, copies, shard = node_heads(hw, x, lens, cp)  # one head shard per GPU, node-sized ranks
    plan = plan_fcp(lens, n, g * tokens_per_rank, mask) if node_plan is None else node_plan
    if plan.cp != n:
        raise InputError(f"a plan of {plan.cp} ranks is not a plan of the {n} nodes of {g} GPUs of CP {cp}")
    ex = staged_exchange(plan, shard, budget)
    fwd, bwd = _rank_pass_times(shard, x, plan, ex, True, x.nccl_sms, kernel="fa3")
    out = {"fwd": a2a + copies + float(fwd.max()), "bwd": a2a + copies + float(bwd.max())}
    if not details:
        return out
    fwd0, bwd0 = _rank_pass_times(shard, x, plan, free_transfers(ex), True, x.nccl_sms, kernel="fa3")
    figures = relay_figures(plan.pieces, np.arange(n), ex.budget, n)
    received = sum(figures[f"received_across_{phase}"] for phase in PHASES.values()) * shard.kv_bytes_per_token
    return {**out, "ib_mb_max": float(received.max()) / 1e6, "ib_mb_mean": float(received.mean()) / 1e6,
            "exposed_ms": 1e3 * (out["fwd"] + out["bwd"] - 2 * copies - float(fwd0.max() + bwd0.max())),
            "relayed_grad_x": 0.0}


def node_exchange_steps(hw: HardwareProfile, x: Extras, lens: np.ndarray, p2p_plan: Plan, node_plan: Plan,
                        budget) -> dict[str, float]:
    """Modeled step (forward + backward seconds of the slowest rank) of one micro-batch under each node exchange of
    the runtime, from the plans it would run: ``p2p``, ``p2p_plan`` over the CP ranks (with their node layout);
    ``heads``, ``node_plan`` over the nodes (:func:`fcp_head_parallel_details`: ``hw.gpus_per_node`` CP ranks a
    node). What ``--fcp-node-exchange auto`` compares per micro-batch."""
    fwd, bwd = p2p_pass_times(hw, x, p2p_plan, None, budget, x.nccl_sms, kernel="fa3")
    heads = fcp_head_parallel_details(hw, x, lens, p2p_plan.cp, p2p_plan.mask, 0, details=False, node_plan=node_plan,
                                      budget=budget)
    return {"p2p": fwd + bwd, "heads": heads["fwd"] + heads["bwd"]}


# -- ring-flash-attention's published zigzag varlen benchmark, with the added costs -----------------------------
SYNC_IDLE_LAUNCHES = 1
"""Kernel launches the GPU idles after a host synchronisation (modeled): the sync empties the GPU's queue, and
the GPU waits at least for the host to launch the next kernel (the profile's launch cost)."""

H800_NVLINK_GBPS_PER_DIRECTION = 200.0
"""GB/s per direction of an H800 SXM's NVLink (400 GB/s bidirectional, NVIDIA H800 product brief)."""


def ring_flash_attention_anchor_costed(laws, peak_tflops: float, launch_s: float, tile: int, x: Extras = Extras(),
                                       world: int = 8, heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                                       nvlink_efficiency: float = 0.8, p2p_latency_us: float = 10.0
                                       ) -> dict[str, float]:
    """ring-flash-attention's benchmark (``benchmark/benchmark_varlen_kvpacked_func.py``: 8 GPUs, 8192 local
    tokens, causal, 32/8 heads of 128, forward + backward, the 4 local document layouts) modeled as
    :func:`megatron_fcp.sim.calibration.ring_flash_attention_anchor` does (same kernel calls, same laws) plus
    what its code does around them (``zigzag_ring_flash_attn_varlen.py``, ``utils.py``): per step the
    key/value transfer to the next rank (H800 NVLink; backward also the fp32 key/value gradients), waited for
    at the end of the step; the eager fp32 merge of every step's output (``block_out.to(float32)``, ``out -
    sigmoid(block_lse - lse) * (out - block_out)``: 42 bytes per output element, boolean-index gather and
    scatter of the half it updates on later steps), ``dq`` / ``dk`` / ``dv`` accumulated in fp32 every step,
    the NCCL kernels' SM share during the transfer, a latency and a rendezvous per step. Returns published
    and modeled iterations per second and the ring's share of the ideal, kernels only and with the costs."""
    from megatron_fcp.sim.calibration import RING_FLASH_ATTENTION_VARLEN, call_work, law_seconds

    fpp = 4.0 * heads * head_dim
    q_elem, kv_elem = heads * head_dim, 2 * kv_heads * head_dim  # per token: output / key+value elements
    bw = H800_NVLINK_GBPS_PER_DIRECTION * nvlink_efficiency * 1e9
    share = x.sm_share(x.nccl_sms)
    lat = (p2p_latency_us + (x.rendezvous_us if x.enabled else 0.0)) * 1e-6

    def seconds(pass_, mask, q_lens, k_lens, key_rows=False):
        _, work, rows = call_work(q_lens, k_lens, mask == "causal", tile)
        if key_rows and pass_ == "bwd":  # backward's per-row cost half per key row, as in call_s
            rows = (rows + sum(k_lens)) / 2
        return float(law_seconds(laws[pass_, mask], pass_, work, rows, fpp, peak_tflops, launch_s))

    def gqa_sum(pass_, k_rows):
        """FlashAttention-2's GQA backward (``csrc/flash_attn/flash_api.cpp``, ``mha_varlen_bwd``): the kernel
        writes dK and dV for every query head (``dk_expanded``, as the multi-head calibration shapes write them),
        then ``at::sum_out`` reads them and writes the key/value heads' sums: the extra bytes."""
        if pass_ != "bwd" or heads == kv_heads:
            return 0.0
        return float(x.hbm_s(2 * k_rows * head_dim * 2 * (heads + kv_heads)))

    single = single_costed = kernels = costed = 0.0
    for lens in RING_FLASH_ATTENTION_VARLEN:
        n = sum(lens)
        halves = [m // 2 for m in lens]
        rest = [m - h for m, h in zip(lens, halves, strict=True)]
        kv_step = n * kv_elem * 2  # bf16 key/values of the rank
        for pass_ in ("fwd", "bwd"):
            diagonal = seconds(pass_, "causal", lens, lens)
            single += diagonal
            before = seconds(pass_, "full", lens, halves)  # source before the rank: all q, first half of keys
            after = seconds(pass_, "full", rest, lens)  # after it: the second half of q, all keys
            kernels += diagonal + (world - 1) * max(before, after)
            diagonal += gqa_sum(pass_, n)  # the single GPU's call pays it too
            single_costed += diagonal
            if x.enabled:
                before = seconds(pass_, "full", lens, halves, True) + gqa_sum(pass_, sum(halves))
                after = seconds(pass_, "full", rest, lens, True) + gqa_sum(pass_, n)
            # host synchronisations (``.item()``, a CUDA scalar as a slice bound or size, a CPU boolean mask
            # indexing a CUDA tensor: PyTorch's blocking copy, ``memcpy_and_sync``): before the loop and per step
            # of each kind (a source before the rank / after it); each costs a launch of idle GPU (below)
            docs = len(lens)
            if pass_ == "fwd":
                pre_syncs = (2 * (1 + 2 * docs) if docs > 1 else 0) + 1  # get_half_index x2 (slices: none); q1
                syncs_before, syncs_after = 2, 4  # k0, v0 gathered / out, lse gathered and written back
            else:
                pre_syncs = 3 + 2 * docs  # dout1, q1, out1; get_half_lse's two .item() per document
                syncs_before, syncs_after = 6, 2  # k0, v0, dk[i0] +=, dv[i0] += / dq[i1] +=
            sync_s = SYNC_IDLE_LAUNCHES * launch_s if x.enabled else 0.0
            if pass_ == "fwd":
                comm = kv_step / bw + lat
                first_extra = x.hbm_s(n * q_elem * 6)  # first block_out to fp32
                # later steps: full merge (before) or gather + merge + scatter of the half (after)
                merge_before = x.hbm_s(n * q_elem * 42 + n * kv_elem)  # + k0/v0 gathered
                merge_after = x.hbm_s(n / 2 * q_elem * (42 + 16))
                last = x.hbm_s(n * q_elem * 6)  # out.to(bf16)
            else:
                comm = (kv_step + n * kv_elem * 4) / bw + lat  # key/values bf16 + their gradients fp32
                first_extra = x.hbm_s(n * q_elem * 6 + n * kv_elem * 6)  # dq, dk, dv to fp32
                merge_before = x.hbm_s(n * q_elem * 10 + n / 2 * kv_elem * (10 + 16) + n * kv_elem)
                merge_after = x.hbm_s(n / 2 * q_elem * (10 + 16) + n * kv_elem * 10)
                last = x.hbm_s(n * q_elem * 6 + n * kv_elem * 6)
            # backward has two NCCL transfers in flight (key/values and their gradients, two RingComm objects)
            sh = share if pass_ == "fwd" else min(2 * share, 0.9)
            merge_before = merge_before + syncs_before * sync_s
            merge_after = merge_after + syncs_after * sync_s
            step = max(overlapped(before + merge_before, comm, sh), overlapped(after + merge_after, comm, sh))
            costed += float(overlapped(diagonal + first_extra, comm, sh)) + (world - 2) * float(step) + max(
                before + merge_before, after + merge_after) + float(last) + pre_syncs * sync_s
    k = len(RING_FLASH_ATTENTION_VARLEN)
    return {"published_single_iter_s": 225.4, "published_ring_iter_s": 21.4, "published_ratio": 21.4 * 8 / 225.4,
            "single_iter_s": k / single, "ring_iter_s_kernels": k / kernels, "ratio_kernels": world * single / kernels,
            "single_iter_s_costed": k / single_costed, "ring_iter_s": k / costed,
            "ratio": world * single_costed / costed}
