"""FCP attention across 2, 3 and 4 gloo processes: equal to the float64 dense reference, bit-identical to the
in-process executor, moving exactly the plan's bytes in every phase and holding exactly the plan's key/value
memory, with and without a key/value budget (down to a few dozen tokens, many stages); ranks holding different
plans or budgets stop with one line before anything moves; bad input fails on every rank; a silent peer times
out; exchanges are cached per process group object.

Each world size starts its processes once and runs every case inside them (process start-up dominates).
"""

import time
import zlib

import pytest
import torch
import torch.distributed as dist

from megatron_fcp.attention import ExchangeTimeout, fcp_attention, get_exchange
from megatron_fcp.attention.engine import PlanMismatchError
from megatron_fcp.errors import InputError
from megatron_fcp.planner.api import make_plan
from megatron_fcp.planner.stages import p2p_memory
from megatron_fcp.testing.cases import Case, batch, rel_err
from megatron_fcp.testing.executor import run_in_process
from megatron_fcp.testing.gloo import run_on_gloo
from megatron_fcp.testing.layout import join_from_ranks
from megatron_fcp.testing.ring import ring_attention, ring_schedule

pytestmark = pytest.mark.distributed

CASES = {  # (batch, mask, dtype, key/value budget)
    2: [("linux_files", "causal", torch.float32, "auto"), ("spamassassin", "full", torch.float32, None),
        ("spanning", "causal", torch.float64, 24), ("ones", "full", torch.float32, "auto"),
        ("tiny_rank", "full", torch.float32, 32), ("linux_files", "full", torch.bfloat16, "auto")],
    3: [("magi_hist", "causal", torch.float64, None), ("spanning", "full", torch.float32, 40),
        ("linux_files", "causal", torch.float32, 17), ("spamassassin", "full", torch.float64, "auto")],
    4: [("linux_files", "causal", torch.float32, "auto"), ("magi_hist", "full", torch.float32, 48),
        ("spanning", "full", torch.float64, None), ("tiny_rank", "causal", torch.float32, 20),
        ("ones", "causal", torch.float32, None), ("spamassassin", "causal", torch.bfloat16, 64)],
}
BATCH_TOKENS = 2048


