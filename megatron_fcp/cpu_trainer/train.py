"""A real (tiny) megatron-core GPT pretraining run on CPU processes over gloo: FCP CP=N against no CP.

This is demo and test support code. It builds the model exactly as the training entry point does
(``GPTModelConfig`` -> ``fcp_model_config`` -> ``GPTModelBuilder``) and feeds it through the same data hooks and
forward step (``FcpBatchDataset`` -> ``fcp_forward_step``), but drives the step with a short loop instead of
``megatron.training.pretrain`` (which needs CUDA): per-token loss summed over the data and context parallel
group, gradients summed over it and divided by the token count (what ``--calculate-per-token-loss`` and
``finalize_model_grads`` do), Adam. The no-CP run is plain Megatron: its local core attention with a
document-causal mask and its own rotary embeddings.

FCP runs take the key/value budget of the staged exchange (``kv_budget_tokens``) and Megatron's activation
recompute (``recompute``: ``selective`` recomputes core attention, ``full`` whole layers), and rank 0 measures the
exchange's buffers over each step (:class:`AttentionMemory`) next to the planner's model of them
(:func:`modeled_memory`).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_fcp.errors import InputError
from megatron_fcp.megatron.batch import STATS, FcpBatchDataset, MockDocumentDataset, doc_lengths_from_positions
from megatron_fcp.megatron.config import (
    HEAD_SPLITTING,
    SETTINGS,
    FcpConfig,
    node_exchange_problem,
    ranks_per_node_problem,
    resolve_ranks_per_node,
)
from megatron_fcp.paths import folder_write_problem
from megatron_fcp.planner.plan import RankPlan
from megatron_fcp.planner.stages import DEFAULT_KV_BUDGET, parse_kv_budget
from megatron_fcp.testing.reference import document_mask

RECOMPUTE = ("none", "selective", "full")
"""Activation recompute choices: none; ``selective`` (Megatron's ``recompute_granularity="selective"`` with its
default ``recompute_modules=["core_attn"]``: core attention, FCP's, is recomputed in backward); ``full``
(``recompute_granularity="full"``, ``recompute_method="uniform"``, ``recompute_num_layers=1``: every layer)."""


MODES = ("fcp", "nocp")
"""Run modes: ``fcp`` (FCP context parallelism over ``cp`` ranks) or ``nocp`` (one rank per DP replica, plain
attention with a document mask: the reference FCP is compared with)."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One training run of the tiny GPT on gloo CPU processes. Validated on creation (one :class:`InputError`
    line naming the field)."""

    mode: str = "fcp"
    """One of :data:`MODES`."""
    cp: int = 4
    """Context-parallel size (``fcp`` mode; ``nocp`` runs use 1)."""
    tp: int = 1
    """Tensor-parallel size."""
    dp: int = 1
    """Data-parallel size."""
    steps: int = 30
    """Optimizer steps to train, counted from ``first_step``."""
    seq_length: int = 2048
    """Tokens of one packed micro-batch over the CP group; a multiple of ``cp``."""
    doclens: str = "linux_files"
    """Document lengths of the mock data: a shipped distribution name or a lengths file."""
    num_layers: int = 2
    """Transformer layers of the tiny GPT."""
    hidden_size: int = 64
    """Model width."""
    num_heads: int = 4
    """Attention heads; a multiple of ``num_query_groups`` and of ``tp``."""
    num_query_groups: int = 2
    """Key/value heads (grouped-query attention); a multiple of ``tp``."""
    ffn_hidden_size: int = 256
    """MLP width."""
    vocab_size: int = 256
    """Vocabulary of the mock data and the model."""
    lr: float = 3e-3
    """Adam learning rate."""
    seed: int = 1234
    """Seed of the model initialisation and the mock data."""
    planning_workers: int = 0
    """Data-loader worker processes (0: plan in the training process; on 2 CPU cores, worker processes only add
    contention; the entry point plans in workers, ``--fcp-planning-workers``)."""
    scheduler: str = SETTINGS["scheduler"].default
    """Block placement of the FCP run: fcp, ring, hybrid or magi (see ``--fcp-scheduler``)."""
    save_dir: str | None = None
    """If set, a checkpoint is saved here after step ``save_after_step``."""
    save_after_step: int = 0
    """The step after which the checkpoint is saved into ``save_dir`` itself (0: none)."""
    save_interval: int = 0
    """If > 0 (with ``save_dir``): save every this many steps into ``save_dir/step_NNNNNN`` and record it in
    ``save_dir/latest_step.txt`` (what :func:`latest_checkpoint` reads to resume), and on SIGTERM after the step
    in progress."""
    load_dir: str | None = None
    """If set, the run starts from the checkpoint saved here."""
    first_step: int = 1
    """Number of the first step (after loading a checkpoint saved after step ``first_step - 1``)."""
    grads_out: str | None = None
    """If set, rank 0 writes the step-1 gradients (full, gathered over TP) here with torch.save."""
    kv_budget_tokens: int | str | None = DEFAULT_KV_BUDGET
    """Key/value tokens per stage of FCP's exchange (``auto``: the rank's own tokens; None: one stage)."""
    recompute: str = "none"
    """Activation recompute: one of :data:`RECOMPUTE`."""
    records: str | None = None
    """If set, rank 0 appends one JSON line per step to this file (kept across resumed attempts)."""
    tensorboard_dir: str | None = None
    """If set, rank 0 writes the loss and FCP's per-step figures (``megatron_fcp.megatron.step.FIGURES``, the names
    Megatron's log line and TensorBoard use) as TensorBoard scalars here."""
    ranks_per_node: int | None = None
    """Processes per node (``--fcp-ranks-per-node``; the worker's ``--ranks-per-node``), which place the CP ranks on
    nodes in every plan (``Plan.cp_node``): 4 processes at 2 per node emulate 2 nodes x 2 on one machine. None:
    ``LOCAL_WORLD_SIZE`` of the environment (torchrun sets it), else no layout (one node). FCP runs only."""
    node_exchange: str = SETTINGS["node_exchange"].default
    """How key/values reach the CP ranks of a node (``--fcp-node-exchange``; the worker's ``--node-exchange``):
    ``p2p``, ``heads`` (heads split inside each node of ``ranks_per_node``) or ``auto`` (per micro-batch the one the
    cost model finds faster); FCP runs only."""
    collective_timeout_s: float = 300.0
    """Seconds any collective of the run may wait for its peers (the process groups' timeout: start-up rendezvous,
    the loss and gradient all-reduces, barriers, checkpoint saves and loads, the SIGTERM agreement; FCP's key/value
    exchange waits at most 0.9 x this long). A peer that stops ends the run after this long with one
    :class:`CollectiveFailure` line naming the step and what was waited for."""

    def __post_init__(self):
        object.__setattr__(self, "kv_budget_tokens", parse_kv_budget(self.kv_budget_tokens, flag="kv_budget_tokens"))
        object.__setattr__(self, "ranks_per_node",
                           SETTINGS["ranks_per_node"].read(self.ranks_per_node, "RunConfig: ranks_per_node"))
        object.__setattr__(self, "node_exchange",
                           SETTINGS["node_exchange"].read(self.node_exchange, "RunConfig: node_exchange"))
        problem = self._problem()
        if problem:
            raise InputError(f"RunConfig: {problem}")

    def _problem(self) -> str | None:
        counts = ("cp", "tp", "dp", "steps", "seq_length", "num_layers", "hidden_size", "num_heads",
                  "num_query_groups", "ffn_hidden_size", "first_step")
        for name in counts:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                return f"{name} must be a whole number >= 1, got {value!r}"
        for name, allowed in (("mode", MODES), ("recompute", RECOMPUTE)):
            if getattr(self, name) not in allowed:
                return f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
        timeout = self.collective_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < float("inf"):
            return f"collective_timeout_s must be > 0 seconds and finite, got {timeout!r}"
        if self.vocab_size < 2 or self.planning_workers < 0 or min(self.save_after_step, self.save_interval) < 0:
            return (f"vocab_size must be >= 2, planning_workers, save_after_step and save_interval >= 0; got "
                    f"{self.vocab_size}, {self.planning_workers}, {self.save_after_step}, {self.save_interval}")
        if self.num_heads % self.num_query_groups or self.num_heads % self.tp or self.num_query_groups % self.tp:
            return (f"num_heads {self.num_heads} must be a multiple of num_query_groups {self.num_query_groups}, and "
                    f"both of tp {self.tp}")
        if self.mode == "fcp" and self.seq_length % self.cp:
            return f"seq_length {self.seq_length} is not a multiple of cp {self.cp}"
        if self.mode == "fcp":
            return ranks_per_node_problem(self.world_size, self.tp, self.cp, self.ranks_per_node, "ranks_per_node",
                                          "processes (dp x tp x cp)") or node_exchange_problem(
                self.node_exchange, self.num_heads, self.num_query_groups, self.tp, self.cp, self.ranks_per_node)
        return None

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * (self.cp if self.mode == "fcp" else 1)


