"""Every rank's attention kernel calls, as the runtime issues them, and their replay on one device.

A plan's attention step is a fixed list of varlen kernel calls per rank; their shapes follow from the plan alone,
not from the data. This module lists them, records them from the real runtime to check that list, times call
shapes on one device, and turns the timings into per-rank kernel time, compute imbalance and attention MFU
(``scripts/gpu_perf.py``).

Which calls a rank issues (:func:`rank_calls`):

- point-to-point plans (``exchange`` ``p2p``: FCP, MagiAttention-style; ``group_ring``: Megatron hybrid CP) as
  :func:`megatron_fcp.attention.fcp_attention` runs them: the calls of the rank's
  :class:`~megatron_fcp.attention.schedule.RankSchedule` under a key/value budget. Forward: the local calls (own
  keys: under a causal mask the diagonal call, then the "earlier own rows" call if any row sees one; under a full
  mask one call), then one call per received stage that some query sees, in stage order. Backward: the stages'
  calls in reverse stage order, then the local calls. Hybrid plans run on the p2p engine this way, not stepped as
  Megatron's per-group ring would step them.
- ``ring`` plans as :func:`megatron_fcp.testing.ring.ring_attention` runs them
  (:func:`~megatron_fcp.testing.ring.ring_schedule`, a schedule of the same rounds): the local calls, then for
  step ``s`` one call against the whole buffer of rank ``r - s`` if any query sees it; backward the steps in
  reverse order, then the local calls.

:func:`record_calls` runs the real runtime (``fcp_attention`` or ``ring_attention`` with an exchange that moves
nothing, or the in-process executor) with a backend that records every call; the tests check it equals
:func:`rank_calls` call for call.

Timing (:class:`KernelTimer`): each distinct call shape is timed once, forward and backward, with the backend's own
``forward``/``backward`` on slices of buffers allocated once at the largest size (CUDA events on a GPU,
``perf_counter`` on the CPU), median of the timed repetitions after warm-up. A rank's kernel time is the sum of
its calls' medians (:func:`summarise_cell`); gathers, merges and communication are not included.

FLOPs follow the FlashAttention convention: forward ``4 * pairs * q_heads * head_dim``, backward 2.5 times that,
where ``pairs`` counts only the query-key pairs the call computes (a causal diagonal block of ``n`` tokens has
``n * (n + 1) / 2``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_fcp.attention.engine import fcp_attention
from megatron_fcp.attention.exchange import ByteCounter, MemoryMeter, P2PExchange, Pending
from megatron_fcp.attention.schedule import build_schedule
from megatron_fcp.kernels import Backend, VarlenCall, get_backend
from megatron_fcp.kernels.base import SegmentTotals, check_segments
from megatron_fcp.planner.pairs import BWD_FLOPS_FACTOR
from megatron_fcp.planner.plan import Plan, RankPlan
from megatron_fcp.planner.stages import DEFAULT_KV_BUDGET
from megatron_fcp.testing.executor import run_in_process
from megatron_fcp.testing.ring import ring_attention

H200_PEAK_BF16_FLOPS = 989.4e12
"""Dense bf16 peak of an H200 (SXM), FLOP/s."""


# -- call shapes -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CallShape(SegmentTotals):
    """The shape of one varlen kernel call: what its cost depends on (see :class:`~megatron_fcp.kernels.VarlenCall`)."""

    q_lens: tuple[int, ...]
    k_lens: tuple[int, ...]
    causal: bool

    def __post_init__(self):
        if not self.q_lens:
            raise ValueError("a call needs at least one segment")
        check_segments(self.q_lens, self.k_lens, self.causal)

    @classmethod
    def of(cls, call: VarlenCall) -> CallShape:
        return cls(tuple(call.q_lens), tuple(call.k_lens), bool(call.causal))

    @classmethod
    def uniform(cls, num_segments: int, q_len: int, k_len: int | None = None, causal: bool = False) -> CallShape:
        """``num_segments`` equal segments of ``q_len`` queries and ``k_len`` keys (default ``q_len``)."""
        k_len = q_len if k_len is None else k_len
        return cls((q_len,) * num_segments, (k_len,) * num_segments, causal)

    @functools.cached_property
    def pairs(self) -> int:
        """Query-key pairs the call computes (causal: only the visible ones, diagonal included)."""
        if self.causal:
            return sum(n * (n + 1) // 2 for n in self.q_lens)
        return sum(a * b for a, b in zip(self.q_lens, self.k_lens, strict=True))

    def flops(self, q_heads: int, head_dim: int, pass_: str = "fwd") -> float:
        """FlashAttention-convention FLOPs of the forward or backward call."""
        fwd = 4.0 * self.pairs * q_heads * head_dim
        return fwd * (BWD_FLOPS_FACTOR if pass_ == "bwd" else 1.0)

    def varlen_call(self, device) -> VarlenCall:
        return VarlenCall.make(self.q_lens, self.k_lens, self.causal, device)

    def describe(self) -> str:
        """A short summary: ``"causal 3x[q 512..4096] k=q"`` style."""
        kind = "causal" if self.causal else "full"
        if len(set(self.q_lens)) == 1 and len(set(self.k_lens)) == 1:
            seg = f"q {self.q_lens[0]} k {self.k_lens[0]}"
        else:
            seg = f"q {min(self.q_lens)}..{max(self.q_lens)} k {min(self.k_lens)}..{max(self.k_lens)}"
        return f"{kind} {self.num_segments}x[{seg}] (q {self.num_q}, k {self.num_k})"

    def summary(self) -> dict:
        """JSON-ready figures of the shape (not the segment lists)."""
        return {"causal": self.causal, "num_segments": self.num_segments, "num_q": self.num_q, "num_k": self.num_k,
                "max_q": max(self.q_lens), "max_k": max(self.k_lens), "pairs": self.pairs}


@dataclass(frozen=True)
class RankCalls:
    """The kernel calls of one rank's attention step (one layer), in the order the runtime issues them."""

    cp_rank: int
    forward: tuple[CallShape, ...]
    backward: tuple[CallShape, ...]

    def calls(self) -> Iterator[tuple[str, CallShape]]:
        """``(pass, shape)`` in issue order: forward, then backward."""
        yield from (("fwd", s) for s in self.forward)
        yield from (("bwd", s) for s in self.backward)

    @property
    def shapes(self) -> set[CallShape]:
        return set(self.forward) | set(self.backward)


