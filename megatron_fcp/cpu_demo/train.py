"""A real (tiny) megatron-core GPT pretraining run on CPU processes over gloo: FCP CP=N against no CP.

This is demo and test support code. It builds the model exactly as the training entry point does
(``GPTModelConfig`` -> ``fcp_model_config`` -> ``GPTModelBuilder``) and feeds it through the same data hooks and
forward step (``FcpBatchDataset`` -> ``fcp_forward_step``), but drives the step with a short loop instead of
``megatron.training.pretrain`` (which needs CUDA): per-token loss summed over the data and context parallel
group, gradients summed over it and divided by the token count (what ``--calculate-per-token-loss`` and
``finalize_model_grads`` do), Adam. The no-CP run is plain Megatron: its local core attention with a
document-causal mask and its own rotary embeddings.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_fcp.attention.reference import document_mask
from megatron_fcp.megatron.batch import STATS, FcpBatchDataset, MockDocumentDataset, doc_lengths_from_positions
from megatron_fcp.megatron.config import FcpConfig


@dataclass(frozen=True)
class RunConfig:
    """One training run. ``mode`` is ``fcp`` (FCP CP=cp) or ``nocp`` (one rank per DP replica, plain attention)."""

    mode: str = "fcp"
    cp: int = 4
    tp: int = 1
    dp: int = 1
    steps: int = 30
    seq_length: int = 2048
    doclens: str = "linux_files"
    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 256
    vocab_size: int = 256
    lr: float = 3e-3
    seed: int = 1234
    planning_workers: int = 0
    """Data-loader worker processes (0: plan in the training process; on 2 CPU cores, worker processes only add
    contention; the entry point plans in workers, ``--fcp-planning-workers``)."""
    scheduler: str = "fcp"
    save_dir: str | None = None
    save_after_step: int = 0
    load_dir: str | None = None
    first_step: int = 1
    grads_out: str | None = None
    """If set, rank 0 writes the step-1 gradients (full, gathered over TP) here with torch.save."""

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * (self.cp if self.mode == "fcp" else 1)


def fcp_config(run: RunConfig) -> FcpConfig:
    return FcpConfig(cp_size=run.cp if run.mode == "fcp" else 1, seq_length=run.seq_length,
                     scheduler=run.scheduler, backend="cpu", exchange_timeout_s=120.0)


def _model(run: RunConfig, pg_collection):
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.training.models.gpt import GPTModelBuilder, GPTModelConfig

    from megatron_fcp.megatron.model import fcp_model_config

    transformer = TransformerConfig(
        num_layers=run.num_layers, hidden_size=run.hidden_size, num_attention_heads=run.num_heads,
        num_query_groups=run.num_query_groups, ffn_hidden_size=run.ffn_hidden_size,
        tensor_model_parallel_size=run.tp, context_parallel_size=run.cp if run.mode == "fcp" else 1,
        hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, params_dtype=torch.float32, transformer_impl="local",
        apply_rope_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, calculate_per_token_loss=True)
    model_cfg = GPTModelConfig(transformer=transformer, vocab_size=run.vocab_size, seq_length=run.seq_length,
                               position_embedding_type="rope", share_embeddings_and_output_weights=True)
    if run.mode == "fcp":
        model_cfg = fcp_model_config(model_cfg, fcp_config(run))
    return GPTModelBuilder(model_cfg).build_model(pg_collection)


class _DenseBatches:
    """The no-CP inputs: whole samples with a document-causal mask (Megatron's ``True`` = masked out)."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        sample = self.inner[index]
        lens = doc_lengths_from_positions(sample["position_ids"])
        stats = {**dict.fromkeys(STATS, 0.0), "pairs_imbalance": 1.0, "num_docs": float(len(lens))}
        return {**sample, "attention_mask": ~document_mask(lens, "causal")[None],
                "fcp_stats": np.asarray([stats[name] for name in STATS], np.float64)}


def _loader(dataset, indices, workers: int):
    subset = torch.utils.data.Subset(dataset, list(indices))
    return iter(torch.utils.data.DataLoader(subset, batch_size=1, shuffle=False, num_workers=workers,
                                            persistent_workers=False, prefetch_factor=8 if workers else None))


def _gather_tp(param: torch.Tensor, grad: torch.Tensor, tp_group) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False) or dist.get_world_size(tp_group) == 1:
        return grad
    parts = [torch.empty_like(grad) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, grad.contiguous(), group=tp_group)
    return torch.cat(parts, dim=param.partition_dim)


