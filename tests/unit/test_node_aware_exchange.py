"""The node-aware exchange (round-after relay, megatron_fcp.planner.relay, on node rings) run by the engine: CP
groups split into emulated nodes (8 ranks as 2 nodes x 4, 6 as 3 x 2, 16 as 4 x 4), causal and full masks, budgets
auto and tiny. Outputs and gradients equal the float64 dense reference (fp64 within 1e-10, fp32 within 1e-5);
the bytes every rank sends in each phase, and of them the bytes that cross a node boundary, equal the plan's figures
(relay_figures); memory equals the plan's (p2p_memory for received key/values and gradients, relay_figures for
gradients coming back and node-mates' partial gradients); relays do happen, and fewer bytes cross nodes than without
them.

In one process (the executor) here; across gloo processes, bit-identical to the executor, in the second test.
"""


import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_fcp.attention import fcp_attention, get_exchange
from megatron_fcp.attention.schedule import build_schedule
from megatron_fcp.megatron.batch import decode_rank_plan, encode_rank_plan
from megatron_fcp.planner.api import make_plan
from megatron_fcp.planner.relay import PHASES, relay_figures
from megatron_fcp.planner.stages import p2p_memory, plan_pieces, resolve_kv_budget
from megatron_fcp.testing.cases import Case, batch, rel_err
from megatron_fcp.testing.executor import run_in_process
from megatron_fcp.testing.gloo import run_on_gloo
from megatron_fcp.testing.layout import join_from_ranks

LAYOUTS = [(8, 4), (6, 2), (16, 4)]
"""(CP, ranks per node): 2 nodes x 4, 3 nodes x 2 and 4 nodes x 4 (the last two with node rings of 2 to 4 ranks:
megatron_fcp.planner.node_ring, tests/unit/test_node_ring.py)."""
TOKENS_PER_RANK = 128
BOUNDS = {torch.float64: 1e-10, torch.float32: 1e-5}