def p2p_rank_calls(plan: Plan, cp_rank: int, kv_budget_tokens=DEFAULT_KV_BUDGET) -> RankCalls:
    """Calls of one rank of a point-to-point (or group-ring) plan as ``fcp_attention`` issues them."""
    sched = build_schedule(plan.for_rank(cp_rank), "cpu", kv_budget_tokens)
    local = [CallShape.of(c.call) for c in sched.local_calls]
    stages = [CallShape.of(s.call.call) for s in sched.stages if s.call is not None]
    return RankCalls(cp_rank, tuple(local + stages), tuple(stages[::-1] + local))


def _rank_rows(plan: Plan) -> list[np.ndarray]:
    """Per rank: its ``(doc, start, end)`` rows in local order."""
    q = plan.q
    return [q[q[:, 0] == r, 1:] for r in range(plan.cp)]


def _ring_local_calls(plan: Plan, cp_rank: int, own: np.ndarray) -> list[CallShape]:
    """The local calls of a ring rank: its schedule's, built from a view without received key/values."""
    view = RankPlan(cp_rank=cp_rank, cp=plan.cp, mask=plan.mask, q=tuple(map(tuple, own.tolist())), kv_recv=(),
                    kv_send=(), num_tokens=int(plan.num_tokens[cp_rank]),
                    num_pad_tokens=int(plan.num_pad_tokens[cp_rank]), recv_pieces=(), send_pieces=(),
                    plan_digest=plan.digest)
    return [CallShape.of(c.call) for c in build_schedule(view, "cpu").local_calls]


