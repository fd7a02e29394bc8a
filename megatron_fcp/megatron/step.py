"""The training step's FCP side: read this rank's share of a micro-batch, run the model, reduce the loss, and
report FCP's figures.

:class:`FcpStep` is the ``forward_step_func`` Megatron's ``pretrain`` (and the CPU trainer) call. Per
micro-batch it takes one collated sample of :class:`~megatron_fcp.megatron.batch.FcpBatchDataset` (micro-batch
size 1), turns the shipped schedule into device tensors with one copy, checks on a host (gloo) group that every
CP rank holds the same plan, runs the model and returns Megatron's per-token loss: the sum over this rank's loss
tokens and their count; Megatron's ``--calculate-per-token-loss`` then sums both over the data and context
parallel group, so uneven token counts per rank weigh every token once.

**Figures.** The loss function's report carries, next to ``lm loss``, one-element tensors named in
:data:`FIGURES`. Megatron averages one-element report values over the step's micro-batches locally (no
collective), prints them in its log line and writes them as TensorBoard scalars; the CPU trainer writes the
same names. They are this rank's (the logging rank's) figures; nothing in them synchronises the GPU. Key/value
bytes and exchange waits are counted when the loss function runs, so a micro-batch's backward exchange is counted
with the next micro-batch (over a log interval the totals are the same).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from megatron_fcp.attention.engine import check_plan_agreement_on_host, get_exchange
from megatron_fcp.attention.head_parallel import head_parallel_groups
from megatron_fcp.attention.schedule import decode_schedule
from megatron_fcp.errors import InputError
from megatron_fcp.megatron.batch import STATS, decode_rank_plan
from megatron_fcp.megatron.config import HEAD_SPLITTING, FcpConfig
from megatron_fcp.megatron.model import FcpPackedSeqParams

FIGURES = ("fcp planned imbalance", "fcp kv sent MiB", "fcp kv received MiB", "fcp exchange wait ms",
           "fcp planning ms", "fcp loader wait ms", "fcp heads exchange")
"""The per-micro-batch figures in the loss report (Megatron's log line and TensorBoard scalars): the planned
max/mean attention work over CP ranks, key/value (and key/value gradient) mebibytes this rank posted to send and
to receive, milliseconds the host spent waiting on the exchange (on NCCL the stream waits, not the host, so this
is near zero there), milliseconds of planning and schedule building (in data-loader workers), milliseconds
the step waited for the data loader, and 1 where the micro-batch ran the heads exchange (averaged over a step: the
share of its micro-batches that did; ``--fcp-node-exchange``)."""
_MIB = 1024.0 * 1024.0


@dataclass(frozen=True, eq=False)
class MicroBatch:
    """This rank's inputs of one micro-batch, ``[1, num_tokens]`` on the device in the plan's token order (padding
    last, loss mask 0), and what the data loader measured."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    params: FcpPackedSeqParams
    stats: dict[str, float]
    """The sample's ``fcp_stats`` by name (:data:`~megatron_fcp.megatron.batch.STATS`)."""
    loader_wait_s: float
    rank_plan: object | None = None
    """The rank's plan view where the sample carried it (``FcpBatchDataset(with_plan_view=True)``)."""


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def host_cp_group(cp_group: dist.ProcessGroup) -> dist.ProcessGroup:
    """A host (gloo) process group with the ranks of ``cp_group`` in the same order, for checks that must not
    synchronise the GPU: ``cp_group`` itself if it is gloo. Otherwise every rank of the world must call this once,
    at start-up, at the same point: it makes one gloo group per CP group."""
    if dist.get_backend(cp_group) == "gloo":
        return cp_group
    mine = dist.get_process_group_ranks(cp_group)
    everyone: list[list[int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    host = None
    for ranks in sorted({tuple(sorted(r)) for r in everyone}):
        group = dist.new_group(list(ranks), backend="gloo")
        if dist.get_rank() in ranks:
            host = group
    return host


def per_token_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron's per-token loss: ``(sum of masked token losses, number of loss tokens, report)``."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}


class FcpStep:
    """FCP's ``forward_step_func`` and the keeper of its per-micro-batch figures (see the module docstring).

    Args:
        cfg: the run's FCP settings (the exchange timeout picks the exchange FCP attention uses).
        cp_group: the CP process group (None: no exchange figures, as at CP 1).
        host_group: a gloo group of the CP ranks (:func:`host_cp_group`) on which every micro-batch's plan is
            checked before the model runs; None skips the check (then pass ``verify_plan`` in the layers).
        device: where inputs go (default: the current CUDA device, else CPU).
        keep_records: keep every micro-batch's figures for :meth:`take` (the CPU trainer's records); Megatron's
            path reads them from the loss report instead.
    """

    def __init__(self, cfg: FcpConfig, cp_group: dist.ProcessGroup | None = None,
                 host_group: dist.ProcessGroup | None = None, device: torch.device | str | None = None,
                 keep_records: bool = False):
        self.cfg, self.host_group, self.keep_records = cfg, host_group, keep_records
        self.device = torch.device(device) if device is not None else _default_device()
        multi = cfg.cp > 1 and cp_group is not None and dist.is_initialized()
        groups = []  # the groups FCP's exchange runs over: the CP group (p2p), the across group (heads), or both
        if multi:
            g, across = 1, None
            if cfg.node_exchange in HEAD_SPLITTING:  # the CP ranks of a node (1: nothing to split, plain exchange)
                node, across = head_parallel_groups(cp_group)
                g = dist.get_world_size(node)
            if cfg.node_exchange != "heads" or g == 1:
                groups.append(cp_group)
            if g > 1 and dist.get_world_size(across) > 1:  # heads: between nodes (one node: nothing moves)
                groups.append(across)
        self.exchanges = [get_exchange(group, cfg.exchange_timeout_s) for group in groups]
        """The exchanges this rank's FCP layers use; under ``auto`` they share the first one's memory meter (a
        micro-batch runs one of them, and its buffers are gone before the next one starts)."""
        for other in self.exchanges[1:]:
            other.memory = self.exchanges[0].memory
        self.records: list[dict] = []
        self._counted = self._exchange_totals()

    # -- inputs -----------------------------------------------------------------------------------------------
    def next_batch(self, data_iterator) -> MicroBatch:
        """The next micro-batch of this rank (see :class:`MicroBatch`)."""
        start = time.perf_counter()
        sample = next(data_iterator)
        wait = time.perf_counter() - start
        schedule_data = sample.get("fcp_schedule") if isinstance(sample, dict) else None
        if schedule_data is None:
            raise InputError("FCP step got a batch without an FCP schedule: feed it batches from megatron_fcp's data "
                             "hooks (FcpBatchDataset), or run with --context-parallel-mode ring")
        if schedule_data.dim() != 2 or schedule_data.shape[0] != 1:
            raise InputError(f"FCP needs micro-batch size 1 (one packed sequence per micro-batch), got a batch of "
                             f"{schedule_data.shape[0]}; use --micro-batch-size 1")
        sched = decode_schedule(schedule_data[0], self.device)
        if self.host_group is not None and self.cfg.cp > 1:  # heads: every CP rank holds the nodes' plan
            check_plan_agreement_on_host(sched, self.host_group)
        tokens = sample["tokens"].to(self.device, non_blocking=True).long()
        labels = sample["labels"].to(self.device, non_blocking=True).long()
        loss_mask = sample["loss_mask"].to(self.device, non_blocking=True).float()
        host_positions = sample["position_ids"]
        max_position = int(host_positions.max()) if host_positions.numel() else 0  # on the host: no sync
        position_ids = host_positions.to(self.device, non_blocking=True).long()
        n = tokens.shape[1]
        cu = torch.tensor([0, n], dtype=torch.int32).to(self.device, non_blocking=True)
        params = FcpPackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=n,
                                    max_seqlen_kv=n, fcp_schedule=sched, fcp_position_ids=position_ids[0],
                                    fcp_max_position=max_position)
        stats = {name: float(v) for name, v in zip(STATS, sample["fcp_stats"][0].tolist(), strict=True)}
        view = decode_rank_plan(sample["fcp_plan"][0]) if "fcp_plan" in sample else None
        return MicroBatch(tokens, labels, loss_mask, position_ids, params, stats, wait, view)

    # -- figures ----------------------------------------------------------------------------------------------
    def _exchange_totals(self) -> tuple[float, float, float]:
        counters = [exchange.counter for exchange in self.exchanges]
        return (float(sum(sum(c.sent.values()) for c in counters)),
                float(sum(sum(c.received.values()) for c in counters)),
                float(sum(sum(getattr(c, "wait_s", {}).values()) for c in counters)))

    def figures(self, batch: MicroBatch) -> dict[str, float]:
        """:data:`FIGURES` of ``batch``, with the exchange's counts since the previous call."""
        totals = self._exchange_totals()
        sent, received, wait = (now - before for now, before in zip(totals, self._counted, strict=True))
        self._counted = totals
        values = (batch.stats["pairs_imbalance"], sent / _MIB, received / _MIB, 1e3 * wait,
                  1e3 * (batch.stats["plan_seconds"] + batch.stats["schedule_seconds"]), 1e3 * batch.loader_wait_s,
                  batch.stats["heads_exchange"])
        return dict(zip(FIGURES, values, strict=True))

    def take(self) -> list[dict]:
        """The records of the micro-batches since the last call (and forget them): :data:`FIGURES`, the sample's
        stats and, where shipped, the rank's plan view (``rank_plan``)."""
        out, self.records = self.records, []
        return out

    def loss(self, batch: MicroBatch, output_tensor: torch.Tensor):
        """:func:`per_token_loss` with :data:`FIGURES` added to the report, as one-element tensors on the loss's
        device (copied from pinned host memory, without blocking)."""
        loss, num_tokens, report = per_token_loss(batch.loss_mask, output_tensor)
        figures = self.figures(batch)
        if self.keep_records:
            self.records.append({**figures, **batch.stats, "rank_plan": batch.rank_plan})
        values = torch.tensor(list(figures.values()), dtype=torch.float32)
        if loss.device.type == "cuda":
            values = values.pin_memory()
        values = values.to(loss.device, non_blocking=True)
        report.update({name: values[i:i + 1] for i, name in enumerate(figures)})
        return loss, num_tokens, report

    def __call__(self, data_iterator, model):
        batch = self.next_batch(data_iterator)
        output = model(batch.tokens, batch.position_ids, None, labels=batch.labels, loss_mask=batch.loss_mask,
                       packed_seq_params=batch.params)
        return output, partial(self.loss, batch)
