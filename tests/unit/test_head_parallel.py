"""Head-parallel inside the node, FCP across nodes (megatron_fcp.attention.head_parallel): the CP group split into
emulated nodes (8 ranks as 2 nodes x 4, 6 as 3 x 2, 16 as 4 x 4), causal and full masks, budgets auto and tiny.

- In one process: the node-sized plan run on each head group (the executor) and put back on the ranks gives
  outputs and gradients equal to the float64 dense reference (fp64 within 1e-10, fp32 within 1e-5); every
  key/value of a head group crosses into a node once, to the GPU of that group (the bytes each GPU receives are its
  node's received key/values on its own heads, and the node's GPUs together receive each key/value once); memory is
  the node plan's figures on 1 / g of the heads, the same bytes per GPU as its own key/values.
- Across gloo processes (8 as 2 x 4, 6 as 3 x 2): the all-to-alls and the exchange across nodes, bit-identical to
  the executor, gradients through the all-to-alls included.
"""

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_fcp.attention import get_exchange
from megatron_fcp.attention.head_parallel import (
    head_parallel_attention,
    heads_to_tokens,
    join_heads_in_process,
    local_token_index,
    split_heads_in_process,
    tokens_to_heads,
)
from megatron_fcp.errors import InputError
from megatron_fcp.planner.api import make_plan
from megatron_fcp.planner.stages import p2p_memory
from megatron_fcp.testing.cases import Case, batch, rel_err
from megatron_fcp.testing.executor import run_in_process
from megatron_fcp.testing.gloo import run_on_gloo

LAYOUTS = [(8, 4), (6, 2), (16, 4)]
"""(CP, ranks per node)."""
TOKENS_PER_RANK = 64
HEADS = (8, 4)
BOUNDS = {torch.float64: 1e-10, torch.float32: 1e-5}


