"""The schedule the data loader ships (one int64 array), the step that decodes it, and the layer that only reads
the batch: no module globals, no writes into the batch object, Megatron's ``no_rope_freq`` and MLA rejection."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")

from megatron_fcp.attention.engine import fcp_attention  # noqa: E402
from megatron_fcp.attention.schedule import (  # noqa: E402
    HEADER,
    build_schedule,
    decode_schedule,
    encode_schedule,
    read_header,
)
from megatron_fcp.errors import InputError  # noqa: E402
from megatron_fcp.megatron.batch import STATS, FcpBatchDataset, MockDocumentDataset, plan_micro_batch  # noqa: E402
from megatron_fcp.megatron.config import FcpConfig  # noqa: E402
from megatron_fcp.planner.api import make_plan  # noqa: E402

LENS = [700, 3, 1, 90, 250, 1000, 4, 0, 8, 2034]


def _device_arrays(sched):
    calls = list(sched.local_calls) + [s.call for s in sched.stages if s.call is not None]
    index = [t for c in calls for t in (c.q_index, c.k_index) if t is not None]
    cu = [t for c in calls for t in (c.call.cu_q, c.call.cu_k)]
    return calls, index, cu


def _same(a, b):
    assert (a.cp, a.cp_rank, a.num_tokens, a.num_real, a.kv_budget_tokens, a.plan_digest) == \
           (b.cp, b.cp_rank, b.num_tokens, b.num_real, b.kv_budget_tokens, b.plan_digest)
    assert (a.send_rounds, a.refetch_rounds, a.return_rounds) == (b.send_rounds, b.refetch_rounds, b.return_rounds)
    assert [(s.index, s.num_tokens, s.recv) for s in a.stages] == [(s.index, s.num_tokens, s.recv) for s in b.stages]
    for x, y in zip(_device_arrays(a)[0], _device_arrays(b)[0], strict=True):
        assert (x.name, x.call.q_lens, x.call.k_lens, x.call.causal) == (y.name, y.call.q_lens, y.call.k_lens,
                                                                          y.call.causal)
        assert torch.equal(x.call.cu_q, y.call.cu_q) and torch.equal(x.call.cu_k, y.call.cu_k)
        for i, j in ((x.q_index, y.q_index), (x.k_index, y.k_index)):
            assert (i is None) == (j is None) and (i is None or torch.equal(i, j))


@pytest.mark.parametrize("strategy", ["fcp", "ring", "magi", "hybrid"])
@pytest.mark.parametrize("mask", ["causal", "full"])
@pytest.mark.parametrize("budget", ["auto", None, 64])
def test_the_loader_ships_the_schedule_the_rank_runs(strategy, mask, budget):
    """Every rank's shipped array decodes to the schedule of its plan view, call for call and message for
    message, and its device arrays are views of one block (one host-to-device copy on GPU)."""
    plan = make_plan(LENS, 4, 1024, mask, strategy)
    for r in range(4):
        array = encode_schedule(plan.for_rank(r), budget)
        assert array.dtype == np.int64 and array.ndim == 1 and read_header(array)["length"] == array.shape[0]
        sched = decode_schedule(torch.from_numpy(array), "cpu")
        _same(sched, build_schedule(plan.for_rank(r), "cpu", budget))
        assert sched.plan_digest == plan.for_rank(r).plan_digest
        _, index, cu = _device_arrays(sched)
        assert len({t.untyped_storage().data_ptr() for t in index}) <= 1
        assert len({t.untyped_storage().data_ptr() for t in cu}) <= 1
        assert all(t.dtype == torch.int64 for t in index) and all(t.dtype == torch.int32 for t in cu)


def test_the_data_loader_sample_carries_the_schedule_and_no_plan_view():
    cfg = FcpConfig(cp=4, seq_length=4096, kv_budget_tokens=300)
    inner = MockDocumentDataset(2, 4096, "magi_hist", vocab_size=100, seed=3)
    part = FcpBatchDataset(inner, cfg, 2)[1]
    assert "fcp_plan" not in part and part["fcp_stats"].shape == (len(STATS),)
    from megatron_fcp.megatron.batch import doc_lengths_from_positions

    view = plan_micro_batch(doc_lengths_from_positions(inner[1]["position_ids"]), cfg).for_rank(2)
    _same(decode_schedule(part["fcp_schedule"]), build_schedule(view, "cpu", 300))


@pytest.mark.parametrize("corrupt, needle", [
    (lambda a: a[:-1], "its header says"),
    (lambda a: a[:5], "fewer than its header"),
    (lambda a: np.concatenate([[7], a[1:]]), "magic"),
    (lambda a: np.concatenate([a[:HEADER.index("num_calls")], [10**6], a[HEADER.index("num_calls") + 1:]]),
     "runs past the end"),
])
def test_a_malformed_schedule_is_named(corrupt, needle):
    array = encode_schedule(make_plan(LENS, 4, 1024, "causal").for_rank(1))
    with pytest.raises(InputError, match=needle) as err:
        decode_schedule(corrupt(array))
    assert "FcpBatchDataset" in str(err.value) and "\n" not in str(err.value)


def test_the_shipped_schedule_computes_what_the_plan_view_computes():
    """fcp_attention on the decoded schedule equals fcp_attention on the plan view, bit for bit. (Every other
    attention test builds its schedules through the same encode/decode path: ``build_schedule``.)"""
    plan = make_plan([300, 200, 12], 1, 512, "causal")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(512, 4, 16, generator=g, dtype=torch.float64) for _ in range(3))
    a = fcp_attention(q, k, v, plan.for_rank(0))
    b = fcp_attention(q, k, v, decode_schedule(encode_schedule(plan.for_rank(0))))
    assert torch.equal(a, b)


# -- the step ----------------------------------------------------------------------------------------------------
class _Model:
    """Stands in for GPTModel: per-token losses from the inputs, remembering what it was given."""

    def __call__(self, tokens, position_ids, attention_mask, labels, loss_mask, packed_seq_params):
        self.params = packed_seq_params
        return (tokens.float() % 7 + 1) * loss_mask


def test_the_step_reports_fcp_figures_in_the_loss_report_without_module_globals():
    from megatron_fcp.megatron import step as step_module
    from megatron_fcp.megatron.step import FIGURES, FcpStep

    assert not any(isinstance(v, list | dict) and k.isupper() and k != "FIGURES" for k, v in vars(step_module).items())
    cfg = FcpConfig(cp=1, seq_length=1024)
    inner = MockDocumentDataset(3, 1024, "magi_hist", vocab_size=50, seed=1)
    loader = iter(torch.utils.data.DataLoader(FcpBatchDataset(inner, cfg, 0), batch_size=1))
    step, model = FcpStep(cfg, device="cpu", keep_records=True), _Model()
    for _ in range(2):
        output, loss_fn = step(loader, model)
        loss, num_tokens, report = loss_fn(output)
        assert set(report) == {"lm loss", *FIGURES}
        assert all(report[name].shape == (1,) for name in FIGURES)
        record = step.take()[0]
        assert report["fcp planned imbalance"].item() == pytest.approx(record["pairs_imbalance"])
        assert report["fcp planning ms"].item() == pytest.approx(
            1e3 * (record["plan_seconds"] + record["schedule_seconds"]), rel=1e-6)
        assert report["fcp kv sent MiB"].item() == 0.0  # CP 1: no exchange
        assert model.params.fcp_schedule.num_tokens == 1024


def test_a_batch_without_a_schedule_is_named():
    from megatron_fcp.megatron.step import FcpStep

    with pytest.raises(InputError, match="without an FCP schedule"):
        FcpStep(FcpConfig(cp=1, seq_length=16), device="cpu").next_batch(iter([{"tokens": torch.zeros(1, 16)}]))


# -- the layer -----------------------------------------------------------------------------------------------------
def _core(layer_number, no_rope_freq=None):
    from megatron_fcp.cpu_trainer.shims import install_cpu_shims

    install_cpu_shims()
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_fcp.megatron.model import FcpCoreAttention, RopeSettings, _rotary_table

    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                               use_cpu_initialization=True, no_rope_freq=no_rope_freq, apply_rope_fusion=False,
                               attention_dropout=0.0, hidden_dropout=0.0)
    fcp = FcpConfig(cp=1, seq_length=64)
    rotary = _rotary_table(config, RopeSettings(), fcp.seq_length)
    return FcpCoreAttention(config, layer_number, AttnMaskType.causal, fcp=fcp, rotary=rotary)


def _params(lens=(40, 24)):
    from megatron_fcp.attention.schedule import build_schedule
    from megatron_fcp.megatron.model import FcpPackedSeqParams

    plan = make_plan(list(lens), 1, sum(lens), "causal")
    positions = torch.cat([torch.arange(n) for n in lens])
    cu = torch.tensor([0, sum(lens)], dtype=torch.int32)
    return FcpPackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=sum(lens),
                              max_seqlen_kv=sum(lens), fcp_schedule=build_schedule(plan.for_rank(0)),
                              fcp_position_ids=positions, fcp_max_position=int(positions.max()))


def test_layers_only_read_the_batch_and_honour_no_rope_freq(monkeypatch):
    """Layer 1 rotates (its output differs from plain attention), layer 2 is listed in no_rope_freq and does not
    (equal to plain attention); neither writes into the batch's parameters."""
    from megatron.core import parallel_state

    monkeypatch.setattr(parallel_state, "get_context_parallel_group", lambda *a, **k: None)  # no Megatron groups
    params = _params()
    before = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(64, h, 8, generator=g) for h in (4, 2, 2))
    plain = fcp_attention(q, k, v, params.fcp_schedule, verify_plan=False).reshape(64, -1)
    rotated = _core(1, no_rope_freq=[0, 1])(q, k, v, packed_seq_params=params)
    unrotated = _core(2, no_rope_freq=[0, 1])(q, k, v, packed_seq_params=params)
    assert torch.equal(unrotated, plain) and not torch.allclose(rotated, plain)
    assert all(getattr(params, name) is value for name, value in before.items())
    assert set(vars(params)) == set(before)


def test_multi_latent_attention_specs_are_rejected_when_the_model_is_built():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_fcp.megatron.model import install_fcp_core_attention

    spec = get_gpt_layer_local_spec(multi_latent_attention=True)
    with pytest.raises(InputError, match="multi-latent attention") as err:
        install_fcp_core_attention(spec, FcpConfig(cp=2, seq_length=64), None)
    assert "\n" not in str(err.value)
    install_fcp_core_attention(get_gpt_layer_local_spec(), FcpConfig(cp=2, seq_length=64), None)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
