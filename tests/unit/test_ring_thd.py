"""Ring mode's per-document THD batches (megatron_fcp.megatron.thd): Transformer Engine's partition, attention
that stops at document boundaries, and the padded layout.

Megatron's real ring attention (Transformer Engine kernels on a GPU) cannot run here; attention is computed the
way the THD parameters define it, with the float64 reference of megatron_fcp.testing.reference.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

from megatron_fcp.errors import InputError
from megatron_fcp.megatron.thd import (
    document_attention_mask,
    padded_lengths,
    real_token_index,
    thd_batch_on_this_cp_rank,
    thd_partition_index,
    thd_sample,
)
from megatron_fcp.testing.reference import dense_attention, document_mask, reference_attention

DOC_SETS = {
    "one token": [1],
    "below 2cp": [1, 2, 3],
    "odd and even": [5, 8, 13, 2, 7, 16],
    "long and short": [31, 1, 1, 12, 9, 4],
}
HEADS, DIM = 2, 4


# -- an independent copy of Transformer Engine's thd_get_partitioned_indices (its CUDA kernel, token by token) ---
def te_partition_reference(cu_padded: list[int], total_tokens: int, cp: int, rank: int) -> list[int]:
    """For every local slot t: find its document in the cumulative lengths divided by cp, take the first half of
    the document's local length from chunk ``rank`` and the second half from chunk ``2cp-1-rank``."""
    local_cu = [c // cp for c in cu_padded]
    out = []
    for t in range(total_tokens // cp):
        doc = next(i for i in range(len(local_cu) - 1) if local_cu[i] <= t < local_cu[i + 1])
        local_len = local_cu[doc + 1] - local_cu[doc]
        offset = t - local_cu[doc]
        chunk_id = rank if offset < local_len // 2 else 2 * cp - 2 - rank
        out.append(offset + local_cu[doc] * cp + local_len // 2 * chunk_id)
    return out


def padded_by_hand(doc_lens: list[int], cp: int) -> list[int]:
    """Cumulative lengths with every document rounded up to a multiple of 2*cp."""
    cu = [0]
    for n in doc_lens:
        cu.append(cu[-1] + math.ceil(n / (2 * cp)) * 2 * cp)
    return cu


def packed(doc_lens: list[int], seed: int = 0) -> dict:
    """One packed sample [1, s]: random tokens, labels = tokens + 1000, a loss mask with a few zeros, per-document
    positions."""
    gen = torch.Generator().manual_seed(seed)
    s = sum(doc_lens)
    tokens = torch.randint(1, 500, (1, s), generator=gen)
    loss_mask = (torch.rand(1, s, generator=gen) > 0.2).float()
    positions = torch.cat([torch.arange(n) for n in doc_lens]).unsqueeze(0)
    return {"tokens": tokens, "labels": tokens + 1000, "loss_mask": loss_mask, "position_ids": positions}


def layout(sample: dict, cp: int, tp: int = 1):
    return thd_sample(sample["tokens"], sample["labels"], sample["loss_mask"], sample["position_ids"], cp, tp)


# -- (a) the partition --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cp", [1, 2, 3, 4])
@pytest.mark.parametrize("docs", DOC_SETS.values(), ids=DOC_SETS.keys())
def test_partition_is_transformer_engines(cp, docs):
    cu = padded_by_hand(docs, cp)
    for rank in range(cp):
        got = thd_partition_index(torch.tensor(cu, dtype=torch.int32), cu[-1], cp, rank)
        assert got.dtype == torch.int64
        assert got.tolist() == te_partition_reference(cu, cu[-1], cp, rank)


def test_partition_keeps_chunks_r_and_2cp_minus_1_minus_r():
    # one document of 12 slots at CP 3: six chunks of 2; rank 1 keeps chunks 1 and 4; two documents: per document
    assert thd_partition_index(torch.tensor([0, 12]), 12, 3, 1).tolist() == [2, 3, 8, 9]
    assert thd_partition_index(torch.tensor([0, 4, 12]), 12, 2, 0).tolist() == [0, 3, 4, 5, 10, 11]
    assert thd_partition_index(torch.tensor([0, 4, 12]), 12, 2, 1).tolist() == [1, 2, 6, 7, 8, 9]


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
@pytest.mark.parametrize("docs", DOC_SETS.values(), ids=DOC_SETS.keys())
def test_every_real_token_is_kept_by_exactly_one_rank(cp, docs):
    thd = layout(packed(docs), cp)
    parts = [thd_partition_index(thd.cu_seqlens_padded, thd.total_tokens, cp, r) for r in range(cp)]
    assert [p.numel() for p in parts] == [thd.total_tokens // cp] * cp
    owners = torch.zeros(thd.total_tokens, dtype=torch.int64)
    for p in parts:
        owners.index_add_(0, p, torch.ones_like(p))
    assert torch.equal(owners, torch.ones(thd.total_tokens, dtype=torch.int64))  # every slot, real or not, once
    real = real_token_index(thd.cu_seqlens, thd.cu_seqlens_padded)
    assert real.numel() == sum(docs) and torch.equal(owners[real], torch.ones(sum(docs), dtype=torch.int64))


def test_cp1_keeps_every_token_unpadded():
    thd = layout(packed([5, 3, 1]), cp=1)
    assert thd.cu_seqlens_padded.tolist() == [0, 5, 8, 9] and not thd.has_padding
    assert thd_partition_index(thd.cu_seqlens_padded, 9, 1, 0).tolist() == list(range(9))


@pytest.mark.parametrize("cu, total, cp, rank, needle", [
    ([0, 6], 6, 2, 0, "multiple of 2*cp = 4"),
    ([0, 8], 12, 2, 0, "fold tail padding"),
    ([0, 8], 8, 2, 2, "outside a CP group of size 2"),
    ([1, 8], 8, 2, 0, "start at 0"),
])
def test_partition_rejects_bad_arguments_in_one_line(cu, total, cp, rank, needle):
    with pytest.raises(InputError) as err:
        thd_partition_index(torch.tensor(cu), total, cp, rank)
    assert needle in str(err.value) and "\n" not in str(err.value)


# -- (b) attention stops at document boundaries ----------------------------------------------------------------
def thd_attention_mask(cu_seqlens: torch.Tensor, cu_seqlens_padded: torch.Tensor) -> torch.Tensor:
    """[t, t] bool, the attention the THD parameters define: query i sees key j where both lie in the same padded
    segment, j is one of the segment's first (real length) slots, and j <= i (causal)."""
    cu, cu_pad = cu_seqlens.long(), cu_seqlens_padded.long()
    total = int(cu_pad[-1])
    slot = torch.arange(total)
    segment = torch.bucketize(slot, cu_pad[1:], right=True)
    real = (slot - cu_pad[segment]) < (cu[1:] - cu[:-1])[segment]
    return (segment[:, None] == segment[None, :]) & real[None, :] & (slot[None, :] <= slot[:, None])


def qkv_of(tokens: torch.Tensor, vocab: int = 500) -> tuple[torch.Tensor, ...]:
    """float64 ``[t, HEADS, DIM]`` queries, keys and values looked up from fixed tables by token id."""
    gen = torch.Generator().manual_seed(7)
    tables = [torch.randn(vocab, HEADS, DIM, generator=gen, dtype=torch.float64) for _ in range(3)]
    return tuple(table[tokens.reshape(-1)] for table in tables)


def thd_attention_unpadded(thd) -> torch.Tensor:
    """THD attention over the padded layout, real tokens' outputs in document order."""
    q, k, v = qkv_of(thd.tokens)
    out, _ = reference_attention(q, k, v, thd_attention_mask(thd.cu_seqlens, thd.cu_seqlens_padded), DIM ** -0.5)
    return out[real_token_index(thd.cu_seqlens, thd.cu_seqlens_padded)]


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_cu_seqlens_split_exactly_at_document_boundaries(cp):
    docs = DOC_SETS["odd and even"]
    sample = packed(docs)
    thd = layout(sample, cp)
    assert thd.cu_seqlens.dtype == thd.cu_seqlens_padded.dtype == torch.int32
    assert thd.cu_seqlens.tolist() == np.concatenate([[0], np.cumsum(docs)]).tolist()
    assert thd.cu_seqlens_padded.tolist() == padded_by_hand(docs, cp)
    assert thd.max_seqlen == max(np.diff(padded_by_hand(docs, cp)))
    starts = np.concatenate([[0], np.cumsum(docs)])
    for i, n in enumerate(docs):
        at = int(thd.cu_seqlens_padded[i])
        assert torch.equal(thd.tokens[0, at:at + n], sample["tokens"][0, starts[i]:starts[i] + n])
        assert thd.position_ids[0, at:at + n].tolist() == list(range(n))


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_thd_attention_equals_per_document_attention(cp):
    docs = DOC_SETS["long and short"]
    sample = packed(docs)
    got = thd_attention_unpadded(layout(sample, cp))
    want = dense_attention(docs, *qkv_of(sample["tokens"]), "causal")
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    # the old whole-sequence causal ring (attends across documents) gives other numbers from the 2nd document on
    whole = dense_attention([sum(docs)], *qkv_of(sample["tokens"]), "causal")
    assert torch.allclose(whole[: docs[0]], want[: docs[0]], rtol=0, atol=1e-12)
    assert (whole[docs[0]:] - want[docs[0]:]).abs().max() > 1e-3


def test_changing_another_document_changes_nothing_in_a_document():
    docs, cp = DOC_SETS["odd and even"], 3
    sample = packed(docs)
    before = thd_attention_unpadded(layout(sample, cp))
    starts = np.concatenate([[0], np.cumsum(docs)])
    changed = dict(sample, tokens=sample["tokens"].clone())
    changed["tokens"][0, starts[2]:starts[3]] = (changed["tokens"][0, starts[2]:starts[3]] + 17) % 499 + 1
    after = thd_attention_unpadded(layout(changed, cp))
    for i in range(len(docs)):
        rows = slice(starts[i], starts[i + 1])
        if i == 2:
            assert (after[rows] - before[rows]).abs().max() > 1e-3
        else:
            assert torch.equal(after[rows], before[rows])


# -- (c) the padded layout ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cp", [1, 2, 3, 4])
@pytest.mark.parametrize("docs", DOC_SETS.values(), ids=DOC_SETS.keys())
def test_padding_slots_are_masked_and_unpadding_gives_the_sample_back(cp, docs):
    sample = packed(docs)
    thd = layout(sample, cp)
    real = real_token_index(thd.cu_seqlens, thd.cu_seqlens_padded)
    pad = torch.ones(thd.total_tokens, dtype=torch.bool)
    pad[real] = False
    assert thd.total_tokens == (padded_by_hand(docs, cp)[-1] if cp > 1 else sum(docs))
    assert int(pad.sum()) == thd.total_tokens - sum(docs)
    for name in ("tokens", "labels", "loss_mask", "position_ids"):
        values = getattr(thd, name)
        assert values.shape == (1, thd.total_tokens)
        assert torch.equal(values[0, real], sample[name][0].to(values.dtype))
        assert not values[0, pad].any()  # padding: token 0, label 0, loss mask 0, position 0
    assert thd.has_padding == bool(pad.any())


def test_micro_batch_rows_are_concatenated_as_separate_documents():
    a, b = packed([3, 4], seed=1), packed([6, 1], seed=2)
    rows = {k: torch.cat([a[k], b[k]]) for k in a}
    thd = layout(rows, cp=2)
    assert thd.cu_seqlens.tolist() == [0, 3, 7, 13, 14]
    assert thd.cu_seqlens_padded.tolist() == [0, 4, 8, 16, 20]
    real = real_token_index(thd.cu_seqlens, thd.cu_seqlens_padded)
    assert torch.equal(thd.tokens[0, real], rows["tokens"].reshape(-1))


def test_tensor_parallel_extends_the_last_document_only():
    docs, cp, tp = [5, 3], 2, 4  # padded 8 + 4 = 12; every rank's share must divide by tp: total 16
    assert padded_lengths(docs, cp, tp).tolist() == [8, 8]
    thd = layout(packed(docs), cp, tp)
    assert thd.total_tokens == 16 and thd.max_seqlen == 8
    assert [thd_partition_index(thd.cu_seqlens_padded, 16, cp, r).numel() % tp for r in range(cp)] == [0, 0]


def test_layout_rejects_bad_input_in_one_line():
    sample = packed([3, 2])
    for bad, needle in [(dict(sample, labels=sample["labels"][:, :4]), "one shape"),
                        (dict(sample, position_ids=torch.tensor([[0, 1, 3, 0, 1]])), "per-document counters")]:
        with pytest.raises(InputError) as err:
            layout(bad, cp=2)
        assert needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError, match="CP size >= 1"):
        layout(sample, cp=0)


# -- the rank's batch and Megatron's path ---------------------------------------------------------------------
def test_rank_batch_and_packed_seq_params():
    docs, cp = [5, 3, 8], 2
    thd = layout(packed(docs), cp)
    for rank in range(cp):
        batch, params = thd_batch_on_this_cp_rank(thd, rank)
        index = thd_partition_index(thd.cu_seqlens_padded, thd.total_tokens, cp, rank)
        for name in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(batch[name], getattr(thd, name)[:, index])
        assert batch["tokens"].shape == (1, 10)  # padded 8 + 4 + 8 over 2 ranks
    assert params.qkv_format == "thd" and params.max_seqlen_q == params.max_seqlen_kv == 8
    assert params.cu_seqlens_q.tolist() == params.cu_seqlens_kv.tolist() == [0, 5, 8, 16]
    assert params.cu_seqlens_q_padded.tolist() == params.cu_seqlens_kv_padded.tolist() == [0, 8, 12, 20]
    assert params.cu_seqlens_q.dtype == params.cu_seqlens_q_padded.dtype == torch.int32
    assert params.pad_between_seqs is True
    _, unpadded = thd_batch_on_this_cp_rank(layout(packed([8, 4]), cp), 0)
    assert unpadded.pad_between_seqs is False


def test_megatron_get_batch_on_this_cp_rank_partitions_the_same(monkeypatch):
    """Megatron's own per-document path, with TE's kernel replaced by the reference copy, takes our batch dict
    and keeps the same tokens as the pure-torch partition."""
    from megatron.core import utils

    cp, group = 3, object()
    rank_of = {"rank": 0}

    def te_kernel(cu, total, world, rank):
        return torch.tensor(te_partition_reference(cu.tolist(), total, world, rank), dtype=torch.int64)

    monkeypatch.setattr(utils, "tex", types.SimpleNamespace(thd_get_partitioned_indices=te_kernel))
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda g=None: cp if g is group else 1)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda g=None: rank_of["rank"] if g is group else 0)
    thd = layout(packed(DOC_SETS["long and short"]), cp)
    for rank in range(cp):
        rank_of["rank"] = rank
        via_megatron, _ = thd_batch_on_this_cp_rank(thd, rank, cp_group=group)
        plain, _ = thd_batch_on_this_cp_rank(thd, rank)
        for name in plain:
            assert torch.equal(via_megatron[name], plain[name])
    with pytest.raises(InputError, match="sample was padded for CP 3 and asked for rank 1"):
        thd_batch_on_this_cp_rank(thd, 1, cp_group=group)  # the group says rank 2


class FakeModel:
    """Stands for GPTModel: records its inputs, returns the labels as the per-token losses ``[1, t]``."""

    def __init__(self, transformer_impl: str):
        self.config = types.SimpleNamespace(transformer_impl=transformer_impl)
        self.seen = {}

    def __call__(self, tokens, position_ids, attention_mask, labels=None, loss_mask=None, packed_seq_params=None):
        self.seen = dict(tokens=tokens, mask=attention_mask, params=packed_seq_params)
        return labels.float()


def fake_parallel_state(monkeypatch, cp: int, cp_rank: int):
    from megatron.core import parallel_state

    for name, value in [("get_context_parallel_world_size", cp), ("get_context_parallel_rank", cp_rank),
                        ("get_tensor_model_parallel_world_size", 1), ("get_context_parallel_group", None)]:
        monkeypatch.setattr(parallel_state, name, lambda v=value: v)


def test_ring_forward_step_feeds_the_model_thd_batches(monkeypatch):
    from megatron_fcp.megatron.pretrain_gpt import ring_forward_step

    fake_parallel_state(monkeypatch, cp=2, cp_rank=1)
    model, sample = FakeModel("transformer_engine"), packed([5, 3, 8])
    output, loss_func = ring_forward_step(iter([sample]), model)
    thd = layout(sample, 2)
    index = thd_partition_index(thd.cu_seqlens_padded, thd.total_tokens, 2, 1)
    assert torch.equal(model.seen["tokens"], thd.tokens[:, index]) and model.seen["mask"] is None
    params = model.seen["params"]
    assert params.qkv_format == "thd" and params.cu_seqlens_q_padded.tolist() == [0, 8, 12, 20]
    loss, num_tokens, _ = loss_func(output)
    mask = thd.loss_mask[0, index]
    assert float(loss) == pytest.approx(float((thd.labels[0, index].float() * mask).sum()))
    assert int(num_tokens) == int(mask.sum())


def test_ring_forward_step_on_the_local_spec_masks_documents_at_cp1_and_refuses_cp2(monkeypatch):
    from megatron_fcp.megatron.pretrain_gpt import ring_forward_step

    fake_parallel_state(monkeypatch, cp=1, cp_rank=0)
    model, sample = FakeModel("local"), packed([5, 3, 8])
    ring_forward_step(iter([sample]), model)
    assert model.seen["params"] is None and torch.equal(model.seen["tokens"], sample["tokens"])
    assert torch.equal(model.seen["mask"], document_attention_mask(layout(sample, 1)))
    fake_parallel_state(monkeypatch, cp=2, cp_rank=0)
    with pytest.raises(InputError, match="--transformer-impl transformer_engine"):
        ring_forward_step(iter([sample]), model)


@pytest.mark.parametrize("cp", [1, 3])
def test_document_mask_lets_real_tokens_see_their_document_only(cp):
    docs = DOC_SETS["odd and even"]
    thd = layout(packed(docs), cp)
    mask = document_attention_mask(thd)
    assert mask.shape == (1, 1, thd.total_tokens, thd.total_tokens) and mask.dtype == torch.bool
    allowed = ~mask[0, 0]
    real = real_token_index(thd.cu_seqlens, thd.cu_seqlens_padded)
    pad = torch.ones(thd.total_tokens, dtype=torch.bool)
    pad[real] = False
    assert torch.equal(allowed[real][:, real], document_mask(docs, "causal"))
    assert not allowed[:, pad].any()  # no query sees a padding slot