def _case(name: str, cp: int, g: int, mask: str) -> Case:
    """A case whose plan is the node-sized one: ``cp / g`` ranks of ``g x TOKENS_PER_RANK`` slots."""
    lens = batch(name, cp, TOKENS_PER_RANK)
    plan = make_plan(np.asarray(lens), cp // g, g * TOKENS_PER_RANK, mask)
    return Case(lens, cp // g, g * TOKENS_PER_RANK, mask, plan=plan, heads=HEADS, seed=cp + len(name))


def _rank_inputs(case: Case, cp: int, g: int, dtype) -> list[list[torch.Tensor]]:
    """q, k, v, dout per CP rank: its slots of its node's order (local_token_index), zero padding."""
    out = []
    for x in (case.q, case.k, case.v, case.dout):
        parts = []
        for r in range(cp):
            index = torch.from_numpy(local_token_index(case.plan, g, r))
            part = x.new_zeros((TOKENS_PER_RANK, *x.shape[1:]))
            part[: index.shape[0]] = x.index_select(0, index)
            parts.append(part.to(dtype).contiguous())
        out.append(parts)
    return out


def _to_batch(case: Case, cp: int, g: int, parts: list[torch.Tensor]) -> torch.Tensor:
    total = int(np.sum(case.plan.doc_lens))
    out = parts[0].new_zeros((total, *parts[0].shape[1:]))
    for r in range(cp):
        index = torch.from_numpy(local_token_index(case.plan, g, r))
        out[index] = parts[r][: index.shape[0]]
    return out


def run_head_parallel_in_process(case: Case, cp: int, g: int, dtype, budget):
    """The head-parallel step of every rank in one process: the node plan on each head group (the executor), put
    back on the ranks. Returns ``({name: per-rank tensors}, [per head group InProcessResult])``."""
    q, k, v, dout = _rank_inputs(case, cp, g, dtype)
    shards = [split_heads_in_process(x, g) for x in (q, k, v, dout)]  # [tensor][node][head group]
    nodes = cp // g
    results = []
    for j in range(g):
        qj, kj, vj, dj = ([s[node][j] for node in range(nodes)] for s in shards)
        results.append(run_in_process(case.plan, qj, kj, vj, dj, backend="cpu", softmax_scale=case.scale,
                                      kv_budget_tokens=budget))
    got = {key: join_heads_in_process([[getattr(results[j], key)[node] for j in range(g)] for node in range(nodes)],
                                      g) for key in ("out", "dq", "dk", "dv")}
    return got, results


@pytest.mark.parametrize("budget", ["auto", 7])
@pytest.mark.parametrize("mask", ["causal", "full"])
@pytest.mark.parametrize("cp,g", LAYOUTS)
@pytest.mark.parametrize("name", ["linux_files", "spanning", "magi_hist"])
def test_head_parallel_equals_the_reference_and_crosses_into_a_node_once(name, cp, g, mask, budget):
    case = _case(name, cp, g, mask)
    nodes = cp // g
    mem = p2p_memory(case.plan.num_tokens, case.plan.pieces, budget)
    for dtype in (torch.float64, torch.float32):
        got, results = run_head_parallel_in_process(case, cp, g, dtype, budget)
        for key, parts in got.items():
            err = rel_err(_to_batch(case, cp, g, parts), case.ref[key])
            assert err <= BOUNDS[dtype], f"{name}/{mask}/{budget} {key} {dtype}: relative error {err:.2e}"
        # bytes: a head group's key/values of a token arrive at one GPU of each node that needs them, once
        shard_row = 2 * (HEADS[1] // g) * case.q.shape[2] * torch.empty(0, dtype=dtype).element_size()
        full_row = g * shard_row
        for node in range(nodes):
            per_gpu = [results[j].counters[node].received.get("forward", 0) for j in range(g)]
            assert per_gpu == [mem["recv_kv_tokens"][node] * shard_row] * g, "each GPU: its node's tokens, its heads"
            assert sum(per_gpu) == mem["recv_kv_tokens"][node] * full_row, "each key/value into the node once"
            for j in range(g):
                assert results[j].memory[node].peak.get("kv", 0) == mem["peak_remote_kv_tokens"][node] * shard_row
                assert results[j].saved_kv_bytes[node] == mem["saved_remote_kv_tokens"][node] * shard_row
        # the memory bound in bytes: at most twice (held) and once (kept) a GPU's own key/values, every head
        own_bytes = TOKENS_PER_RANK * full_row
        peak = max(results[j].memory[node].peak.get("kv", 0) for j in range(g) for node in range(nodes))
        if budget == "auto":
            assert peak <= 2 * own_bytes
    assert int(mem["recv_kv_tokens"].sum()) > 0, "nothing crossed nodes: the check above proves nothing"


def test_the_all_to_alls_in_process_are_inverse_and_group_heads():
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(5, 8, 3, generator=gen, dtype=torch.float64) for _ in range(6)]
    shards = split_heads_in_process(parts, 2)
    assert len(shards) == 3 and shards[1][1].shape == (10, 4, 3)
    assert torch.equal(shards[1][1][5:], parts[3][:, 4:])  # node 1, head group 1: rank 3's tokens second
    back = join_heads_in_process(shards, 2)
    assert all(torch.equal(a, b) for a, b in zip(back, parts, strict=True))


def test_bad_layouts_are_named():
    plan = make_plan(np.asarray(batch("linux_files", 4, TOKENS_PER_RANK)), 2, 2 * TOKENS_PER_RANK, "causal")
    with pytest.raises(InputError, match="not a multiple of 3 ranks per node"):
        local_token_index(plan, 3, 0)
    with pytest.raises(InputError, match="do not make nodes of 4"):
        split_heads_in_process([torch.zeros(2, 4, 1)] * 6, 4)
    with pytest.raises(InputError, match="heads a multiple"):
        split_heads_in_process([torch.zeros(2, 6, 1)] * 4, 4)


# -- across gloo processes -----------------------------------------------------------------------------------------
GLOO_CASES = {8: [("linux_files", "causal", torch.float64, "auto"), ("spanning", "full", torch.float32, 7)],
              6: [("magi_hist", "full", torch.float64, 7), ("spanning", "causal", torch.float32, "auto")]}


def _groups(rank: int, world: int, g: int):
    """This rank's node group and across group (every rank creates every group, in the same order)."""
    node_group = across_group = None
    for node in range(world // g):
        group = dist.new_group(list(range(node * g, (node + 1) * g)))
        if rank // g == node:
            node_group = group
    for local in range(g):
        group = dist.new_group(list(range(local, world, g)))
        if rank % g == local:
            across_group = group
    return node_group, across_group


def _gloo_cases(rank: int, world: int) -> None:
    g = 4 if world == 8 else 2
    node_group, across_group = _groups(rank, world, g)
    for name, mask, dtype, budget in GLOO_CASES[world]:
        where = f"{name}/{mask}/{dtype}/{budget}"
        case = _case(name, world, g, mask)
        q, k, v, dout = _rank_inputs(case, world, g, dtype)
        mine = [x[rank].clone().requires_grad_() for x in (q, k, v)]
        exchange = get_exchange(across_group, timeout_s=60)
        exchange.counter.reset()
        out = head_parallel_attention(*mine, case.plan.for_rank(rank // g), node_group, across_group, case.scale,
                                      backend="cpu", exchange=exchange, kv_budget_tokens=budget)
        out.backward(dout[rank])
        local, results = run_head_parallel_in_process(case, world, g, dtype, budget)
        got = {"out": out.detach(), "dq": mine[0].grad, "dk": mine[1].grad, "dv": mine[2].grad}
        for key, tensor in got.items():
            assert torch.equal(tensor, local[key][rank]), f"{where}: {key} differs from the executor"
        mirror = results[rank % g].counters[rank // g]
        assert (mirror.sent, mirror.received) == (exchange.counter.sent, exchange.counter.received), where
    # the all-to-alls alone: each other's inverse, and head group l of every node-mate's tokens on rank l
    x = torch.arange(2 * g * 3, dtype=torch.float64).reshape(2, g, 3) + 100 * rank
    heads = tokens_to_heads(x, node_group)
    first = rank // g * g
    assert torch.equal(heads[2 * (g - 1):, 0], x[:, rank % g] + 100 * (first + g - 1 - rank))
    assert torch.equal(heads_to_tokens(heads, node_group), x)
    dist.barrier()


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world", [8, 6])
def test_head_parallel_across_gloo_processes(world):
    run_on_gloo(_gloo_cases, world)


@pytest.mark.parametrize("heads, groups, tp, cp, per_node, words", [
    (4, 2, 1, 4, 2, None),  # 2 nodes x 2: two heads and one query group per rank
    (8, 4, 2, 4, 4, None),  # TP 2 x CP 4 on nodes of 4 GPUs: 2 CP ranks per node, 4 heads and 2 groups per TP rank
    (4, 1, 1, 4, 2, "query groups over the 2 CP ranks"),
    (4, 2, 1, 4, None, "over the 4 CP ranks of a node"),  # no layout: the whole CP group is one node
    (6, 6, 1, 4, 2, None),
    (6, 6, 1, 4, 4, "attention heads over the 4 CP ranks"),
])
def test_the_heads_a_node_splits_are_checked_before_the_run(heads, groups, tp, cp, per_node, words):
    from megatron_fcp.megatron.config import node_exchange_problem

    for exchange in ("heads", "auto"):  # auto may split the heads of any micro-batch: the same rule
        problem = node_exchange_problem(exchange, heads, groups, tp, cp, per_node)
        assert problem is None if words is None else words in problem and exchange in problem, problem
    assert node_exchange_problem("p2p", heads, groups, tp, cp, per_node) is None


def test_a_cpu_run_that_cannot_split_its_heads_stops_with_one_line():
    from megatron_fcp.cpu_trainer.train import RunConfig

    with pytest.raises(InputError, match="RunConfig: --fcp-node-exchange heads splits each rank's query groups"):
        RunConfig(cp=4, ranks_per_node=2, node_exchange="heads", num_heads=4, num_query_groups=1)
    with pytest.raises(InputError, match="node_exchange must be one of p2p, heads, auto"):
        RunConfig(cp=4, node_exchange="ring")
    assert RunConfig(cp=4, ranks_per_node=2, node_exchange="heads").node_exchange == "heads"
    assert RunConfig(cp=4, ranks_per_node=2, node_exchange="auto").node_exchange == "auto"