def _visible_shape(own: np.ndarray, keys: np.ndarray, mask: str, span: int) -> CallShape | None:
    """The shape :func:`~megatron_fcp.attention.schedule.visible_call` gives query rows ``own`` against key rows
    ``keys`` (disjoint ``(doc, start, end)`` rows), computed with sorted arrays instead of a walk over rows: each
    query row with any visible key gets one segment of every key row of its document that it sees entirely
    (causal: ending at or before its start; full: all)."""
    if own.shape[0] == 0 or keys.shape[0] == 0:
        return None
    order = np.argsort(keys[:, 0] * span + keys[:, 2], kind="stable")
    sorted_key = (keys[:, 0] * span + keys[:, 2])[order]
    cum = np.concatenate([[0], np.cumsum((keys[:, 2] - keys[:, 1])[order])])
    lo = np.searchsorted(sorted_key, own[:, 0] * span, side="left")
    last = own[:, 1] if mask == "causal" else np.full(own.shape[0], span - 1)
    hi = np.searchsorted(sorted_key, own[:, 0] * span + last, side="right")
    k_lens = cum[hi] - cum[lo]
    seen = k_lens > 0
    if not seen.any():
        return None
    return CallShape(tuple((own[seen, 2] - own[seen, 1]).tolist()), tuple(k_lens[seen].tolist()), False)


def ring_rank_calls(plan: Plan, cp_rank: int, rows: list[np.ndarray] | None = None) -> RankCalls:
    """Calls of one rank of a ring plan as ``ring_attention`` issues them: the calls of
    :func:`~megatron_fcp.testing.ring.ring_schedule` (the local calls, then for step ``s`` the rank's rows against
    rank ``r - s``'s; backward the steps in reverse, then the local calls), without its per-step views and row
    walks (``cp**2`` of them for a whole plan).
    ``rows``: :func:`_rank_rows` if already at hand."""
    rows = rows if rows is not None else _rank_rows(plan)
    span = int(plan.doc_lens.max(initial=0)) + 1
    local, steps = _ring_local_calls(plan, cp_rank, rows[cp_rank]), []
    for s in range(1, plan.cp):
        shape = _visible_shape(rows[cp_rank], rows[(cp_rank - s) % plan.cp], plan.mask, span)
        steps += [shape] if shape else []
    return RankCalls(cp_rank, tuple(local + steps), tuple(steps[::-1] + local))


def rank_calls(plan: Plan, kv_budget_tokens=DEFAULT_KV_BUDGET) -> list[RankCalls]:
    """Every rank's calls, by the plan's exchange (see the module docstring)."""
    if plan.exchange == "ring":
        rows = _rank_rows(plan)
        return [ring_rank_calls(plan, r, rows) for r in range(plan.cp)]
    plan.pieces  # noqa: B018  (computed once here rather than in part for every rank's view)
    return [p2p_rank_calls(plan, r, kv_budget_tokens) for r in range(plan.cp)]


def single_call(doc_lens, mask: str) -> CallShape:
    """Every document of a micro-batch as one segment of one single-GPU call (the ideal: no CP split)."""
    lens = tuple(int(n) for n in np.asarray(doc_lens).tolist() if n > 0)
    return CallShape(lens, lens, mask == "causal")


# -- recording the real runtime --------------------------------------------------------------------------------
class RecordingBackend(Backend):
    """Passes every call to ``inner`` and records ``(pass, shape, tag)``; ``tag`` is ``q[0, 0, 0]`` as an int (the
    in-process executor's inputs carry their rank there, see :func:`record_calls`)."""

    def __init__(self, inner: Backend):
        self.inner, self.name = inner, f"recording-{inner.name}"
        self.log: list[tuple[str, CallShape, int]] = []

    def check(self, q, k):
        self.inner.check(q, k)

    def forward(self, q, k, v, call, scale):
        self.log.append(("fwd", CallShape.of(call), int(q[0, 0, 0].item())))
        return self.inner.forward(q, k, v, call, scale)

    def backward(self, dout, q, k, v, out, lse, call, scale):
        self.log.append(("bwd", CallShape.of(call), int(q[0, 0, 0].item())))
        return self.inner.backward(dout, q, k, v, out, lse, call, scale)


class NullExchange(P2PExchange):
    """An exchange of CP rank ``cp_rank`` of ``cp`` that moves nothing: every receive buffer gets zeros. The kernel
    calls of a step do not depend on the data, so a rank run with it issues exactly its real calls."""

    def __init__(self, cp_rank: int, cp: int):  # no process group: nothing is ever sent
        self.group, self.cp_rank, self.cp, self.timeout_s = None, cp_rank, cp, 0.0
        self.counter, self.memory = ByteCounter(), MemoryMeter()
        self._global = list(range(cp))

    def post(self, phase: str, sends, recvs) -> Pending:
        for _, t in recvs:
            t.zero_()  # defined values (uninitialised memory can hold denormals, which are slow on a CPU)
        return Pending([], [], phase, self.cp_rank, self.timeout_s)


