"""Ring mode on Megatron's per-document THD path: packed micro-batches with every document padded to 2*cp.

Megatron's answer for packed documents under context parallelism is the THD format. Every document is padded
to a multiple of ``2 * cp`` and laid at its padded offset (its real tokens first, then its padding slots), and
``PackedSeqParams(qkv_format="thd")`` carries

* ``cu_seqlens_q/kv``: the real cumulative document lengths (where attention stops inside each document),
* ``cu_seqlens_q/kv_padded``: the cumulative padded lengths (where each document starts in the tensors),
* ``max_seqlen_q/kv``: the longest padded document (the rotary table Megatron builds for THD),
* ``pad_between_seqs``: set explicitly, because Transformer Engine (<= 2.17.1) infers it from all but the last
  entry of the cumulative lengths and so misses padding on the last document (TransformerEngine issue #3331).

Each CP rank keeps, per document, chunks ``r`` and ``2cp-1-r`` of the document's padded length cut in ``2cp``
equal chunks: Transformer Engine's ``thd_get_partitioned_indices``, which megatron-core 0.19.2's
``get_batch_on_this_cp_rank`` calls when the batch holds ``cu_seqlens`` / ``cu_seqlens_padded``. Where
Transformer Engine is importable (megatron-core's ``tex``), :func:`thd_batch_on_this_cp_rank` calls Megatron's
function exactly as Megatron's own step does; elsewhere :func:`thd_partition_index` computes the same indices in
plain torch. Attention then never crosses a document boundary, as in FCP mode, so ``ring`` and ``fcp`` train the
same model.

Padding slots carry token 0, label 0, loss mask 0 and position 0. At CP 1 nothing is padded (Megatron partitions
nothing there). Where tensor parallelism splits the sequence (``tp > 1``), the last document's padding is
extended so that every CP rank's token count divides by ``tp``. Since every document's real tokens come before
its padding, causal attention of a real token never sees a padding slot.

Megatron's local attention (``--transformer-impl local``) takes no THD parameters: at CP 1 ring mode gives it the
same per-document attention as a dense mask (:func:`document_attention_mask`); under CP it needs Transformer
Engine.

Not checked here: Megatron's real ring attention (Transformer Engine's fused kernels on a GPU) does not run on
the CPU machines this project is built on, so no loss-against-no-CP check of Megatron's ring path on these THD
batches exists yet; the tests check the layout, the partition and the attention the THD parameters define.
This module imports megatron-core only inside the functions that need it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from megatron_fcp.errors import InputError
from megatron_fcp.megatron.batch import SAMPLE_KEYS, doc_lengths_from_positions


@dataclass(frozen=True)
class ThdSample:
    """One micro-batch in the padded THD layout (all CP ranks' tokens; :func:`thd_batch_on_this_cp_rank` cuts it).

    ``tokens``, ``labels``, ``position_ids`` (int64) and ``loss_mask`` (the input's dtype, float32 from Megatron's
    datasets) are ``[1, total_padded]``; ``cu_seqlens`` and ``cu_seqlens_padded`` are int32 ``[num_docs + 1]``;
    ``max_seqlen`` is the longest padded document, ``cp`` the CP size the documents were padded for and
    ``has_padding`` whether any document has padding slots (Transformer Engine's ``pad_between_seqs``).
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    cu_seqlens_padded: torch.Tensor
    max_seqlen: int
    cp: int
    has_padding: bool

    @property
    def total_tokens(self) -> int:
        """Token slots in the padded layout (real tokens and padding)."""
        return int(self.tokens.shape[1])

    def to(self, device: torch.device | str) -> ThdSample:
        """The same sample with every tensor on ``device``."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return ThdSample(**moved)


# -- the padded layout ------------------------------------------------------------------------------------
def _check_sizes(cp: int, tp: int) -> None:
    if cp < 1 or tp < 1:
        raise InputError(f"THD layout needs CP size >= 1 and TP size >= 1, got cp={cp}, tp={tp}")


def pad_multiple(cp: int) -> int:
    """What every document's padded length is a multiple of: ``2 * cp`` under CP, 1 (no padding) at CP 1, where
    Megatron does not partition."""
    return 2 * cp if cp > 1 else 1


def padded_lengths(doc_lens, cp: int, tp: int = 1) -> np.ndarray:
    """int64 ``[num_docs]``: every length rounded up to a multiple of :func:`pad_multiple` ``m``; the last one
    further extended (by whole multiples of ``m``) so that the total divides by ``m * tp``."""
    _check_sizes(cp, tp)
    lens = np.asarray(doc_lens, dtype=np.int64).reshape(-1)
    if np.any(lens < 0):
        raise InputError(f"document lengths must be >= 0, got {lens.tolist()}")
    step = pad_multiple(cp)
    padded = -(-lens // step) * step
    if padded.size:
        padded[-1] += -padded.sum() % (step * tp)
    return padded


def cumulative(lengths, device: torch.device | str | None = None) -> torch.Tensor:
    """int32 ``[len(lengths) + 1]``: 0 followed by the running sums of ``lengths``."""
    lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
    return torch.from_numpy(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)).to(device)


def real_token_index(cu_seqlens: torch.Tensor, cu_seqlens_padded: torch.Tensor) -> torch.Tensor:
    """int64 ``[sum of real lengths]``: where each real token lies in the padded layout, in document order."""
    cu, cu_pad = cu_seqlens.to(torch.int64), cu_seqlens_padded.to(torch.int64)
    lens = cu[1:] - cu[:-1]
    shift = torch.repeat_interleave(cu_pad[:-1] - cu[:-1], lens)
    return torch.arange(int(cu[-1]), device=cu.device) + shift


def _as_rows(x, name: str) -> torch.Tensor:
    """``x`` (tensor or array, ``[s]`` or ``[b, s]``) as a CPU tensor ``[b, s]``."""
    t = torch.as_tensor(x).detach().cpu()
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise InputError(f"{name} must be [micro_batch, seq_length] or [seq_length], got shape {tuple(t.shape)}")
    return t


def thd_sample(tokens, labels, loss_mask, position_ids, cp: int, tp: int = 1) -> ThdSample:
    """A packed micro-batch in the padded THD layout for CP size ``cp`` (and TP size ``tp``, see module docstring).

    Inputs are ``[b, s]`` (or ``[s]``) tensors or arrays; ``position_ids`` count 0, 1, 2, ... inside every
    document (Megatron's ``--reset-position-ids``), so a document starts where its position is 0. The ``b``
    samples' documents are concatenated into one THD sequence of ``[1, total_padded]`` (Megatron's flattening of
    packed micro-batches). Raises :class:`InputError` on shapes that differ or positions that are not
    per-document counters.
    """
    rows = {name: _as_rows(x, name) for name, x in zip(SAMPLE_KEYS, (tokens, labels, loss_mask, position_ids),
                                                            strict=True)}
    shape = rows["tokens"].shape
    if any(t.shape != shape for t in rows.values()):
        raise InputError("tokens, labels, loss_mask and position_ids must have one shape, got "
                         + ", ".join(f"{n} {tuple(t.shape)}" for n, t in rows.items()))
    lens = np.concatenate([doc_lengths_from_positions(row.numpy()) for row in rows["position_ids"]])
    padded = padded_lengths(lens, cp, tp)
    cu, cu_pad = cumulative(lens), cumulative(padded)
    index = real_token_index(cu, cu_pad)
    total = int(cu_pad[-1])
    out = {}
    for name, t in rows.items():
        values = t.reshape(-1).long() if name != "loss_mask" else t.reshape(-1)
        slots = values.new_zeros(total)
        slots[index] = values
        out[name] = slots.unsqueeze(0)
    return ThdSample(**out, cu_seqlens=cu, cu_seqlens_padded=cu_pad, max_seqlen=int(padded.max(initial=0)), cp=cp,
                     has_padding=bool(np.any(padded != lens)))


# -- the CP rank's share ----------------------------------------------------------------------------------
def _check_partition(cu: torch.Tensor, total_tokens: int, cp: int, cp_rank: int) -> torch.Tensor:
    """Per-document padded lengths (int64), after checking the partition's arguments."""
    if cp < 1 or not 0 <= cp_rank < cp:
        raise InputError(f"CP rank {cp_rank} is outside a CP group of size {cp}")
    if cu.dim() != 1 or cu.numel() < 1 or int(cu[0]) != 0:
        raise InputError("cu_seqlens_padded must be 1-D and start at 0: build it with megatron_fcp.megatron.thd")
    lens = cu[1:] - cu[:-1]
    if bool((lens < 0).any()) or bool((lens % pad_multiple(cp)).any()):
        raise InputError(f"every padded document length must be a multiple of 2*cp = {2 * cp}, got "
                         f"{lens.tolist()}: pad the documents with megatron_fcp.megatron.thd.thd_sample")
    if int(cu[-1]) != total_tokens:
        raise InputError(f"the padded documents hold {int(cu[-1])} tokens but the batch holds {total_tokens}: "
                         "fold tail padding into the last document's padded length")
    return lens


def _concat_ranges(starts: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """int64: ``arange(starts[i], starts[i] + lens[i])`` for every ``i``, concatenated."""
    offsets = torch.cumsum(lens, 0) - lens
    return torch.arange(int(lens.sum()), device=starts.device) + torch.repeat_interleave(starts - offsets, lens)


def thd_partition_index(cu_seqlens_padded, total_tokens: int, cp: int, cp_rank: int) -> torch.Tensor:
    """int64 ``[total_tokens // cp]``: the padded-layout slots CP rank ``cp_rank`` keeps, in its local order.

    Transformer Engine's ``thd_get_partitioned_indices``: each document's padded length is cut into ``2 * cp``
    equal chunks and the rank keeps chunks ``cp_rank`` and ``2*cp - 1 - cp_rank``, document by document (at CP 1
    every slot, in order, whatever the lengths). ``cu_seqlens_padded`` (int32 or int64 ``[num_docs + 1]``) must
    end at ``total_tokens``; the result lies on its device.
    """
    cu = torch.as_tensor(cu_seqlens_padded).reshape(-1).to(torch.int64)
    chunk = _check_partition(cu, total_tokens, cp, cp_rank) // (2 * cp)
    if cp == 1:
        return torch.arange(total_tokens, device=cu.device)
    early = cu[:-1] + cp_rank * chunk
    late = cu[:-1] + (2 * cp - 1 - cp_rank) * chunk
    return _concat_ranges(torch.stack([early, late], 1).reshape(-1), chunk.repeat_interleave(2))


def thd_packed_seq_params(sample: ThdSample):
    """Megatron's ``PackedSeqParams`` for ``sample`` (THD; real and padded cumulative lengths, longest padded
    document, ``pad_between_seqs`` set explicitly), on the sample's device."""
    from megatron.core.packed_seq_params import PackedSeqParams

    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=sample.cu_seqlens, cu_seqlens_kv=sample.cu_seqlens,
                           cu_seqlens_q_padded=sample.cu_seqlens_padded,
                           cu_seqlens_kv_padded=sample.cu_seqlens_padded, max_seqlen_q=sample.max_seqlen,
                           max_seqlen_kv=sample.max_seqlen, pad_between_seqs=sample.has_padding)


def _megatron_batch(sample: ThdSample) -> dict:
    """``sample`` as the batch dict megatron-core 0.19.2's ``get_batch_on_this_cp_rank`` partitions per document
    (cumulative lengths with a leading batch dimension, as its datasets collate them)."""
    return {"tokens": sample.tokens, "labels": sample.labels, "loss_mask": sample.loss_mask,
            "position_ids": sample.position_ids, "attention_mask": None,
            "cu_seqlens": sample.cu_seqlens.unsqueeze(0), "cu_seqlens_padded": sample.cu_seqlens_padded.unsqueeze(0),
            "max_seqlen": torch.tensor(sample.max_seqlen, dtype=torch.int32, device=sample.cu_seqlens.device)}


def te_partition_available() -> bool:
    """Whether megatron-core found Transformer Engine's torch extension (its ``get_batch_on_this_cp_rank`` then
    partitions THD batches with ``thd_get_partitioned_indices``)."""
    from megatron.core import utils

    return getattr(utils, "tex", None) is not None


def thd_batch_on_this_cp_rank(sample: ThdSample, cp_rank: int, cp_group=None):
    """This CP rank's share of ``sample``: ``(batch, packed_seq_params)``.

    ``batch`` maps ``tokens``, ``labels``, ``position_ids`` (int64) and ``loss_mask`` to ``[1, total_padded //
    cp]`` tensors (chunks ``cp_rank`` and ``2cp-1-cp_rank`` of every document); ``packed_seq_params`` is
    :func:`thd_packed_seq_params` (the whole micro-batch's cumulative lengths, as Transformer Engine's ring
    attention expects). With ``cp_group`` given and Transformer Engine importable, Megatron's
    ``get_batch_on_this_cp_rank`` partitions (``cp_group`` must be a group of ``sample.cp`` ranks in which this
    process is ``cp_rank``); otherwise :func:`thd_partition_index` does.
    """
    if cp_group is not None and sample.cp > 1 and te_partition_available():
        from megatron.core.utils import get_batch_on_this_cp_rank

        size, rank = torch.distributed.get_world_size(cp_group), torch.distributed.get_rank(cp_group)
        if (size, rank) != (sample.cp, cp_rank):
            raise InputError(f"the CP group has {size} ranks and this is rank {rank}, but the sample was padded "
                             f"for CP {sample.cp} and asked for rank {cp_rank}")
        local = get_batch_on_this_cp_rank(_megatron_batch(sample), is_hybrid_cp=False, cp_group=cp_group)
    else:
        index = thd_partition_index(sample.cu_seqlens_padded, sample.total_tokens, sample.cp, cp_rank)
        index = index.to(sample.tokens.device)
        local = {name: getattr(sample, name).index_select(1, index) for name in SAMPLE_KEYS}
    return {name: local[name] for name in SAMPLE_KEYS}, thd_packed_seq_params(sample)


# -- Megatron's local (non Transformer Engine) attention: no THD, a dense document mask at CP 1 --------------------
def document_attention_mask(sample: ThdSample) -> torch.Tensor:
    """bool ``[1, 1, t, t]`` (``t = sample.total_tokens``), Megatron's convention (True = masked): query ``i`` may
    see key ``j`` only where both lie in one document's padded segment, ``j`` is a real token and ``j <= i``.

    The attention the THD parameters define, for Megatron's local ``DotProductAttention``, which rejects
    ``packed_seq_params``. It holds ``t * t`` bytes: meant for CP 1 runs of the local spec (tests, the CPU demo,
    single-GPU checks).
    """
    cu, cu_pad = sample.cu_seqlens.long(), sample.cu_seqlens_padded.long()
    slot = torch.arange(sample.total_tokens, device=cu.device)
    segment = torch.bucketize(slot, cu_pad[1:], right=True)
    is_real = (slot - cu_pad[segment]) < (cu[1:] - cu[:-1])[segment]
    allowed = (segment[:, None] == segment[None, :]) & is_real[None, :] & (slot[None, :] <= slot[:, None])
    return (~allowed)[None, None]


def ring_step_inputs(sample: ThdSample, cp_rank: int, cp_group=None, local_attention: bool = False):
    """What ring mode's step feeds the model: ``(batch, attention_mask, packed_seq_params)``.

    Transformer Engine's attention (``local_attention`` False): this rank's THD batch and parameters
    (:func:`thd_batch_on_this_cp_rank`), no mask. Megatron's local attention, which takes no THD parameters:
    at CP 1 the whole sample and :func:`document_attention_mask`; under CP :class:`InputError` (Megatron's ring
    attention is Transformer Engine's).
    """
    if not local_attention:
        batch, params = thd_batch_on_this_cp_rank(sample, cp_rank, cp_group)
        return batch, None, params
    if sample.cp > 1:
        raise InputError(f"ring mode at CP {sample.cp} needs Transformer Engine's attention (THD ring); "
                         "use --transformer-impl transformer_engine, or --context-parallel-mode fcp")
    return {name: getattr(sample, name) for name in SAMPLE_KEYS}, document_attention_mask(sample), None