def _case(name: str, cp: int, per_node: int, mask: str, nodes: bool = True) -> Case:
    lens = batch(name, cp, TOKENS_PER_RANK)
    plan = make_plan(np.asarray(lens), cp, TOKENS_PER_RANK, mask,
                     cp_node=np.arange(cp) // per_node if nodes else None)
    return Case(lens, cp, TOKENS_PER_RANK, mask, plan=plan, seed=cp + len(name))


def _figures(case: Case, budget) -> tuple[dict, dict]:
    plan = case.plan
    resolved = resolve_kv_budget(budget, int(plan.num_tokens.max()))
    return p2p_memory(plan.num_tokens, plan.pieces, budget), relay_figures(plan.pieces, plan.cp_node, resolved, plan.cp)


def _check_rank(where: str, rank: int, plan, counter, meter, saved_kv: int, mem: dict, fig: dict, row: int) -> None:
    """One rank's bytes per phase (all, and across nodes) and buffers held, against the plan's figures."""
    for phase in PHASES.values():
        assert counter.sent.get(phase, 0) == fig[f"sent_{phase}"][rank] * row, f"{where} rank {rank}: {phase} sent"
        assert counter.sent_across(phase, plan.cp_node, rank) == fig[f"sent_across_{phase}"][rank] * row, \
            f"{where} rank {rank}: {phase} bytes across nodes"
    assert counter.received.get("forward", 0) == mem["recv_kv_tokens"][rank] * row, f"{where} rank {rank}: forward"
    assert counter.received.get("backward_kv", 0) == mem["refetch_kv_tokens"][rank] * row, f"{where}: refetch"
    assert meter.peak.get("kv", 0) == mem["peak_remote_kv_tokens"][rank] * row, f"{where} rank {rank}: kv held"
    assert saved_kv == mem["saved_remote_kv_tokens"][rank] * row, f"{where} rank {rank}: kv kept"
    assert meter.peak.get("grad", 0) == mem["peak_grad_tokens"][rank] * row, f"{where} rank {rank}: gradients held"
    assert meter.peak.get("returned", 0) == fig["peak_returned_grad_tokens"][rank] * row, f"{where}: returned"
    assert meter.peak.get("relayed_grad", 0) == fig["peak_relayed_grad_tokens"][rank] * row, f"{where}: relayed"


@pytest.mark.parametrize("budget", ["auto", 7])
@pytest.mark.parametrize("mask", ["causal", "full"])
@pytest.mark.parametrize("cp,per_node", LAYOUTS)
@pytest.mark.parametrize("name", ["linux_files", "spanning", "magi_hist"])
def test_relayed_exchange_equals_the_reference_and_the_plans_figures(name, cp, per_node, mask, budget):
    case = _case(name, cp, per_node, mask)
    views = [case.plan.for_rank(r) for r in range(cp)]
    assert all(view.relays for view in views)
    mem, fig = _figures(case, budget)
    for dtype in (torch.float64, torch.float32):
        q, k, v, dout = case.inputs(dtype)
        res = run_in_process(case.plan, q, k, v, dout, backend="cpu", softmax_scale=case.scale,
                             kv_budget_tokens=budget)
        for key, parts in (("out", res.out), ("dq", res.dq), ("dk", res.dk), ("dv", res.dv)):
            err = rel_err(join_from_ranks(case.plan, parts), case.ref[key])
            assert err <= BOUNDS[dtype], f"{key} {dtype}: relative error {err:.2e}"
        row = 2 * k[0].shape[1] * k[0].shape[2] * torch.empty(0, dtype=dtype).element_size()
        for r in range(cp):
            _check_rank(f"{name}/{mask}/{budget}/{dtype}", r, case.plan, res.counters[r], res.memory[r],
                        res.saved_kv_bytes[r], mem, fig, row)
    # relays happen, and the bytes that cross nodes are fewer than each holder fetching from the owner
    schedules = [build_schedule(view, "cpu", budget) for view in views]
    relayed = sum(len(m) for s in schedules for r in s.relay_rounds for m in r)
    direct = _case(name, cp, per_node, mask, nodes=False)
    node = case.plan.cp_node
    kv = direct.plan.kv
    direct_across = int(((kv[:, 4] - kv[:, 3]) * (node[kv[:, 0]] != node[kv[:, 1]])).sum())
    if budget == "auto":
        assert relayed > 0 and fig["sent_across_forward"].sum() < direct_across
    assert fig["sent_across_forward"].sum() <= direct_across
    assert fig["sent_forward"].sum() == direct.plan.recv_tokens.sum()  # every token still arrives once per holder


def test_a_rank_view_gives_the_messages_the_whole_plan_gives():
    """Each rank derives its messages from the pieces of its node and of its receivers' nodes only; the sizes of
    every message between two ranks agree (otherwise the executor above would fail), and a node-aware plan's views
    carry those pieces, a plan on one node none."""
    case = _case("linux_files", 8, 4, "causal")
    for r in range(8):
        view = case.plan.for_rank(r)
        assert view.relays and view.node == r // 4
        dsts = {piece[0] for piece in view.node_pieces}
        assert {d // 4 for d in dsts} >= {r // 4}
    view = case.plan.for_rank(5)
    assert decode_rank_plan(encode_rank_plan(view)) == view  # the data loader ships views so to the tools
    one_node = make_plan(np.asarray(batch("linux_files", 8, TOKENS_PER_RANK)), 8, TOKENS_PER_RANK, "causal",
                         cp_node=np.zeros(8, np.int64))
    assert not one_node.for_rank(0).relays


# -- across gloo processes -----------------------------------------------------------------------------------------
GLOO_CASES = {8: [("linux_files", "causal", torch.float64, "auto"), ("spanning", "full", torch.float32, 7)],
              6: [("magi_hist", "full", torch.float64, 7), ("spanning", "causal", torch.float32, "auto")]}


def _gloo_case(rank: int, world: int, name: str, mask: str, dtype, budget) -> None:
    case = _case(name, world, world // 2 if world == 8 else 2, mask)
    where = f"{name}/{mask}/{dtype}/{budget}"
    q, k, v, dout = case.inputs(dtype)
    mine = [x[rank].clone().requires_grad_() for x in (q, k, v)]
    exchange = get_exchange(None, timeout_s=60)
    exchange.counter.reset()
    exchange.memory.reset_peak()
    out = fcp_attention(*mine, case.plan.for_rank(rank), None, case.scale, backend="cpu", exchange=exchange,
                        kv_budget_tokens=budget)
    kept = exchange.memory.current("kv")
    out.backward(dout[rank])
    local = run_in_process(case.plan, q, k, v, dout, backend="cpu", softmax_scale=case.scale, kv_budget_tokens=budget)
    got = {"out": out.detach(), "dq": mine[0].grad, "dk": mine[1].grad, "dv": mine[2].grad}
    for key, tensor in got.items():
        assert torch.equal(tensor, getattr(local, key)[rank]), f"{where}: {key} differs from the executor"
        err = rel_err(join_from_ranks(case.plan, getattr(local, key)), case.ref[key])
        assert err <= BOUNDS[dtype], f"{where}: {key} relative error {err:.2e}"
    row = 2 * k[0].shape[1] * k[0].shape[2] * torch.empty(0, dtype=dtype).element_size()
    mem, fig = _figures(case, budget)
    _check_rank(where, rank, case.plan, exchange.counter, exchange.memory, kept, mem, fig, row)
    mirror = local.counters[rank]
    assert (mirror.sent, mirror.received, mirror.sent_to) == \
        (exchange.counter.sent, exchange.counter.received, exchange.counter.sent_to), f"{where}: executor counted"


def _gloo_cases(rank: int, world: int) -> None:
    for case in GLOO_CASES[world]:
        _gloo_case(rank, world, *case)
    dist.barrier()


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world", [8, 6])
def test_relayed_exchange_across_gloo_processes(world):
    run_on_gloo(_gloo_cases, world)


def test_the_cost_model_sends_what_the_relays_send():
    """The model's node-aware rounds (sim.model._relayed_comm) take their bytes from the same transfers as the
    runtime: with NVLink free and no latency, a round's forward time is the larger of the receiver's own
    InfiniBand bytes and its senders' (relay_transfers, counted here), and fewer bytes cross nodes than in the
    direct rounds, so the slowest rank's forward communication shrinks."""
    import dataclasses as dc

    from megatron_fcp.planner.columns import Transfer
    from megatron_fcp.planner.relay import relay_transfers
    from megatron_fcp.sim.model import load_hardware, staged_exchange

    hw = dc.replace(load_hardware("h100_node"), gpus_per_node=4, p2p_latency_us=0.0,
                    nvlink_gbps_per_direction=1e12)
    case = _case("spanning", 16, 4, "causal")
    direct = dc.replace(case.plan, cp_node=None)
    relayed, plain = staged_exchange(case.plan, hw, "auto"), staged_exchange(direct, hw, "auto")
    t = relay_transfers(case.plan.pieces, case.plan.cp_node, relayed.budget, "forward")
    node = case.plan.cp_node
    across = node[t[:, Transfer.SRC]] != node[t[:, Transfer.DST]]
    rounds = relayed.fwd_comm_s.shape[1]
    size = 16 * rounds
    nbytes = (t[:, Transfer.END] - t[:, Transfer.START]) * across * hw.kv_bytes_per_token
    into = t[:, Transfer.DST] * rounds + t[:, Transfer.ROUND]
    out_of = t[:, Transfer.SRC] * rounds + t[:, Transfer.ROUND]
    recv = hw.seconds_transfer(np.bincount(into, weights=nbytes, minlength=size), True)
    send = hw.seconds_transfer(np.bincount(out_of, weights=nbytes, minlength=size), True)
    want = recv.copy()
    np.maximum.at(want, into, send[out_of])
    bad = ~np.isclose(relayed.fwd_comm_s.reshape(-1), want, rtol=1e-12, atol=1e-12)  # NVLink: bytes / 1e21 s
    assert not bad.any(), (np.flatnonzero(bad), relayed.fwd_comm_s.reshape(-1)[bad], want[bad])
    assert relayed.fwd_comm_s.sum(axis=1).max() < plain.fwd_comm_s.sum(axis=1).max()


def test_the_modeled_same_round_hop_waits_for_its_landers_first_phase():
    """The model's same-round hop (a design the runtime does not run): its second phase takes time exactly where a
    rank sends or receives a hop in that round, and a receiver's stage is in no earlier than its landers' first
    phase; with the second phase free and no landers the rounds are the first phase's alone."""
    import dataclasses as dc

    from megatron_fcp.planner.columns import Transfer
    from megatron_fcp.planner.relay import relay_transfers
    from megatron_fcp.sim.model import _with_hop, load_hardware, staged_exchange, staged_times

    hw = dc.replace(load_hardware("h100_node"), gpus_per_node=4)
    plan = _case("spanning", 16, 4, "causal").plan
    # on the plain staging orders: the plan's node rings (Plan.pieces) leave the hop nothing to do here
    plan = dc.replace(plan)
    plan.__dict__["pieces"] = plan_pieces(plan.q, plan.kv_explicit, plan.doc_lens, plan.mask)
    plain, hopped = staged_exchange(plan, hw, "auto"), staged_exchange(plan, hw, "auto", hop=True)
    assert plain.fwd_hop_s is None and plain.fwd_landers is None
    t = relay_transfers(plan.pieces, plan.cp_node, hopped.budget, "forward", hop=True)
    hop = t[t[:, Transfer.PHASE] == 1]
    assert hop.shape[0] > 0
    rounds = hopped.fwd_comm_s.shape[1]
    busy = np.zeros((16, rounds), bool)
    busy[hop[:, Transfer.SRC], hop[:, Transfer.ROUND]] = busy[hop[:, Transfer.DST], hop[:, Transfer.ROUND]] = True
    np.testing.assert_array_equal(hopped.fwd_hop_s > 0, busy)
    arrive = np.arange(16, dtype=np.float64)  # rank r's first phase is in at r seconds
    for j in range(rounds):
        got = _with_hop(arrive, hopped.fwd_hop_s, hopped.fwd_landers, j)
        lander, receiver = hopped.fwd_landers[j]
        assert np.all(got[receiver] >= arrive[lander] + hopped.fwd_hop_s[receiver, j])
        np.testing.assert_array_equal(got[~busy[:, j]], arrive[~busy[:, j]])
    local = np.zeros(16)
    free = dc.replace(hopped, fwd_hop_s=np.zeros_like(hopped.fwd_hop_s),
                      refetch_hop_s=None if hopped.refetch_hop_s is None else np.zeros_like(hopped.refetch_hop_s))
    alone = dc.replace(hopped, fwd_hop_s=None, refetch_hop_s=None, fwd_landers=None, refetch_landers=None)
    for a, b in zip(staged_times(free, local, local, hw)[:2], staged_times(alone, local, local, hw)[:2], strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(staged_times(hopped, local, local, hw)[:2], staged_times(alone, local, local, hw)[:2],
                    strict=True):
        assert np.all(a >= b)