@contextlib.contextmanager
def single_process_group():
    """A one-process gloo group for code that insists on ``torch.distributed`` being initialized (the
    :class:`NullExchange` never uses it); reuses and keeps an existing one."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


@contextlib.contextmanager
def one_thread():
    """Run CPU kernels on one thread: tiny calls run many times faster than on a pool of threads, most of all on a
    busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _rank_inputs(n: int, heads: tuple[int, int], head_dim: int, tag: int, gen: torch.Generator, dtype):
    q = torch.randn(n, heads[0], head_dim, generator=gen).to(dtype)
    k, v = (torch.randn(n, heads[1], head_dim, generator=gen).to(dtype) for _ in range(2))
    dout = torch.randn(n, heads[0], head_dim, generator=gen).to(dtype)
    q[:, 0, 0] = tag  # the recorder reads the rank from here (every call's first query row is a real row)
    return q, k, v, dout


def record_calls(plan: Plan, kv_budget_tokens=DEFAULT_KV_BUDGET, *, path: str = "engine", backend: str = "cpu",
                 heads: tuple[int, int] = (2, 1), head_dim: int = 8, dtype=torch.float32) -> list[RankCalls]:
    """Run one forward and backward of every rank through the real runtime on small CPU tensors and record the
    kernel calls each rank issues.

    ``path="engine"``: each rank alone through ``fcp_attention`` (point-to-point and group-ring plans) or
    ``ring_attention`` (ring plans) with a :class:`NullExchange`, as a distributed job runs them.
    ``path="executor"``: every rank at once through the in-process executor (point-to-point and group-ring plans
    only).
    """
    with one_thread():
        return _record_calls(plan, kv_budget_tokens, path, backend, heads, head_dim, dtype)


def _record_calls(plan: Plan, kv_budget_tokens, path: str, backend: str, heads: tuple[int, int], head_dim: int,
                  dtype) -> list[RankCalls]:
    recorder = RecordingBackend(get_backend(backend))
    gen = torch.Generator().manual_seed(0)
    inputs = [_rank_inputs(int(plan.num_tokens[r]), heads, head_dim, r, gen, dtype) for r in range(plan.cp)]
    if path == "executor":
        if plan.exchange == "ring":
            raise ValueError("the in-process executor runs point-to-point plans; record ring plans with path='engine'")
        q, k, v, dout = (list(x) for x in zip(*inputs, strict=True))
        run_in_process(plan, q, k, v, dout, backend=recorder, kv_budget_tokens=kv_budget_tokens)
    elif path == "engine":
        with single_process_group() if plan.exchange != "ring" else contextlib.nullcontext():
            for r, (q, k, v, dout) in enumerate(inputs):
                x = [t.clone().requires_grad_() for t in (q, k, v)]
                exchange = NullExchange(r, plan.cp)
                if plan.exchange == "ring":
                    out = ring_attention(*x, plan, exchange, backend=recorder)
                else:
                    out = fcp_attention(*x, plan.for_rank(r), backend=recorder, exchange=exchange,
                                        kv_budget_tokens=kv_budget_tokens, verify_plan=False)
                out.backward(dout)
    else:
        raise ValueError(f"unknown path {path!r}: use 'engine' or 'executor'")
    calls: list[dict[str, list[CallShape]]] = [{"fwd": [], "bwd": []} for _ in range(plan.cp)]
    for pass_, shape, tag in recorder.log:
        calls[tag][pass_].append(shape)
    return [RankCalls(r, tuple(c["fwd"]), tuple(c["bwd"])) for r, c in enumerate(calls)]


# -- timing ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """Median milliseconds of one call shape, forward and backward, and the samples behind each."""

    fwd_ms: float
    bwd_ms: float
    fwd_reps: int
    bwd_reps: int

    def ms(self, pass_: str) -> float:
        return self.fwd_ms if pass_ == "fwd" else self.bwd_ms


class BudgetExceeded(RuntimeError):
    """The timer's deadline passed; what was timed so far stays in its cache."""