def _saved_bytes(fn):
    """Run ``fn`` and count the bytes autograd saves for backward (saved-tensor hooks)."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(saved)


def _run_case(rank, world, name, mask, dtype, budget="auto", group=None, cp=None, strategy="fcp"):
    cp = cp or world
    group_rank = dist.get_rank(group)
    case = Case(batch(name, cp, BATCH_TOKENS // cp), cp, BATCH_TOKENS // cp, mask, strategy=strategy,
                seed=zlib.crc32(name.encode()) % 1000)
    where = f"{name}/{mask}/{dtype}/budget {budget}"
    q, k, v, dout = case.inputs(dtype)
    mine = [x[group_rank].clone().requires_grad_() for x in (q, k, v)]
    exchange = get_exchange(group, timeout_s=60)
    exchange.counter.reset()
    exchange.memory.reset_peak()
    view = case.plan.for_rank(group_rank)
    out, saved = _saved_bytes(lambda: fcp_attention(*mine, view, group, case.scale, backend="cpu",
                                                    exchange=exchange, kv_budget_tokens=budget))
    kept = exchange.memory.current("kv")
    out.backward(dout[group_rank])
    local = run_in_process(case.plan, q, k, v, dout, backend="cpu", softmax_scale=case.scale,
                           kv_budget_tokens=budget)
    got = {"out": out.detach(), "dq": mine[0].grad, "dk": mine[1].grad, "dv": mine[2].grad}
    want = {"out": local.out, "dq": local.dq, "dk": local.dk, "dv": local.dv}
    for key, tensor in got.items():
        assert torch.equal(tensor, want[key][group_rank]), f"{where}: {key} differs from executor"
    bars = {torch.bfloat16: None, torch.float32: 1e-5, torch.float64: 1e-10}
    bar = case.plain(torch.bfloat16) if dtype == torch.bfloat16 else dict.fromkeys(want, bars[dtype] / 2)
    for key, parts in want.items():
        err = rel_err(join_from_ranks(case.plan, parts), case.ref[key])
        assert err <= 2 * bar[key], f"{where}: {key} relative error {err:.2e} > {2 * bar[key]:.2e}"
    # bytes: forward = the plan's key/value ranges; backward = what the stage split fetches again, and gradients
    row_bytes = 2 * k[0].shape[1] * k[0].shape[2] * torch.empty(0, dtype=dtype).element_size()  # k and v
    recv = sum(e - s for _, _, s, e in view.kv_recv) * row_bytes  # the ranges the plan lists, nothing else
    send = sum(e - s for _, _, s, e in view.kv_send) * row_bytes
    if strategy == "fcp":  # the plan's own volume figures (ring plans count ring traffic there)
        assert (recv, send) == (case.plan.recv_tokens[group_rank] * row_bytes,
                                case.plan.send_tokens[group_rank] * row_bytes)
    mem = {key: int(val[group_rank]) * row_bytes for key, val in
           p2p_memory(case.plan.num_tokens, case.plan.pieces, budget).items()}
    c = exchange.counter
    assert (c.received.get("forward", 0), c.sent.get("forward", 0)) == (recv, send), f"{where}: forward {c}"
    assert c.received.get("backward_kv", 0) == mem["refetch_kv_tokens"], f"{where}: refetched {c}"
    assert c.sent.get("backward_kv", 0) == local.counters[group_rank].sent.get("backward_kv", 0)
    assert (c.sent.get("backward_grad", 0), c.received.get("backward_grad", 0)) == (recv, send), where
    # memory: received buffers held at once and kept for backward, as the plan says
    assert exchange.memory.peak.get("kv", 0) == mem["peak_remote_kv_tokens"], f"{where}: peak {exchange.memory.peak}"
    assert kept == mem["saved_remote_kv_tokens"], f"{where}: kept {kept} bytes"
    own = sum(t.numel() * t.element_size() for t in (q[group_rank], k[group_rank], v[group_rank], out))
    lse = view.num_tokens - view.num_pad_tokens
    lse_bytes = lse * q[0].shape[1] * (8 if dtype == torch.float64 else 4)
    assert saved == own + lse_bytes + kept, f"{where}: autograd saved {saved} bytes"
    assert exchange.memory.current("kv") == 0, f"{where}: received key/values alive after backward"
    if dtype in (torch.float32, torch.float64):  # the accumulators are the gradients that travel (no copy)
        assert exchange.memory.peak.get("grad", 0) == mem["peak_grad_tokens"], f"{where}: {exchange.memory.peak}"
    assert exchange.memory.peak.get("returned", 0) == mem["peak_returned_grad_tokens"], f"{where}: returned"
    # the executor runs the same rounds: the same bytes in every phase, the same buffers held
    mirror = local.counters[group_rank]
    assert (mirror.sent, mirror.received) == (c.sent, c.received), f"{where}: executor counted {mirror}"
    kinds = ("kv", "grad", "returned")
    assert [local.memory[group_rank].peak.get(kind, 0) for kind in kinds] == \
        [exchange.memory.peak.get(kind, 0) for kind in kinds], \
        f"{where}: executor held {local.memory[group_rank].peak}, the step {exchange.memory.peak}"
    assert local.saved_kv_bytes[group_rank] == kept, f"{where}: executor kept {local.saved_kv_bytes}"
    if budget not in (None, "auto") and mem["recv_kv_tokens"] > 2 * budget * row_bytes:
        assert mem["num_stages"] > 2


def _ring_case(rank, world, name, mask):
    """The ring baseline, a schedule of the same rounds, also equals the float64 reference, and the executor
    running the same schedules bit for bit."""
    case = Case(batch(name, world, BATCH_TOKENS // world), world, BATCH_TOKENS // world, mask, strategy="ring")
    q, k, v, dout = case.inputs(torch.float32)
    mine = [x[rank].clone().requires_grad_() for x in (q, k, v)]
    out = ring_attention(*mine, case.plan, get_exchange(None, timeout_s=60), case.scale, backend="cpu")
    out.backward(dout[rank])
    got = {"out": out.detach(), "dq": mine[0].grad, "dk": mine[1].grad, "dv": mine[2].grad}
    for key, tensor in got.items():
        parts = [torch.zeros_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor)
        err = rel_err(join_from_ranks(case.plan, parts), case.ref[key])
        assert err <= 1e-5, f"ring {name}/{mask}: {key} relative error {err:.2e}"
    rings = [ring_schedule(case.plan, r, "cpu") for r in range(world)]
    local = run_in_process(case.plan, q, k, v, dout, backend="cpu", softmax_scale=case.scale, schedules=rings)
    for key, tensor in got.items():
        assert torch.equal(tensor, getattr(local, key)[rank]), f"ring {name}/{mask}: {key} differs from executor"


def _expect_input_error(fn, match):
    try:
        fn()
    except InputError as err:
        assert match in str(err), f"message {err} lacks {match!r}"
        return
    raise AssertionError(f"no InputError for {match!r}")


def _bad_inputs(rank, world):
    case = Case(batch("linux_files", world, BATCH_TOKENS // world), world, BATCH_TOKENS // world, "causal")
    q, k, v, _ = (x[rank] for x in case.inputs(torch.float32))
    view = case.plan.for_rank(rank)
    _expect_input_error(lambda: fcp_attention(q[:-1], k, v, view), "tokens but the plan gives this rank")
    _expect_input_error(lambda: fcp_attention(q[:, :3].contiguous(), k, v, view), "not a multiple of 2 key/value heads")
    _expect_input_error(lambda: fcp_attention(q[None], k, v, view), "must be [tokens, heads, head_dim]")
    _expect_input_error(lambda: fcp_attention(q[:, :, ::2], k[:, :, ::2], v[:, :, ::2], view), "not contiguous")
    _expect_input_error(lambda: fcp_attention(q.int(), k.int(), v.int(), view), "dtype torch.int32")
    other = Case(batch("linux_files", 2 * world, 64), 2 * world, 64, "causal").plan.for_rank(rank)
    _expect_input_error(lambda: fcp_attention(q, k, v, other), f"process group has {world} ranks")
    _expect_input_error(lambda: fcp_attention(q, k, v, case.plan.for_rank((rank + 1) % world)), "plan.for_rank")
    _expect_input_error(lambda: fcp_attention(q, k, v, view, kv_budget_tokens=-3), "kv_budget_tokens -3")
    _expect_input_error(lambda: fcp_attention(q, k, v, view, kv_budget_tokens=0), "below one key/value token")
    _expect_input_error(lambda: fcp_attention(q, k, v, view, kv_budget_tokens="half"), "whole number")


MISMATCHES = {  # world: (per-rank document lengths of one micro-batch, tokens per rank, the words every rank sees)
    2: [([[300, 212], [212, 300]], 256, "CP rank 0 holds plan"), ([[100, 412], [400, 112]], 256, "CP rank 1 holds")],
    4: [([[700, 324]] * 2 + [[324, 700]] + [[700, 324]], 256, "CP ranks 0, 1, 3 hold plan")],
}


def _plan_mismatch(rank, world):
    """Ranks planning different micro-batches (or budgets), or calling with different dtypes, key/value heads, head
    dimensions or softmax scales, stop before anything moves, with the same one line."""
    cases = [(lens[rank], tokens, words, "auto") for lens, tokens, words in MISMATCHES.get(world, [])]
    budget = 64 if rank == world - 1 else "auto"
    cases.append(([256 * world - 100, 100], 256, "budget 64", budget))
    last = rank == world - 1
    same = [512 * world - 100, 100]
    cases += [(same, 512, "dtype float64", "auto", dict(dtype=torch.float64 if last else torch.float32)),
              (same, 512, "kv heads 1", "auto", dict(kv_heads=1 if last else 2)),
              (same, 512, "head dim 4", "auto", dict(head_dim=4 if last else 8)),
              (same, 512, "softmax scale 0.5", "auto", dict(scale=0.5 if last else None))]
    for lens, tokens, words, kv_budget, *differ in cases:
        differ = differ[0] if differ else {}
        plan = make_plan(lens, world, tokens, "causal")
        gen = torch.Generator().manual_seed(rank)
        dtype, head_dim = differ.get("dtype", torch.float32), differ.get("head_dim", 8)
        q = torch.randn(tokens, 2, head_dim, generator=gen, dtype=dtype)
        k, v = (torch.randn(tokens, differ.get("kv_heads", 2), head_dim, generator=gen, dtype=dtype) for _ in "kv")
        exchange = get_exchange(None, timeout_s=20)
        exchange.counter.reset()
        try:
            fcp_attention(q, k, v, plan.for_rank(rank), None, differ.get("scale"), backend="cpu",
                          kv_budget_tokens=kv_budget, exchange=exchange)
        except PlanMismatchError as err:
            text = str(err)
            assert words in text and "\n" not in text and "nothing was exchanged" in text, text
            assert not exchange.counter.sent and not exchange.counter.received, "key/values moved"
        else:
            raise AssertionError(f"rank {rank}: no PlanMismatchError for {lens} / budget {kv_budget}")


def _silent_peer(rank, world):
    """Rank 1 never joins the step: rank 0 must time out naming it, not hang."""
    case = Case(batch("spanning", 2, BATCH_TOKENS // world), 2, BATCH_TOKENS // world, "full")
    q, k, v, _ = (x[rank] for x in case.inputs(torch.float32))
    if rank == 0:
        start = time.monotonic()
        try:
            fcp_attention(q, k, v, case.plan.for_rank(0), timeout_s=1.0)
        except ExchangeTimeout as err:
            assert "CP rank 1" in str(err) and time.monotonic() - start < 20, str(err)
        else:
            raise AssertionError("no ExchangeTimeout")
    else:
        time.sleep(4)  # alive but silent until rank 0 has given up


class _FailedWork:
    """A message whose wait fails at once, as torch's works do (RuntimeError or a DistError subclass)."""

    def __init__(self, error: RuntimeError):
        self.error = error

    def wait(self, timeout):
        raise self.error


