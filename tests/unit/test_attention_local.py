"""Attention pieces in one process: the LSE merge, the CPU kernels, and the in-process executor of every rank
against a float64 dense reference over the whole packed batch."""

import math

import numpy as np
import pytest
import torch

from megatron_fcp.kernels import BackendUnavailable, VarlenCall, get_backend
from megatron_fcp.kernels.merge import merge_partials
from megatron_fcp.planner.stages import p2p_memory
from megatron_fcp.testing.cases import Case, batch, rel_err
from megatron_fcp.testing.executor import run_in_process
from megatron_fcp.testing.layout import join_from_ranks, split_to_ranks
from megatron_fcp.testing.reference import reference_attention, varlen_mask
from megatron_fcp.testing.ring import ring_schedule


def test_merge_equals_attention_over_the_union_float64():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(40, 3, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    part = torch.randint(0, 3, (40, 40), generator=gen)  # each (query, key) pair in one of three parts
    part[0] = 0  # row 0 sees keys in part 0 only: the others contribute lse = -inf
    want_out, want_lse = reference_attention(q, k, v, torch.ones(40, 40, dtype=torch.bool), 1.0)
    out, lse = reference_attention(q, k, v, part == 0, 1.0)
    for p in (2, 1):
        out, lse = merge_partials(out, lse, *reference_attention(q, k, v, part == p, 1.0))
    assert torch.isfinite(lse).all()
    assert torch.allclose(out, want_out, rtol=0, atol=1e-13)
    assert torch.allclose(lse, want_lse, rtol=0, atol=1e-13)


def test_merge_of_rows_without_keys_stays_empty():
    out = torch.randn(2, 1, 4, dtype=torch.float64)
    empty = torch.full((2, 1), -math.inf, dtype=torch.float64)
    merged, lse = merge_partials(out, empty, out * 2, empty)
    assert torch.isneginf(lse).all() and (merged == 0).all()


SEGMENTS = [((5, 130, 1, 64), (5, 130, 1, 64), True), ((4, 9, 130, 1), (7, 3, 200, 1), False)]


@pytest.mark.parametrize("name", ["cpu", "reference"])
@pytest.mark.parametrize("q_lens,k_lens,causal", SEGMENTS)
def test_cpu_backends_match_float64_per_segment(name, q_lens, k_lens, causal):
    backend = get_backend(name)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(sum(q_lens), 4, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sum(k_lens), 2, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(k_lens), 2, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    call = VarlenCall.make(q_lens, k_lens, causal)
    want_out, want_lse = reference_attention(q, k, v, varlen_mask(call), 0.25)
    dout = torch.randn_like(want_out)
    want_out.backward(dout)
    out, lse = backend.forward(q.detach(), k.detach(), v.detach(), call, 0.25)
    assert rel_err(out, want_out.detach()) < 1e-12 and rel_err(lse, want_lse.detach()) < 1e-12
    grads = backend.backward(dout, q.detach(), k.detach(), v.detach(), out, lse, call, 0.25)
    for got, x in zip(grads, (q, k, v), strict=True):
        assert got.shape == x.shape and rel_err(got, x.grad) < 1e-12


def test_backend_errors_are_clear():
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        get_backend("nope")
    with pytest.raises(ValueError, match="causal segments must have equal"):
        VarlenCall.make((2,), (3,), True)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="CUDA"):
            get_backend("torch-flash").check(torch.zeros(1, 1, 8), torch.zeros(1, 1, 8))


def test_layout_round_trip():
    case = Case(batch("linux_files", 4, 256), 4, 256, "causal")
    assert torch.equal(join_from_ranks(case.plan, split_to_ranks(case.plan, case.q)), case.q)


BATCHES = ["linux_files", "spamassassin", "magi_hist", "spanning", "tiny_rank", "ones"]


def _check_executor(case: Case, dtype, bound, kv_budget_tokens="auto", schedules=None):
    q, k, v, dout = case.inputs(dtype)
    res = run_in_process(case.plan, q, k, v, dout, backend="cpu", softmax_scale=case.scale,
                         kv_budget_tokens=kv_budget_tokens, schedules=schedules)
    for name, parts in (("out", res.out), ("dq", res.dq), ("dk", res.dk), ("dv", res.dv)):
        for r, part in enumerate(parts):
            assert not part[case.plan.num_tokens[r] - case.plan.num_pad_tokens[r]:].any(), "padding rows not zero"
        err = rel_err(join_from_ranks(case.plan, parts), case.ref[name])
        assert err <= bound[name], f"{name}: relative error {err:.2e} > {bound[name]:.2e}"
    return res


def _check_staged_figures(case: Case, res, kv_budget_tokens, row_bytes: int) -> dict:
    """The executor's bytes per phase and received key/value buffers equal the plan's staged figures."""
    mem = p2p_memory(case.plan.num_tokens, case.plan.pieces, kv_budget_tokens)
    for r in range(case.plan.cp):
        got, c = res.memory[r], res.counters[r]
        assert got.peak.get("kv", 0) == mem["peak_remote_kv_tokens"][r] * row_bytes, f"rank {r}: peak"
        assert res.saved_kv_bytes[r] == mem["saved_remote_kv_tokens"][r] * row_bytes, f"rank {r}: kept"
        assert c.received.get("forward", 0) == mem["recv_kv_tokens"][r] * row_bytes == \
            case.plan.recv_tokens[r] * row_bytes, f"rank {r}: forward bytes"
        assert c.received.get("backward_kv", 0) == mem["refetch_kv_tokens"][r] * row_bytes, f"rank {r}: refetch"
        assert c.sent.get("backward_grad", 0) == mem["recv_kv_tokens"][r] * row_bytes, f"rank {r}: gradients"
        assert c.received.get("backward_grad", 0) == case.plan.send_tokens[r] * row_bytes
        assert got.peak.get("grad", 0) == mem["peak_grad_tokens"][r] * row_bytes, f"rank {r}: gradients held"
        assert got.peak.get("returned", 0) == mem["peak_returned_grad_tokens"][r] * row_bytes, f"rank {r}: returned"
    return mem


FP64 = dict.fromkeys(("out", "dq", "dk", "dv"), 1e-10)
FP32 = dict.fromkeys(("out", "dq", "dk", "dv"), 1e-5)


@pytest.mark.parametrize("budget", [None, "auto", 24, 7])
@pytest.mark.parametrize("mask", ["causal", "full"])
@pytest.mark.parametrize("name", ["linux_files", "spanning", "tiny_rank"])
def test_executor_stages_match_float64_dense_and_the_plans_figures(name, mask, budget):
    case = Case(batch(name, 4, 256), 4, 256, mask, seed=len(name))
    for dtype, bound in ((torch.float64, FP64), (torch.float32, FP32)):
        res = _check_executor(case, dtype, bound, budget)
        mem = _check_staged_figures(case, res, budget, 2 * 2 * 16 * torch.empty(0, dtype=dtype).element_size())
    if budget in (24, 7) and name != "tiny_rank":
        assert mem["num_stages"].max() > 3, "the budget must force several stages"


LONG_DOCUMENTS = {64: (32, [1500, 300, 120, 60, 30, 20, 18]), 256: (16, [640, 256, 128] + [16] * 192)}


@pytest.mark.slow
@pytest.mark.parametrize("budget", ["auto", None])
@pytest.mark.parametrize("mask", ["causal", "full"])
@pytest.mark.parametrize("cp", [64, 256])
def test_executor_at_cp64_and_cp256_on_long_documents(cp, mask, budget):
    tokens_per_rank, lens = LONG_DOCUMENTS[cp]
    case = Case(lens, cp, tokens_per_rank, mask, heads=(2, 1), head_dim=8, seed=cp)
    res = _check_executor(case, torch.float64, FP64, budget)
    mem = _check_staged_figures(case, res, budget, 2 * 8 * 8)
    assert case.plan.recv_tokens.max() > 20 * tokens_per_rank, "a long document must make some rank receive a lot"
    if budget == "auto":  # a budget of the rank's own tokens: many stages, memory bounded
        assert mem["num_stages"].max() > 20
        assert np.all(mem["peak_remote_kv_tokens"] <= 2 * tokens_per_rank)
        assert np.all(mem["saved_remote_kv_tokens"] <= tokens_per_rank)


@pytest.mark.parametrize("mask", ["causal", "full"])
@pytest.mark.parametrize("name", BATCHES)
def test_executor_fp32_matches_float64_dense(name, mask):
    case = Case(batch(name, 4, 512), 4, 512, mask, seed=len(name))
    _check_executor(case, torch.float32, dict.fromkeys(("out", "dq", "dk", "dv"), 1e-5))


@pytest.mark.parametrize("strategy", ["ring", "magi", "hybrid"])
@pytest.mark.parametrize("mask", ["causal", "full"])
def test_executor_runs_baseline_placements_exactly(strategy, mask):
    case = Case(batch("magi_hist", 4, 512), 4, 512, mask, strategy=strategy, heads=(2, 2))
    _check_executor(case, torch.float32, dict.fromkeys(("out", "dq", "dk", "dv"), 1e-5))


@pytest.mark.parametrize("mask", ["causal", "full"])
def test_ring_baseline_is_a_schedule_of_the_same_rounds(mask):
    """The ring schedule runs in the executor like any other: the float64 reference's result, every other rank's
    whole buffer received once forward, all but the kept one again in backward, every gradient sent back."""
    cp = 3
    case = Case(batch("linux_files", cp, 512), cp, 512, mask, strategy="ring")
    rings = [ring_schedule(case.plan, r, "cpu") for r in range(cp)]
    res = _check_executor(case, torch.float32, FP32, schedules=rings)
    row_bytes, tokens = 2 * 2 * 16 * 4, [int(n) for n in case.plan.num_tokens]
    for r, c in enumerate(res.counters):
        others = [tokens[(r - s) % cp] * row_bytes for s in range(1, cp)]
        assert c.received == {"forward": sum(others), "backward_kv": sum(others[:-1]),
                              "backward_grad": (cp - 1) * tokens[r] * row_bytes}, f"rank {r}: {c.received}"
        assert res.memory[r].peak["kv"] == max(a + b for a, b in zip(others, others[1:], strict=False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", ["causal", "full"])
@pytest.mark.parametrize("name", ["magi_hist", "spanning"])
def test_executor_16bit_within_twice_plain_16bit_error(name, mask, dtype):
    case = Case(batch(name, 2, 1024), 2, 1024, mask)
    _check_executor(case, dtype, {n: 2 * e for n, e in case.plain(dtype).items()})