class KernelTimer:
    """Times call shapes with a backend's ``forward``/``backward`` (see the module docstring); caches by shape.

    Repetitions adapt to the call, to keep a whole sweep's device time near one execution per call where that is
    accurate enough: the first timed call of a pass (the probe; the forward probe also gives the output and
    log-sum-exp backward needs) decides. A probe of at least ``long_ms`` is the result (one sample: the device is
    warm from earlier calls and such a call is long enough to time alone); otherwise ``warmup - 1`` more untimed
    calls, then ``ceil(target_ms / probe)`` timed calls (at least ``min_reps``, at most ``max_reps``), median.
    """

    def __init__(self, backend: str | Backend, device, q_heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                 dtype=torch.bfloat16, *, warmup: int = 3, min_reps: int = 3, max_reps: int = 10,
                 target_ms: float = 5.0, long_ms: float = 2.0, deadline: float | None = None, seed: int = 0):
        self.device = torch.device(device)
        self.backend = get_backend(backend, self.device)
        self.q_heads, self.kv_heads, self.head_dim, self.dtype = q_heads, kv_heads, head_dim, dtype
        self.scale = 1.0 / math.sqrt(head_dim)
        self.warmup, self.min_reps, self.max_reps = warmup, min_reps, max_reps
        self.target_ms, self.long_ms, self.deadline = target_ms, long_ms, deadline
        self.cache: dict[CallShape, Timing] = {}
        self.failed: dict[CallShape, str] = {}
        self.busy_s = 0.0
        """Wall seconds spent timing (probes, warm-ups and repetitions)."""
        self._gen = torch.Generator(device=self.device).manual_seed(seed)
        self._bufs: dict[str, torch.Tensor] = {}
        self._cuda = self.device.type == "cuda"

    def runs(self, probe_ms: float) -> tuple[int, int]:
        """``(executions, timed samples)`` of one pass whose probe took ``probe_ms`` (the probe included)."""
        if probe_ms >= self.long_ms:
            return 1, 1
        reps = int(min(self.max_reps, max(self.min_reps, math.ceil(self.target_ms / max(probe_ms, 1e-3)))))
        return 1 + max(self.warmup - 1, 0) + reps, reps

    # buffers allocated once at the largest size seen, sliced per call
    def reserve(self, num_q: int, num_k: int) -> None:
        """Allocate (or grow) the input buffers for calls of up to ``num_q`` queries and ``num_k`` keys.

        On a GPU, also run a block the size of such a call's outputs and scratch through PyTorch's caching allocator
        (output, ``dq`` and its float32 accumulator, expanded grouped-query ``dk``/``dv``; at most 90% of the free
        memory), so that calls timed later find their memory cached instead of waiting for ``cudaMalloc``.
        """
        grown = False
        for name, n, heads in (("q", num_q, self.q_heads), ("dout", num_q, self.q_heads),
                               ("k", num_k, self.kv_heads), ("v", num_k, self.kv_heads)):
            if name not in self._bufs or self._bufs[name].shape[0] < n:
                self._bufs.pop(name, None)
                buf = torch.empty((n, heads, self.head_dim), dtype=self.dtype, device=self.device)
                self._bufs[name] = buf.normal_(generator=self._gen)
                grown = True
        if grown and self._cuda:
            row = self.head_dim * torch.empty((), dtype=self.dtype).element_size()
            need = 6 * num_q * self.q_heads * row + 2 * num_k * self.kv_heads * row
            block = torch.empty(int(min(need, 0.9 * torch.cuda.mem_get_info(self.device)[0])), dtype=torch.uint8,
                                device=self.device)
            del block

    def _inputs(self, shape: CallShape):
        self.reserve(shape.num_q, shape.num_k)
        b = self._bufs
        return b["q"][: shape.num_q], b["k"][: shape.num_k], b["v"][: shape.num_k], b["dout"][: shape.num_q]

    def _clock(self, fn: Callable[[], object], n: int) -> list[float]:
        """Milliseconds of each of ``n`` calls of ``fn``."""
        if not self._cuda:
            out = []
            for _ in range(n):
                start = time.perf_counter()
                fn()
                out.append((time.perf_counter() - start) * 1e3)
            return out
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(self.device)
        return [start.elapsed_time(end) for start, end in events]

    def _measure(self, fn: Callable[[], object]) -> tuple[float, int]:
        probe = self._clock(fn, 1)[0]
        runs, reps = self.runs(probe)
        if reps == 1 and runs == 1:
            return probe, 1
        for _ in range(runs - 1 - reps):
            fn()
        return statistics.median(self._clock(fn, reps)), reps

    def time(self, shape: CallShape) -> Timing:
        """Forward and backward medians of ``shape`` (cached). Raises :class:`BudgetExceeded` past the deadline."""
        if shape in self.cache:
            return self.cache[shape]
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise BudgetExceeded(f"time budget spent before {shape.describe()}")
        start = time.perf_counter()
        q, k, v, dout = self._inputs(shape)
        call = shape.varlen_call(self.device)
        be, scale, last = self.backend, self.scale, {}

        def forward():
            last["fwd"] = be.forward(q, k, v, call, scale)

        fwd_ms, fwd_reps = self._measure(forward)
        out, lse = last.pop("fwd")
        bwd_ms, bwd_reps = self._measure(lambda: be.backward(dout, q, k, v, out, lse, call, scale))
        self.busy_s += time.perf_counter() - start
        self.cache[shape] = Timing(fwd_ms, bwd_ms, fwd_reps, bwd_reps)
        return self.cache[shape]

    def try_time(self, shape: CallShape) -> Timing | None:
        """:meth:`time`, but a call the device cannot run (out of memory, unsupported) is recorded in ``failed``
        and gives None. :class:`BudgetExceeded` still propagates."""
        if shape in self.failed:
            return None
        try:
            return self.time(shape)
        except BudgetExceeded:
            raise
        except (RuntimeError, ValueError) as err:  # torch.cuda.OutOfMemoryError is a RuntimeError
            self.failed[shape] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            return None  # (the caching allocator already released what it could before raising out of memory)