def test_failed_wait_is_a_timeout_only_past_the_deadline():
    """The exchange tells a timeout by its own deadline, not by the error's type or words."""
    from megatron_fcp.attention.exchange import ExchangeError, Pending  # kept out of the shared import block

    def wait(error, seconds_ago):
        peers = [("receive from", 3)]
        Pending([_FailedWork(error)], peers, "forward", 0, 5.0, posted_at=time.monotonic() - seconds_ago).wait()

    for error in (RuntimeError("Connection closed by peer"), dist.DistBackendError("NCCL error")):
        with pytest.raises(ExchangeTimeout, match="waited 5 s to receive from CP rank 3"):
            wait(error, seconds_ago=5.0)
    with pytest.raises(ExchangeError, match="failed to receive from CP rank 3") as info:
        wait(RuntimeError("Operation timed out!"), seconds_ago=0.5)
    assert not isinstance(info.value, ExchangeTimeout)


def _exchange_per_group(rank, world):
    """Exchanges are cached per group object: a group gets the same one each time, and a group created after another
    was destroyed gets its own, even over the same ranks."""
    first = dist.new_group(list(range(world)))
    exchange = get_exchange(first, timeout_s=60)
    assert get_exchange(first, timeout_s=60) is exchange and get_exchange(None, timeout_s=60) is not exchange
    dist.destroy_process_group(first)
    second = dist.new_group(list(range(world)))
    assert get_exchange(second, timeout_s=60) is not exchange and get_exchange(second, timeout_s=60).group is second