EXCHANGE_TIMEOUT_S = 120.0
"""The longest FCP's key/value exchange waits for a CP peer in the CPU trainer; at most 0.9 x the run's
``collective_timeout_s``, so the exchange's own error (naming the silent peer) comes before gloo's."""


def fcp_config(run: RunConfig, cp_global_ranks=None) -> FcpConfig:
    """FCP's settings of ``run``; with ``cp_global_ranks`` (the CP group's, by CP rank) the node of each CP rank too
    (``FcpConfig.with_nodes``: ``run.ranks_per_node``, else LOCAL_WORLD_SIZE, else no layout)."""
    cfg = FcpConfig(cp=run.cp if run.mode == "fcp" else 1, seq_length=run.seq_length,
                    scheduler=run.scheduler, backend="cpu",
                    exchange_timeout_s=min(EXCHANGE_TIMEOUT_S, 0.9 * run.collective_timeout_s),
                    kv_budget_tokens=run.kv_budget_tokens, ranks_per_node=run.ranks_per_node,
                    node_exchange=run.node_exchange,
                    attention_shape=(run.num_heads // run.tp, run.num_query_groups // run.tp,
                                     run.hidden_size // run.num_heads))
    return cfg if cp_global_ranks is None or run.mode != "fcp" else cfg.with_nodes(cp_global_ranks)


def check_nodes(run: RunConfig, environ=None) -> None:
    """The node layout ``run`` will plan with, checked before any process starts training: ``run.ranks_per_node``
    (checked with the run), else ``LOCAL_WORLD_SIZE`` of ``environ`` (default: this process's environment) must
    divide the processes and give every node the same number of CP ranks. :class:`InputError`, one line."""
    if run.mode != "fcp":
        return
    per_node, source = resolve_ranks_per_node(run.ranks_per_node, "ranks_per_node", environ)
    problem = ranks_per_node_problem(run.world_size, run.tp, run.cp, per_node, source, "processes (dp x tp x cp)")
    if problem:
        raise InputError(f"{problem}; pass ranks_per_node (the worker's --ranks-per-node) to set it")


def recompute_settings(recompute: str) -> dict:
    """The TransformerConfig fields of a :data:`RECOMPUTE` choice."""
    if recompute == "none":
        return {}
    if recompute == "selective":
        return {"recompute_granularity": "selective"}
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    raise InputError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {recompute!r}")


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
        gradient_accumulation_fusion=False, calculate_per_token_loss=True, **recompute_settings(run.recompute))
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


# -- attention memory: measured and modeled ------------------------------------------------------------------
MEMORY_FIGURES = ("kv_peak", "kv_kept", "grad_peak", "returned_peak", "kv_kept_all_layers", "kv_held_all_layers")
"""Bytes, per step on one rank. Per attention layer: ``kv_peak`` received key/values alive at once (forward or
backward), ``kv_kept`` of them kept from the layer's forward (with recompute: its recomputed forward) to its
backward, ``grad_peak`` gradients of received key/values alive at once, ``returned_peak`` gradients of own
key/values coming back alive at once. Over all layers: ``kv_kept_all_layers`` received key/values alive when the
model's forward has ended (kept for backward by every layer; 0 with recompute), ``kv_held_all_layers`` the most
received key/values alive at any time (the layer at work plus what the others keep)."""


class AttentionMemory:
    """Measures the staged exchange's buffers on this rank with the exchange's own
    :class:`~megatron_fcp.attention.exchange.MemoryMeter`, per attention layer.

    Hooks on the FCP core attention modules open a window when a layer's forward starts and when its backward starts
    (the gradient of its output arrives) and close it when the forward ends and when its backward ends (the
    gradient of its query is complete); inside a window only that layer creates buffers, so its figures are the
    window's peaks less the received key/values other layers keep meanwhile. Recompute runs a layer's forward again
    inside backward; the hooks see it like any other forward. Figures: :data:`MEMORY_FIGURES`.
    """

    def __init__(self, meter, modules):
        self.meter = meter
        self._calls = {}  # module -> its forward now running
        self.handles = [h for module in modules for h in (module.register_forward_pre_hook(self._forward_starts),
                                                          module.register_forward_hook(self._forward_ends))]
        self.start_step()

    def start_step(self) -> None:
        """Forget the figures and start measuring from what is alive now."""
        self.meter.reset_peak()
        self.figures = dict.fromkeys(MEMORY_FIGURES, 0)

    def forward_done(self) -> None:
        """Call when the model's forward of a micro-batch has ended, before its backward."""
        self._max("kv_kept_all_layers", self.meter.current("kv"))

    def _max(self, name: str, value: int) -> None:
        self.figures[name] = max(self.figures[name], int(value))

    def _open(self, other_kv: int) -> dict:
        self.meter.reset_peak()
        return {"other_kv": other_kv}

    def _close(self, window: dict | None) -> None:
        if window is None:
            return
        peak = self.meter.peak
        self._max("kv_held_all_layers", peak.get("kv", 0))
        self._max("kv_peak", peak.get("kv", 0) - window["other_kv"])
        self._max("grad_peak", peak.get("grad", 0))
        self._max("returned_peak", peak.get("returned", 0))

    def _forward_starts(self, module, args) -> None:
        call = self._calls[module] = {"forward": self._open(self.meter.current("kv"))}
        query = args[0]
        if torch.is_grad_enabled() and query.requires_grad:  # its gradient is complete once the layer's backward is
            query.register_hook(lambda grad: self._close(call.get("backward")))

    def _forward_ends(self, module, args, output) -> None:
        call = self._calls.pop(module)
        self._close(call["forward"])
        if torch.is_grad_enabled() and output.requires_grad:  # kept for backward (without grad: nothing is)
            kept = self.meter.current("kv") - call["forward"]["other_kv"]
            self._max("kv_kept", kept)

            def backward_starts(grad):
                call["backward"] = self._open(self.meter.current("kv") - kept)

            output.register_hook(backward_starts)


def modeled_memory(view: RankPlan, budget, bytes_per_token: int, num_layers: int, recompute: str) -> dict:
    """The planner's model (:meth:`RankPlan.memory`) of :data:`MEMORY_FIGURES` for one rank and micro-batch, in
    bytes, plus ``num_stages``. Every layer has the same plan and budget; without recompute every layer keeps its
    last stage until its backward, so the layer at work holds its own stages on top of what the others keep."""
    mem = view.memory(budget)
    kept_all = 0 if recompute != "none" else num_layers * mem["saved_remote_kv_tokens"]
    held_all = mem["peak_remote_kv_tokens"] + (0 if recompute != "none"
                                               else (num_layers - 1) * mem["saved_remote_kv_tokens"])
    tokens = {"kv_peak": mem["peak_remote_kv_tokens"], "kv_kept": mem["saved_remote_kv_tokens"],
              "grad_peak": mem["peak_grad_tokens"], "returned_peak": mem["peak_returned_grad_tokens"],
              "kv_kept_all_layers": kept_all, "kv_held_all_layers": held_all}
    return {**{k: v * bytes_per_token for k, v in tokens.items()}, "num_stages": mem["num_stages"]}


def kv_bytes_per_token(run: RunConfig) -> int:
    """Bytes of one token's key and value on one TP rank (fp32)."""
    return 2 * (run.num_query_groups // run.tp) * (run.hidden_size // run.num_heads) * 4


def own_kv_bytes(run: RunConfig) -> int:
    """A rank's own key/values in one layer (the unit the memory figures are given in)."""
    return run.seq_length // run.cp * kv_bytes_per_token(run)


LATEST = "latest_step.txt"
"""The file in a checkpoint folder naming the step of its latest complete checkpoint (written atomically, after the
checkpoint's :data:`MANIFEST`)."""
MANIFEST = "checksums.sha256"
"""The file in a saved checkpoint listing the sha256 of every other file of it (``sha256sum`` format, checkable
with ``sha256sum -c``); written by rank 0 once every rank has saved, checked before the checkpoint is loaded."""
_STEP_FOLDER = re.compile(r"step_(\d{6,})")


class CheckpointError(InputError):
    """A checkpoint that cannot be used (a file differs from its checksum, no intact checkpoint is left, ...)."""


class CollectiveFailure(RuntimeError):
    """A collective of the CPU trainer failed or timed out: the message names the step, what was waited for (the
    collective or the checkpoint save) and the ranks it waited on."""


def checkpoint_folder(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_manifest(folder: str | Path) -> None:
    """Record the sha256 of every file of the checkpoint in ``folder`` (dist_checkpointing writes no subfolders) in
    its :data:`MANIFEST` (atomically)."""
    folder = Path(folder)
    # not: the manifest, the marker (a checkpoint saved into the root itself) or their temporary files
    ours = (MANIFEST, f".{MANIFEST}.", LATEST, f".{LATEST}.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(ours))
    _write_atomically(folder / MANIFEST, "".join(f"{_sha256(p)}  {p.relative_to(folder).as_posix()}\n"
                                                 for p in files))


def checkpoint_problem(folder: str | Path, require_manifest: bool = True) -> str | None:
    """Why the checkpoint in ``folder`` cannot be loaded (a missing folder or file, a file that differs from its
    checksum in :data:`MANIFEST`), or None if it is intact. Without a manifest (a checkpoint of an older version, or
    a save that did not finish): a problem if ``require_manifest``, else not checked."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} does not exist"
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"{folder} has no {MANIFEST} (its save did not finish)" if require_manifest else None
    try:
        lines = manifest.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        return f"{manifest} cannot be read: {err}"
    for line in lines:
        want, sep, name = line.partition("  ")
        if not sep or not re.fullmatch(r"[0-9a-f]{64}", want):
            return f"{manifest} is damaged (line {line[:60]!r})"
        path = folder / name
        if not path.is_file():
            return f"{path} is missing (listed in {MANIFEST})"
        if _sha256(path) != want:
            return f"{path} does not match its sha256 in {MANIFEST}: the checkpoint is damaged"
    return None


def verify_checkpoint(folder: str | Path) -> None:
    """Raise :class:`CheckpointError` (one line naming the file) if the checkpoint in ``folder`` is damaged; one
    without a :data:`MANIFEST` (an older version's) is taken as it is."""
    problem = checkpoint_problem(folder, require_manifest=False)
    if problem:
        raise CheckpointError(f"cannot load checkpoint: {problem}")


def _warn(message: str) -> None:
    print(f"megatron-fcp: warning: {message}", file=sys.stderr, flush=True)


def latest_checkpoint(root: str | Path, warn=_warn) -> tuple[int, Path] | None:
    """``(step, folder)`` of the latest intact checkpoint under ``root``, or None if there is none (a fresh start).

    ``LATEST`` names it; its files are checked against their checksums (:data:`MANIFEST`). If the marker cannot be
    read or names a missing or damaged checkpoint, the previous intact ``step_NNNNNN`` folder (one with a manifest
    whose files match) is taken, and ``warn`` gets one line naming both. :class:`CheckpointError` if checkpoints
    were saved but none is intact."""
    root = Path(root)
    tracker = root / LATEST
    saved = sorted((int(m[1]), p) for p in root.glob("step_*")
                   if p.is_dir() and (m := _STEP_FOLDER.fullmatch(p.name)))
    if not tracker.exists():
        if not saved:
            return None
        problem, below = f"{tracker} is missing", None
    else:
        try:
            text = tracker.read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            text, problem = None, f"{tracker} cannot be read ({err})"
        if text is not None and not text.isdigit():
            problem = f"{tracker} holds {text[:40]!r}, not a step number" if text else f"{tracker} is empty"
        below = None
        if text is not None and text.isdigit():
            below = int(text)
            # the checkpoint the marker names; one without a manifest is an older version's, taken unverified
            problem = checkpoint_problem(checkpoint_folder(root, below), require_manifest=False)
            if problem is None:
                return below, checkpoint_folder(root, below)
            problem = f"{tracker} names step {below}, but {problem}"
    skipped = []
    for step, folder in reversed(saved):
        if below is not None and step >= below:
            continue
        reason = checkpoint_problem(folder)
        if reason is None:
            warn(f"{problem}; resuming from the previous intact checkpoint {folder} instead")
            return step, folder
        skipped.append(reason)
    raise CheckpointError(f"no intact checkpoint in {root} to resume from: {problem}"
                          + "".join(f"; {r}" for r in skipped)
                          + " (remove the folder's contents to start from step 1)")


def check_paths(run: RunConfig, rank: int = 0) -> None:
    """Start-up checks of the run's files (before any training): the checkpoint folder can be created and written,
    the loaded checkpoint is intact, and (on rank 0) the records file can be appended to. :class:`InputError`, one
    line naming the path."""
    if run.save_dir:
        folder = Path(run.save_dir)
        err = folder_write_problem(folder)
        if err is not None:
            raise InputError(f"save_dir {folder}: cannot write checkpoints there ({err.strerror or err})")
    if run.load_dir:
        verify_checkpoint(run.load_dir)
    if run.records and rank == 0:
        records = Path(run.records)
        try:
            if not records.parent.is_dir():
                raise FileNotFoundError(f"its folder {records.parent} does not exist")
            if records.exists():
                with open(records, "a"):
                    pass
            elif (problem := folder_write_problem(records.parent, make=False)) is not None:
                raise problem
        except OSError as err:
            raise InputError(f"records {records}: cannot append records there ({err.strerror or err})") from None


class _StopRequest:
    """Set by SIGTERM (Slurm's --signal, preemption, scontrol requeue): save after the step, then stop."""

    def __init__(self):
        self.requested = False

    def install(self) -> None:
        import signal

        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.requested = True


def _timeout(run: RunConfig) -> datetime.timedelta:
    return datetime.timedelta(seconds=run.collective_timeout_s)


def _gloo_reason(err: BaseException) -> str:
    """The first line of a torch/gloo error, without gloo's source location."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h|py):\d+\]\s*", "", text)
    text = text.split(" This is typically caused", 1)[0]
    return text[:300]


@contextlib.contextmanager
def _waiting(what: str, step: int | None, run: RunConfig, group=None):
    """Turn a failure or timeout of the collectives inside into one :class:`CollectiveFailure` line naming the step,
    ``what`` was waited for and the peers of ``group`` (default: every rank)."""
    start = time.monotonic()
    try:
        yield
    except CollectiveFailure:
        raise
    except BaseException as err:  # gloo: RuntimeError; a save: also OSError, torch's CheckpointException
        if not isinstance(err, Exception) and type(err).__name__ != "CheckpointException":
            raise
        raise CollectiveFailure(_failure_line(what, step, run, group, err, time.monotonic() - start)) from err


def _failure_line(what: str, step: int | None, run: RunConfig, group, err: BaseException, waited: float) -> str:
    rank = dist.get_rank() if dist.is_initialized() else None
    try:
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    except (RuntimeError, ValueError):
        ranks = []
    peers = [r for r in ranks if r != rank]
    on = f"rank {rank}: " if rank is not None else ""
    at = f"step {step}: " if step is not None else "start-up: "
    peer = f" waiting for rank{'s' if len(peers) > 1 else ''} {', '.join(map(str, peers))}" if peers else ""
    timed_out = "timed out" if waited >= 0.9 * run.collective_timeout_s else "failed"
    return (f"{on}{at}{what} {timed_out} after {waited:.1f} s{peer} (collective timeout "
            f"{run.collective_timeout_s:g} s): {_gloo_reason(err)}")


def train_in_group(run: RunConfig, quiet: bool = False) -> None:
    """Train ``run`` in a process of an already launched job (torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT):
    gloo, records to ``run.records``; saves on SIGTERM when ``run.save_interval`` is set. Every collective waits at
    most ``run.collective_timeout_s`` (:class:`CollectiveFailure` otherwise)."""
    torch.set_num_threads(1)
    with _waiting("process group start-up (rendezvous of every rank)", None, run):
        dist.init_process_group("gloo", timeout=_timeout(run))
    if run.save_dir:  # before the SIGTERM handler: the checkpoint writer's helper must outlive Slurm's SIGTERM
        from megatron_fcp.megatron.signals import start_checkpoint_results_queue

        start_checkpoint_results_queue()
    stop = _StopRequest()
    stop.install()
    try:
        _train(dist.get_rank(), run, None, quiet, stop)
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def quiet_third_party_notices() -> None:
    """Silence what megatron-core and torch tell every process of a CPU run (no Apex, no Transformer Engine, no
    CUDA runtime, deprecation notices): each spawned process would print the same dozen lines again. FCP's own
    warnings and every error are kept."""
    warnings.filterwarnings("ignore", module=r"megatron(\.|$)")
    for name in ("megatron", "torch.utils.cpp_extension"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _worker(rank: int, runs: list[RunConfig], port: int, out_paths: list[str], quiet: bool) -> None:
    quiet_third_party_notices()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with _waiting("process group start-up (rendezvous of every rank)", None, runs[0]):
        dist.init_process_group("gloo", rank=rank, world_size=runs[0].world_size, timeout=_timeout(runs[0]))
    try:
        for run, out_path in zip(runs, out_paths, strict=True):
            try:
                _train(rank, run, out_path, quiet)
            finally:
                from megatron.core import parallel_state

                parallel_state.destroy_model_parallel()
    finally:
        dist.destroy_process_group()


def _save(model, optimizer, folder: Path, rank: int, run: RunConfig, step: int) -> None:
    """Save the model (dist_checkpointing, every rank) and the optimizer (rank 0) into ``folder``, then rank 0 writes
    its :data:`MANIFEST`; every wait bounded by ``run.collective_timeout_s``."""
    from megatron.core import dist_checkpointing

    with _waiting(f"checkpoint save into {folder}", step, run):
        folder.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), str(folder))
        if rank == 0:
            torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    with _waiting(f"barrier after the checkpoint save into {folder}", step, run):
        dist.barrier()
    if rank == 0:  # once every rank's files are complete
        write_manifest(folder)


def _train(rank: int, run: RunConfig, out_path: str | None, quiet: bool, stop: _StopRequest | None = None) -> None:
    from megatron_fcp.cpu_trainer.shims import install_cpu_shims

    install_cpu_shims()
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_fcp.attention.head_parallel import make_head_parallel_groups
    from megatron_fcp.megatron.model import FcpCoreAttention
    from megatron_fcp.megatron.step import FcpStep, per_token_loss

    cp = run.cp if run.mode == "fcp" else 1
    with _waiting("Megatron's process groups start-up", None, run):
        ps.initialize_model_parallel(tensor_model_parallel_size=run.tp, context_parallel_size=cp,
                                     distributed_timeout_minutes=run.collective_timeout_s / 60)
    torch.manual_seed(run.seed)
    model_parallel_cuda_manual_seed(run.seed)
    model = _model(run, ProcessGroupCollection.use_mpu_process_groups())
    if run.load_dir:
        with _waiting(f"checkpoint load from {run.load_dir}", None, run):
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
    fcp_step = None
    if run.mode == "fcp":  # the plans carry the node of each CP rank (checked by the plan agreement's digest)
        cfg = fcp_config(run, ps.get_context_parallel_global_ranks())
        data = _loader(FcpBatchDataset(inner, cfg, cp_rank, with_plan_view=cp > 1), indices, run.planning_workers)
        cp_group = ps.get_context_parallel_group() if cp > 1 else None  # gloo: also the plan check's host group
        if cp_group is not None and cfg.node_exchange in HEAD_SPLITTING:
            make_head_parallel_groups(cp_group, cfg.heads_per_node)
        fcp_step = FcpStep(cfg, cp_group, cp_group, device="cpu", keep_records=True)
    else:
        data = _loader(_DenseBatches(inner), indices, run.planning_workers)
    memory = None
    if cp > 1 and fcp_step.exchanges:  # the exchanges FcpCoreAttention uses (FcpStep picks the groups; one meter)
        memory = AttentionMemory(fcp_step.exchanges[0].memory,
                                 [m for m in model.modules() if isinstance(m, FcpCoreAttention)])

    records, writer = [], _tensorboard(run) if rank == 0 else None
    for step in steps:
        start = time.perf_counter()
        totals = torch.zeros(2, dtype=torch.float64)
        if memory is not None:
            memory.start_step()
        dense_samples = []
        for _ in range(micro_batches):
            if run.mode == "fcp":
                output, loss_fn = fcp_step(data, model)
                if memory is not None:
                    memory.forward_done()
            else:
                wait_start = time.perf_counter()
                b = next(data)
                dense_samples.append({**dict(zip(STATS, b["fcp_stats"][0].tolist(), strict=True)),
                                      "fcp loader wait ms": 1e3 * (time.perf_counter() - wait_start)})
                output = model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"],
                               loss_mask=b["loss_mask"])
                loss_fn = partial(per_token_loss, b["loss_mask"].float())
            loss, num_tokens, _ = loss_fn(output)
            loss.backward()
            totals += torch.stack([loss.detach().double(), num_tokens.double()])
        with _waiting("all-reduce of the loss", step, run, dp_cp_group):
            dist.all_reduce(totals, group=dp_cp_group)
        with _waiting("all-reduce of the gradients", step, run, dp_cp_group):
            for param in model.parameters():
                if param.grad is None:
                    continue
                dist.all_reduce(param.grad, group=dp_cp_group)
                param.grad /= totals[1].item()
        if step == run.first_step and run.grads_out:
            with _waiting("all-gather of the gradients over TP", step, run, tp_group):
                grads = {n: _gather_tp(p, p.grad, tp_group).clone() for n, p in model.named_parameters()}
            if rank == 0:
                torch.save(grads, run.grads_out)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s = time.perf_counter() - start
        samples = fcp_step.take() if fcp_step is not None else dense_samples
        rec = {"step": step, "loss": (totals[0] / totals[1]).item(), "tokens": int(totals[1].item()),
               "step_s": step_s, **step_summary(samples)}
        if writer is not None:
            _write_scalars(writer, rec, step)
        if memory is not None:
            # heads: the plan view is the node's, g x the tokens on 1/g of the heads (the same bytes per rank)
            models = [modeled_memory(s["rank_plan"], run.kv_budget_tokens,
                                     kv_bytes_per_token(run) // cfg.heads_split(s["rank_plan"].cp), run.num_layers,
                                     run.recompute) for s in samples]
            rec["memory"] = dict(memory.figures)
            rec["memory_model"] = {k: max(m[k] for m in models) for k in models[0]}
            rec["own_kv_bytes"] = own_kv_bytes(run)
        if run.mode == "fcp":  # the node layout the step's plans carried (their shipped views, at CP > 1)
            nodes = [s["rank_plan"].cp_node for s in samples if s.get("rank_plan") is not None]
            rec["cp_node"] = list(nodes[0]) if nodes and nodes[0] is not None else None
        records.append(rec)
        if rank == 0 and not quiet:
            extra = f" | {figures_line(rec['fcp'])}" if run.mode == "fcp" else ""
            if memory is not None:
                extra += " | " + memory_line(rec)
            print(f"[{run.mode} cp={cp} tp={run.tp} dp={run.dp}] step {step:3d}  loss {rec['loss']:.6f}  "
                  f"step {1e3 * step_s:7.1f} ms  loader wait {1e3 * rec['loader_wait_s']:5.2f} ms "
                  f"({100 * rec['loader_wait_s'] / step_s:3.1f}%)"
                  f"  docs {rec['docs']:.0f}{extra}", flush=True)
        if rank == 0 and run.records:
            with open(run.records, "a") as f:
                f.write(json.dumps({"mode": run.mode, "scheduler": run.scheduler, "cp": cp, **rec}) + "\n")
        if stop is not None:
            with _waiting("agreement on stopping (SIGTERM)", step, run):
                stopping = _agree(stop.requested)
        else:
            stopping = False
        if run.save_dir and step == run.save_after_step:
            _save(model, optimizer, Path(run.save_dir), rank, run, step)
        if run.save_dir and run.save_interval and (step % run.save_interval == 0 or stopping):
            _save(model, optimizer, checkpoint_folder(run.save_dir, step), rank, run, step)
            if rank == 0:  # after the checkpoint and its checksums: the marker never names a partial save
                _write_atomically(Path(run.save_dir) / LATEST, f"{step}\n")
            with _waiting(f"barrier after recording {LATEST}", step, run):
                dist.barrier()
        if stopping:
            if rank == 0:
                print(f"stopping after step {step} on SIGTERM (checkpoint saved: {bool(run.save_interval)})",
                      flush=True)
            break
    if writer is not None:
        writer.close()
    if rank == 0 and out_path:
        Path(out_path).write_text(json.dumps({"run": asdict(run), "steps": records}))


def step_summary(samples: list[dict]) -> dict:
    """A step's figures from its micro-batches' records: data-loader wait and planning seconds (sums), mean pairs
    imbalance, key/value traffic over ring's and documents, and ``fcp``: the mean of each of
    ``megatron_fcp.megatron.step.FIGURES`` per micro-batch, as Megatron's log line averages them (FCP runs)."""
    from megatron_fcp.megatron.step import FIGURES

    n = max(len(samples), 1)
    out = {"loader_wait_s": sum(s["fcp loader wait ms"] for s in samples) / 1e3,
           "plan_s": sum(s["plan_seconds"] for s in samples),
           **{key: sum(s[name] for s in samples) / n
              for key, name in (("pairs_imbalance", "pairs_imbalance"), ("comm_vs_ring", "comm_vs_ring"),
                                ("docs", "num_docs"))}}
    if samples and all(name in samples[0] for name in FIGURES):
        out["fcp"] = {name: sum(s[name] for s in samples) / n for name in FIGURES}
    return out


def figures_line(figures: dict) -> str:
    """FCP's per-micro-batch figures for the step's log line (the loader wait is on the line already)."""
    return (f"fcp imbalance {figures['fcp planned imbalance']:.3f}  kv sent {figures['fcp kv sent MiB']:.3f} MiB"
            f"  received {figures['fcp kv received MiB']:.3f} MiB  exchange wait "
            f"{figures['fcp exchange wait ms']:.2f} ms  planning {figures['fcp planning ms']:.2f} ms (in the loader)")


def _tensorboard(run: RunConfig):
    """A TensorBoard writer on ``run.tensorboard_dir`` (None without one)."""
    if not run.tensorboard_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=run.tensorboard_dir)


def _write_scalars(writer, rec: dict, step: int) -> None:
    """The step's loss and FCP figures as TensorBoard scalars, under the names Megatron's training log uses."""
    writer.add_scalar("lm loss", rec["loss"], step)
    for name, value in rec.get("fcp", {}).items():
        writer.add_scalar(name, value, step)
    writer.flush()


def _agree(flag: bool) -> bool:
    """Whether any rank has ``flag`` set (all ranks must stop after the same step)."""
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _kib_own(value: int, own: int) -> str:
    return f"{value / 1024:.1f} KiB {value / own:.2f}x"


def memory_line(rec: dict) -> str:
    """The step line's attention memory: measured per layer (KiB and multiples of the rank's own key/values of a
    layer), the model's figures where they differ, and what every layer together keeps for backward."""
    got, want, own = rec["memory"], rec["memory_model"], rec["own_kv_bytes"]
    parts = []
    for name, label in (("kv_peak", "remote kv peak"), ("kv_kept", "kept"), ("grad_peak", "kv grads"),
                        ("returned_peak", "returned")):
        parts.append(f"{label} {_kib_own(got[name], own)}"
                     + ("" if got[name] == want[name] else f" (model {want[name] / own:.2f}x)"))
    all_kept = got["kv_kept_all_layers"]
    return (f"per layer: {', '.join(parts)}, stages {want['num_stages']}; all layers kept {all_kept / 1024:.1f} KiB"
            + ("" if all_kept == want["kv_kept_all_layers"] else
               f" (model {want['kv_kept_all_layers'] / 1024:.1f} KiB)"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run: RunConfig, out_path: str | Path, quiet: bool = False) -> dict:
    """Run ``run`` on ``run.world_size`` CPU processes (gloo) and return rank 0's records."""
    return launch_series([run], [out_path], quiet)[0]


def launch_series(runs: list[RunConfig], out_paths: list[str | Path], quiet: bool = False) -> list[dict]:
    """Run ``runs`` one after another in the same ``world_size`` CPU processes (gloo), each from a fresh model
    and fresh Megatron process groups, and return rank 0's records of each. Saves the processes' start-up (most of
    a short run's time on a small machine); the records are those of separate launches."""
    import torch.multiprocessing as mp

    sizes = {run.world_size for run in runs}
    if len(sizes) != 1:
        raise ValueError(f"runs launched together need the same number of processes, got {sorted(sizes)}")
    for run in runs:
        check_paths(run)
        check_nodes(run)
    out_paths = [str(p) for p in out_paths]
    mp.spawn(_worker, args=(list(runs), _free_port(), out_paths, quiet), nprocs=sizes.pop(), join=True)
    return [json.loads(Path(p).read_text()) for p in out_paths]


EQUIVALENCE_BASE = RunConfig(steps=20, seq_length=1024, doclens="magi_hist", planning_workers=0, lr=3e-3)
"""The run the FCP-vs-no-CP equivalence is measured on (tests and ``scripts/megatron_equivalence.py``)."""
EQUIVALENCE_LAYOUTS = {"cp2": dict(cp=2), "cp4": dict(cp=4), "tp2_cp2": dict(cp=2, tp=2), "dp2_cp2": dict(cp=2, dp=2),
                       "dp2_cp2_tp2": dict(cp=2, dp=2, tp=2)}
"""Parallel layouts of the equivalence runs, by name."""
SMALL_KV_BUDGET = 64
"""A key/value budget small enough that most ranks of the equivalence batches receive in several stages (up to
8 at CP 2 and 12 at CP 4)."""
STAGED_LAYOUTS = {
    "cp2_kv64": dict(cp=2, kv_budget_tokens=SMALL_KV_BUDGET),
    "cp4_kv64": dict(cp=4, kv_budget_tokens=SMALL_KV_BUDGET),
    "cp2_kv64_recompute_selective": dict(cp=2, kv_budget_tokens=SMALL_KV_BUDGET, recompute="selective"),
    "cp4_kv64_recompute_selective": dict(cp=4, kv_budget_tokens=SMALL_KV_BUDGET, recompute="selective"),
    "cp2_recompute_full": dict(cp=2, recompute="full"),
    "cp4_recompute_full": dict(cp=4, recompute="full"),
    "cp4_nodes_2x2": dict(cp=4, ranks_per_node=2),
}
"""Equivalence runs of the staged key/value exchange and of activation recompute, by name: a small budget, the
same with core attention recomputed (stages fetched again inside the recomputed forward), whole layers
recomputed under the default budget (several stages at CP 4), and 2 emulated nodes of 2 (the node-aware exchange:
node rings and relays, gradients coming back through node-mates)."""
AUTO_SEED = 3
"""The data seed of the ``auto`` equivalence run: at this small scale the cost model prefers heads for nearly every
micro-batch; with this seed one of the 20 micro-batches (the tenth) runs p2p, so the run switches twice."""
HEAD_PARALLEL_LAYOUTS = {
    "cp4_heads_2x2": dict(cp=4, ranks_per_node=2, node_exchange="heads"),
    "cp4_heads_2x2_kv64": dict(cp=4, ranks_per_node=2, node_exchange="heads", kv_budget_tokens=SMALL_KV_BUDGET),
    "cp2_heads_one_node": dict(cp=2, node_exchange="heads"),
    "cp2_heads_one_rank_per_node": dict(cp=2, ranks_per_node=1, node_exchange="heads"),
    "cp4_auto_2x2": dict(cp=4, ranks_per_node=2, node_exchange="auto", seed=AUTO_SEED),
}
"""Equivalence runs of ``--fcp-node-exchange heads``, by name: 2 emulated nodes of 2 (heads split in pairs, the
staged exchange between the nodes), the same with a small budget, one node (Ulysses: heads split over both ranks,
nothing between nodes), one CP rank per node (nothing to split: the staged exchange between the two), and ``auto``
on 2 nodes of 2 (the exchange picked per micro-batch: on these batches heads but for the tenth, p2p)."""


def baseline_of(run: RunConfig) -> RunConfig:
    """The same run without context or tensor parallelism (one process per data-parallel replica) and without
    recompute (which must not change the numbers)."""
    return replace(run, mode="nocp", cp=1, tp=1, recompute="none", kv_budget_tokens=DEFAULT_KV_BUDGET,
                   ranks_per_node=None, grads_out=run.grads_out and run.grads_out + ".nocp")