# -- the figures of one cell ------------------------------------------------------------------------------------
def rank_times_ms(calls: Iterable[RankCalls], timings: dict[CallShape, Timing]) -> list[dict[str, float]]:
    """Per rank: forward, backward and total kernel milliseconds (sums of its calls' medians)."""
    out = []
    for rc in calls:
        fwd = sum(timings[s].fwd_ms for s in rc.forward)
        bwd = sum(timings[s].bwd_ms for s in rc.backward)
        out.append({"fwd_ms": fwd, "bwd_ms": bwd, "total_ms": fwd + bwd, "num_calls": len(rc.forward)})
    return out


def summarise_cell(calls: list[RankCalls], timings: dict[CallShape, Timing], ideal: CallShape, q_heads: int,
                   head_dim: int, peak_flops: float = H200_PEAK_BF16_FLOPS) -> dict:
    """Measured figures of one plan (see the module docstring): per-rank kernel time (forward + backward), the
    slowest rank, compute imbalance (max / mean), the ideal (the single-GPU call of every document, divided by
    ``cp``) and attention MFU (useful FLOPs / (``cp`` x slowest rank x peak))."""
    cp = len(calls)
    ranks = rank_times_ms(calls, timings)
    totals = [r["total_ms"] for r in ranks]
    slowest, mean = max(totals), sum(totals) / cp
    single = timings[ideal].fwd_ms + timings[ideal].bwd_ms
    useful = ideal.flops(q_heads, head_dim, "fwd") * (1 + BWD_FLOPS_FACTOR)
    return {
        "cp": cp,
        "rank_ms": totals,
        "rank_fwd_ms": [r["fwd_ms"] for r in ranks],
        "rank_bwd_ms": [r["bwd_ms"] for r in ranks],
        "rank_calls": [r["num_calls"] for r in ranks],
        "slowest_rank": int(np.argmax(totals)),
        "slowest_ms": slowest,
        "mean_ms": mean,
        "imbalance": slowest / mean if mean > 0 else float("nan"),
        "single_gpu_ms": single,
        "ideal_ms": single / cp,
        "slowest_vs_ideal": slowest / (single / cp) if single > 0 else float("nan"),
        "useful_flops": useful,
        "mfu": useful / (cp * slowest * 1e-3 * peak_flops) if slowest > 0 else float("nan"),
        "ideal_mfu": useful / (single * 1e-3 * peak_flops) if single > 0 else float("nan"),
        "max_calls_per_rank": max(r["num_calls"] for r in ranks),
        "distinct_shapes": len(set().union(*(rc.shapes for rc in calls))),
    }