def _host_twin_group(rank, world):
    """The Megatron step's plan check on GPUs runs on a gloo twin of the NCCL CP group (host_cp_group): made
    collectively over the world, one per CP group, with the same ranks in the same order; it passes when the ranks
    agree and names the ranks that differ otherwise. (The NCCL branch is taken here by reporting the CP groups as
    NCCL; the groups themselves are gloo, as everything on CPU.)"""
    from unittest import mock

    from megatron_fcp.attention.schedule import build_schedule
    from megatron_fcp.megatron import step as step_module

    halves = [list(range(world // 2)), list(range(world // 2, world))]
    cp_groups = [dist.new_group(ranks) for ranks in halves]
    mine = cp_groups[rank // (world // 2)]
    with mock.patch.object(step_module.dist, "get_backend", lambda group=None: "nccl"):
        twin = step_module.host_cp_group(mine)
    assert twin is not mine and dist.get_process_group_ranks(twin) == dist.get_process_group_ranks(mine)
    cp_rank = dist.get_rank(mine)
    plan = make_plan([300, 212], world // 2, 256, "causal")
    check = step_module.check_plan_agreement_on_host
    check(build_schedule(plan.for_rank(cp_rank)), twin)
    other = make_plan([212, 300] if cp_rank == 0 else [300, 212], world // 2, 256, "causal")
    try:
        check(build_schedule(other.for_rank(cp_rank)), twin)
    except PlanMismatchError as err:
        assert "CP rank 0 holds plan" in str(err) and "\n" not in str(err), str(err)
    else:
        raise AssertionError("no PlanMismatchError on the twin group")


def _cases(rank, world):
    for name, mask, dtype, budget in CASES[world]:
        _run_case(rank, world, name, mask, dtype, budget)
    if world == 4:  # two CP groups of 2 inside the world: group ranks differ from global ranks
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        _run_case(rank, world, "linux_files", "causal", torch.float32, 40, group=groups[rank // 2], cp=2)
        _run_case(rank, world, "linux_files", "full", torch.float32, 96, strategy="ring")
        _ring_case(rank, world, "linux_files", "causal")
        _ring_case(rank, world, "spanning", "full")
    _bad_inputs(rank, world)
    _plan_mismatch(rank, world)
    if world == 2:
        _exchange_per_group(rank, world)
    if world == 4:
        _host_twin_group(rank, world)
    dist.barrier()
    if world == 2:
        _silent_peer(rank, world)  # last: it leaves a receive posted (run_on_gloo skips the teardown)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_fcp_attention_across_processes(world):
    run_on_gloo(_cases, world)
