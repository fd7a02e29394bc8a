"""The training step's FCP side: read this rank's planned share of a micro-batch, run the model, reduce the loss.

``get_fcp_batch`` takes one collated sample of :class:`~megatron_fcp.megatron.batch.FcpBatchDataset` (micro-batch
size 1) and returns the model inputs, with the rank's plan in :class:`FcpPackedSeqParams`. ``fcp_forward_step``
is the ``forward_step_func`` Megatron's ``pretrain`` (and the CPU demo) call. The loss is Megatron's per-token
loss: the sum over this rank's loss tokens and their count; Megatron's ``--calculate-per-token-loss`` then sums
both over the data and context parallel group, so uneven token counts per rank weigh every token once.

Each step records the planner's figures (computed ahead in a data-loader worker), the rank's plan view and how
long the step waited for the data loader, in :data:`STEP_STATS`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import torch

from megatron_fcp.megatron.batch import STATS, decode_rank_plan
from megatron_fcp.megatron.model import FcpPackedSeqParams
from megatron_fcp.planner.plan import RankPlan


@dataclass
class StepStats:
    """Per micro-batch records: data-loader wait (s), the sample's ``fcp_stats`` (see batch.STATS) and this rank's
    plan view (None where the micro-batch had none)."""

    loader_wait_s: list[float] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    rank_plans: list[RankPlan | None] = field(default_factory=list)

    def add(self, wait_s: float, stats, rank_plan: RankPlan | None = None) -> None:
        self.loader_wait_s.append(wait_s)
        self.samples.append({name: float(v) for name, v in zip(STATS, stats, strict=True)})
        self.rank_plans.append(rank_plan)

    def take(self) -> tuple[list[float], list[dict]]:
        """The records since the last call (and forget them, plan views included)."""
        out = (self.loader_wait_s, self.samples)
        self.loader_wait_s, self.samples, self.rank_plans = [], [], []
        return out

    def take_summary(self) -> dict:
        """The records since the last call (forgotten): their count, total data-loader wait and planning seconds,
        mean pairs imbalance, key/value traffic as a fraction of ring's and documents per micro-batch, and the
        plan views (``rank_plans``, one per micro-batch)."""
        rank_plans = self.rank_plans
        waits, samples = self.take()
        n = max(len(samples), 1)
        return {"micro_batches": len(samples), "loader_wait_s": float(sum(waits)),
                "plan_s": float(sum(s["plan_seconds"] for s in samples)),
                **{name: sum(s[name] for s in samples) / n for name in ("pairs_imbalance", "comm_vs_ring", "num_docs")},
                "rank_plans": rank_plans}


STEP_STATS = StepStats()


def get_fcp_batch(data_iterator, device: torch.device | str):
    """Next micro-batch for this rank: ``(tokens, labels, loss_mask, position_ids, packed_seq_params)``.

    Tensors are ``[1, num_tokens]`` on ``device`` in the plan's token order (padding last, loss mask 0).
    """
    start = time.perf_counter()
    sample = next(data_iterator)
    wait = time.perf_counter() - start
    plan_data = sample["fcp_plan"]
    if plan_data.dim() != 2 or plan_data.shape[0] != 1:
        raise ValueError(f"FCP needs micro-batch size 1 (one packed sequence per micro-batch), got a batch of "
                         f"{plan_data.shape[0]}; use --micro-batch-size 1")
    view = decode_rank_plan(plan_data[0])
    STEP_STATS.add(wait, sample["fcp_stats"][0].tolist(), view)
    tokens = sample["tokens"].to(device, non_blocking=True).long()
    labels = sample["labels"].to(device, non_blocking=True).long()
    loss_mask = sample["loss_mask"].to(device, non_blocking=True).float()
    max_position = int(sample["position_ids"].max()) if sample["position_ids"].numel() else 0  # on the host
    position_ids = sample["position_ids"].to(device, non_blocking=True).long()
    n = tokens.shape[1]
    cu = torch.tensor([0, n], dtype=torch.int32, device=device)
    params = FcpPackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=n,
                                max_seqlen_kv=n, rank_plan=view, fcp_position_ids=position_ids[0],
                                fcp_max_position=max_position)
    return tokens, labels, loss_mask, position_ids, params


def per_token_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron's per-token loss: ``(sum of masked token losses, number of loss tokens, report)``."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}


def fcp_forward_step(data_iterator, model, device: torch.device | str | None = None):
    """``forward_step_func`` for FCP: returns the per-token losses and the loss function to reduce them."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    tokens, labels, loss_mask, position_ids, params = get_fcp_batch(data_iterator, device)
    output = model(tokens, position_ids, None, labels=labels, loss_mask=loss_mask, packed_seq_params=params)
    return output, partial(per_token_loss, loss_mask)