def _worker(rank: int, run: RunConfig, port: int, out_path: str, quiet: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=run.world_size)
    try:
        _train(rank, run, out_path, quiet)
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _train(rank: int, run: RunConfig, out_path: str, quiet: bool) -> None:
    from megatron_fcp.cpu_demo.shims import install_cpu_shims

    install_cpu_shims()
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_fcp.megatron.step import STEP_STATS, fcp_forward_step, per_token_loss

    cp = run.cp if run.mode == "fcp" else 1
    ps.initialize_model_parallel(tensor_model_parallel_size=run.tp, context_parallel_size=cp)
    torch.manual_seed(run.seed)
    model_parallel_cuda_manual_seed(run.seed)
    model = _model(run, ProcessGroupCollection.use_mpu_process_groups())
    if run.load_dir:
        state = dist_checkpointing.load(model.sharded_state_dict(), run.load_dir)
        model.load_state_dict(state)
    optimizer = torch.optim.Adam(model.parameters(), lr=run.lr)
    if run.load_dir:
        optimizer.load_state_dict(torch.load(Path(run.load_dir) / "optimizer.pt", weights_only=False))
    dp_cp_group = ps.get_data_parallel_group(with_context_parallel=True)
    tp_group = ps.get_tensor_model_parallel_group()
    dp_rank, cp_rank = ps.get_data_parallel_rank(), ps.get_context_parallel_rank()
    micro_batches = run.dp // ps.get_data_parallel_world_size()  # no-CP baseline: one rank does every replica
    inner = MockDocumentDataset(run.steps * run.dp + run.first_step * run.dp, run.seq_length, run.doclens,
                                run.vocab_size, seed=run.seed)
    steps = range(run.first_step, run.first_step + run.steps)
    indices = [s * run.dp + dp_rank * micro_batches + m for s in steps for m in range(micro_batches)]
    if run.mode == "fcp":
        data = _loader(FcpBatchDataset(inner, fcp_config(run), cp_rank), indices, run.planning_workers)
    else:
        data = _loader(_DenseBatches(inner), indices, run.planning_workers)

    records = []
    for step in steps:
        start = time.perf_counter()
        totals = torch.zeros(2, dtype=torch.float64)
        for _ in range(micro_batches):
            if run.mode == "fcp":
                output, loss_fn = fcp_forward_step(data, model, device="cpu")
            else:
                wait_start = time.perf_counter()
                b = next(data)
                STEP_STATS.add(time.perf_counter() - wait_start, b["fcp_stats"][0].tolist())
                output = model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"],
                               loss_mask=b["loss_mask"])
                loss_fn = partial(per_token_loss, b["loss_mask"].float())
            loss, num_tokens, _ = loss_fn(output)
            loss.backward()
            totals += torch.stack([loss.detach().double(), num_tokens.double()])
        dist.all_reduce(totals, group=dp_cp_group)
        for param in model.parameters():
            if param.grad is None:
                continue
            dist.all_reduce(param.grad, group=dp_cp_group)
            param.grad /= totals[1].item()
        if step == run.first_step and run.grads_out:
            grads = {n: _gather_tp(p, p.grad, tp_group).clone() for n, p in model.named_parameters()}
            if rank == 0:
                torch.save(grads, run.grads_out)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s = time.perf_counter() - start
        s = STEP_STATS.take_summary()
        rec = {"step": step, "loss": (totals[0] / totals[1]).item(), "tokens": int(totals[1].item()),
               "step_s": step_s, "loader_wait_s": s["loader_wait_s"], "plan_s": s["plan_s"],
               "pairs_imbalance": s["pairs_imbalance"], "comm_vs_ring": s["comm_vs_ring"], "docs": s["num_docs"]}
        records.append(rec)
        if rank == 0 and not quiet:
            extra = (f" | plan {1e3 * rec['plan_s']:6.2f} ms  imbalance {rec['pairs_imbalance']:.3f}"
                     f"  kv comm {100 * rec['comm_vs_ring']:5.1f}% of ring" if run.mode == "fcp" else "")
            print(f"[{run.mode} cp={cp} tp={run.tp} dp={run.dp}] step {step:3d}  loss {rec['loss']:.6f}  "
                  f"step {1e3 * step_s:7.1f} ms  loader wait {1e3 * rec['loader_wait_s']:5.2f} ms "
                  f"({100 * rec['loader_wait_s'] / step_s:3.1f}%)"
                  f"  docs {rec['docs']:.0f}{extra}", flush=True)
        if run.save_dir and step == run.save_after_step:
            dist_checkpointing.save(model.sharded_state_dict(), run.save_dir)
            if rank == 0:
                torch.save(optimizer.state_dict(), Path(run.save_dir) / "optimizer.pt")
            dist.barrier()
    if rank == 0:
        Path(out_path).write_text(json.dumps({"run": asdict(run), "steps": records}))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run: RunConfig, out_path: str | Path, quiet: bool = False) -> dict:
    """Run ``run`` on ``run.world_size`` CPU processes (gloo) and return rank 0's records."""
    import torch.multiprocessing as mp

    if run.save_dir:
        Path(run.save_dir).mkdir(parents=True, exist_ok=True)
    out_path = str(out_path)
    mp.spawn(_worker, args=(run, _free_port(), out_path, quiet), nprocs=run.world_size, join=True)
    return json.loads(Path(out_path).read_text())


EQUIVALENCE_BASE = RunConfig(steps=20, seq_length=1024, doclens="magi_hist", planning_workers=0, lr=3e-3)
"""The run the FCP-vs-no-CP equivalence is measured on (tests and ``scripts/megatron_equivalence.py``)."""
EQUIVALENCE_LAYOUTS = {"cp2": dict(cp=2), "cp4": dict(cp=4), "tp2_cp2": dict(cp=2, tp=2), "dp2_cp2": dict(cp=2, dp=2),
                       "dp2_cp2_tp2": dict(cp=2, dp=2, tp=2)}
"""Parallel layouts of the equivalence runs, by name."""


def baseline_of(run: RunConfig) -> RunConfig:
    """The same run without context or tensor parallelism (one process per data-parallel replica)."""
    return replace(run, mode="nocp", cp=1, tp=1,
                   grads_out=run.grads_out and run.grads_out + ".nocp")
