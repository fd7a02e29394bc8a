"""Checks of a run config: each problem is ``(dotted key, what is wrong and what would work)``.

- :func:`field_problems`: each key on its own, by the :class:`~megatron_fcp.launch.rules.Rule` in its field's metadata.
- :func:`run_problems`: keys together (layout, batch, data source, device). A check is skipped when a key it reads
  has a problem of its own, so one broken key does not bring a chain of follow-on lines.

The rules of FCP's start-up check that a config can break (parallel layout, pipeline, micro-batch, sequence length,
heads, exchange timeout) are the entry point's own functions (``megatron_fcp.megatron.config``), run here on the
config's typed values and told the config's key names (:data:`KEYS`), so each problem names its key. Megatron's own
rules for layout, sequence length and heads are the same as FCP's, so those run in ring mode too. The rules the
generated command line always meets (per-token loss, rotary positions, document boundaries) are not repeated here,
and the rule about the GPU (backend te needs sm90+) is left to the entry point: the launcher does not run on the
nodes' GPUs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import fields

from megatron_fcp.megatron.config import (
    CONFIG_SETTINGS,
    MODE,
    Names,
    exchange_timeout_problem,
    heads_problem,
    layout_problem,
    micro_batch_problem,
    pipeline_problem,
    ranks_per_node_problem,
    sequence_problem,
)

Problem = tuple[str, str]
KEYS = Names(cp="parallel.context", tp="parallel.tensor", pp="parallel.pipeline", seq_length="training.seq_length",
             micro_batch_size="training.micro_batch_size", global_batch_size="training.global_batch_size",
             heads="model.num_attention_heads", query_groups="model.num_query_groups",
             sequence_parallel="sequence parallelism (on when parallel.tensor > 1)",
             exchange_timeout="context_parallel.exchange_timeout_s",
             distributed_timeout="training.distributed_timeout_minutes")
"""The config keys of the settings FCP's layout rules read."""

CPU_WORKER = "the CPU worker (python -m megatron_fcp.cpu_trainer.worker)"
CPU_FIXED = {
    "model.normalization": "LayerNorm", "model.norm_epsilon": 1e-5, "model.swiglu": False,
    "model.tie_embeddings": True, "model.bias": True, "model.rotary_base": 10000,
    "training.precision": "fp32", "training.recompute": "none",
}
"""What the CPU worker always builds and runs; a CPU config asking for anything else is refused."""
GPU_ONLY = ("training.min_lr", "training.warmup_iters", "training.lr_decay_style", "training.weight_decay",
            "training.clip_grad", "training.adam_beta1", "training.adam_beta2", "training.distributed_optimizer",
            "training.log_interval", "training.eval_iters", "training.eval_interval",
            "training.distributed_timeout_minutes",
            "context_parallel.edge_cost_tile_size", "context_parallel.planning_workers",
            "context_parallel.exchange_timeout_s", "context_parallel.debug_checks")
"""Keys the CPU worker has no option for (a CPU config that sets one gets a warning)."""
FCP_ONLY = tuple(f"context_parallel.{described.key}" for described in CONFIG_SETTINGS if described is not MODE)
"""Keys Megatron's own ring mode does not read (a ring config that sets one gets a warning)."""


def line(key: str, message: str) -> str:
    """``key: message`` without a repeated leading key."""
    return f"{key}: {message.removeprefix(key + ' ')}"


# -- single keys ---------------------------------------------------------------------------------------------
def field_problems(section, key: str) -> list[Problem]:
    """The problems of each value of ``section`` (a section dataclass) on its own, nested sections included."""
    problems: list[Problem] = []
    for f in fields(section):
        value, sub = getattr(section, f.name), f"{key}.{f.name}" if key else f.name
        if "section" in f.metadata:
            if isinstance(value, f.metadata["section"]):
                problems += field_problems(value, sub)
            elif value is not None or f.default is not None:
                problems.append((sub, f"must be a {f.metadata['section'].__name__}, got {value!r}"))
        elif (problem := f.metadata["rule"].refuse(value)) is not None:
            problems.append((sub, problem))
    return problems


# -- keys together ---------------------------------------------------------------------------------------------
_CHECKS: list[tuple[tuple[str, ...], Callable]] = []


def _reads(*keys: str):
    """Register a check of the whole run that reads ``keys`` (a section name stands for all its keys)."""

    def register(check):
        _CHECKS.append((keys, check))
        return check

    return register


def _touches(keys: Iterable[str], bad: Iterable[str]) -> bool:
    return any(k == b or k.startswith(b + ".") or b.startswith(k + ".") for k in keys for b in bad)


def run_problems(spec, bad: frozenset[str] = frozenset()) -> list[Problem]:
    """The problems between keys of ``spec``; checks reading a key in ``bad`` are skipped."""
    return one_per_key(p for keys, check in _CHECKS if not _touches(keys, bad) for p in check(spec))


def one_per_key(problems: Iterable[Problem]) -> list[Problem]:
    """The first problem of each key (two checks can see one mistake, e.g. a layout that does not divide)."""
    first: dict[str, str] = {}
    for key, message in problems:
        first.setdefault(key, message)
    return list(first.items())


def _found(*problems: Problem | None) -> list[Problem]:
    return [p for p in problems if p is not None]


def _fcp(spec) -> bool:
    return spec.context_parallel.mode == "fcp"


@_reads("parallel")
def _layout(spec) -> list[Problem]:
    p = spec.parallel
    processes = f"processes (nodes {p.nodes} x gpus_per_node {p.gpus_per_node})"
    return _found(layout_problem(p.world_size, p.tensor, p.pipeline, p.context, KEYS, processes))


@_reads("parallel", "context_parallel.ranks_per_node")
def _ranks_per_node(spec) -> list[Problem]:
    """The nodes every CP group spans must hold equal shares of it: on ``context_parallel.ranks_per_node`` when set,
    else on ``parallel.gpus_per_node`` (torchrun's LOCAL_WORLD_SIZE, which the entry point reads then)."""
    p, key = spec.parallel, "context_parallel.ranks_per_node"
    if not _fcp(spec) or _layout(spec):
        return []
    given = spec.context_parallel.ranks_per_node
    per_node, source = (given, key) if given is not None else (p.gpus_per_node, "parallel.gpus_per_node")
    processes = f"processes (nodes {p.nodes} x gpus_per_node {p.gpus_per_node})"
    problem = ranks_per_node_problem(p.world_size, p.tensor, p.context, per_node, source, processes)
    return [(key if given is not None else KEYS.cp, problem)] if problem else []


@_reads("parallel", "training.micro_batch_size", "training.global_batch_size")
def _global_batch(spec) -> list[Problem]:
    p, t = spec.parallel, spec.training
    if _layout(spec) or t.global_batch_size is None:  # no data-parallel size: _layout says why
        return []
    step = t.micro_batch_size * p.data_parallel
    if t.global_batch_size % step == 0:
        return []
    fits = -(-t.global_batch_size // step) * step
    return [("training.global_batch_size",
             f"{t.global_batch_size} is not a multiple of micro_batch_size {t.micro_batch_size} x data-parallel size "
             f"{p.data_parallel} = {step} (try {fits})")]


@_reads("data", "model.vocab_size")
def _data_source(spec) -> list[Problem]:
    d, vocab = spec.data, spec.model.vocab_size
    if (d.blend is None) == (d.mock_doclens is None):
        return [("data", "give exactly one of blend (tokenized Megatron datasets, with a tokenizer) and "
                         "mock_doclens (mock documents with real lengths)")]
    problems = []
    if d.blend is not None:
        if d.tokenizer is None:
            problems.append(("data.tokenizer", "data.blend needs a tokenizer: add tokenizer: {type: "
                                               "HuggingFaceTokenizer, model: NAME_OR_PATH}"))
        if vocab is not None:
            problems.append(("model.vocab_size", "the vocabulary comes from data.tokenizer; remove vocab_size "
                                                 "(it sizes mock data only)"))
    else:
        if d.tokenizer is not None:
            problems.append(("data.tokenizer", "mock documents use Megatron's NullTokenizer; remove tokenizer, or "
                                               "use data.blend for tokenized data"))
        if vocab is None:
            problems.append(("model.vocab_size", "mock documents need a vocabulary size: add vocab_size (e.g. 128256 "
                                                 "as Llama 3's tokenizer)"))
    return problems


@_reads("device", "context_parallel.mode", "data.mock_doclens")
def _ring_mode(spec) -> list[Problem]:
    if spec.context_parallel.mode != "ring":
        return []
    if spec.device == "cpu":
        return [("context_parallel.mode", "ring is Megatron's own ring attention, which needs Transformer Engine on "
                                          "a GPU; on device cpu use mode fcp with scheduler ring (FCP's runtime "
                                          "with ring placement)")]
    if spec.data.mock_doclens is not None:
        return [("data.mock_doclens", "mode ring reads Megatron's own mock data, which has no documents, so the "
                                      "lengths would be ignored; use mode fcp with scheduler ring, or data.blend")]
    return []


@_reads("device", "data.blend")
def _cpu_data(spec) -> list[Problem]:
    if spec.device == "cpu" and spec.data.blend is not None:
        return [("data.blend", f"{CPU_WORKER} trains on mock documents only; use data.mock_doclens")]
    return []


@_reads("device", "context_parallel.attention_backend")
def _cpu_backend(spec) -> list[Problem]:
    backend = spec.context_parallel.attention_backend
    if spec.device == "cpu" and backend not in ("auto", "cpu"):
        return [("context_parallel.attention_backend", f"{CPU_WORKER} runs the cpu kernels; use auto or cpu, not "
                                                       f"{backend!r}")]
    return []


@_reads("device", "parallel", "training.micro_batch_size", "training.global_batch_size")
def _cpu_batch(spec) -> list[Problem]:
    p, gbs = spec.parallel, spec.training.global_batch_size
    if spec.device != "cpu" or gbs is None or _layout(spec):
        return []
    per_step = spec.training.micro_batch_size * p.data_parallel
    if gbs == per_step:
        return []
    return [("training.global_batch_size", f"{CPU_WORKER} trains one micro-batch per data-parallel rank per step: "
                                           f"use {per_step}, or leave the key out")]


def _cpu_fixed(key: str, value):
    section, name = key.split(".")
    shown = str(value).lower() if isinstance(value, bool) else value

    @_reads("device", key)
    def check(spec) -> list[Problem]:
        if spec.device != "cpu" or getattr(getattr(spec, section), name) == value:
            return []
        return [(key, f"{CPU_WORKER} always uses {name}: {shown}; leave the key out, or use device gpu")]

    return check


for _key, _value in CPU_FIXED.items():
    _cpu_fixed(_key, _value)


# -- FCP's start-up rules, in the config's terms -------------------------------------------------------------
@_reads("parallel.pipeline", "context_parallel.mode")
def _pipeline(spec) -> list[Problem]:
    return _found(pipeline_problem(spec.parallel.pipeline, KEYS)) if _fcp(spec) else []


@_reads("training.micro_batch_size", "context_parallel.mode")
def _micro_batch(spec) -> list[Problem]:
    return _found(micro_batch_problem(spec.training.micro_batch_size, KEYS)) if _fcp(spec) else []


@_reads("training.seq_length", "parallel.context", "parallel.tensor")
def _sequence(spec) -> list[Problem]:
    p = spec.parallel
    return _found(sequence_problem(spec.training.seq_length, p.context, p.tensor, p.tensor > 1, KEYS))


@_reads("model.num_attention_heads", "model.num_query_groups", "parallel.tensor")
def _heads(spec) -> list[Problem]:
    return _found(heads_problem(spec.model.num_attention_heads, spec.model.query_groups, spec.parallel.tensor, KEYS))


@_reads("context_parallel.exchange_timeout_s", "training.distributed_timeout_minutes", "context_parallel.mode")
def _exchange_timeout(spec) -> list[Problem]:
    if not _fcp(spec):
        return []
    timeout_s, minutes = spec.context_parallel.exchange_timeout_s, spec.training.distributed_timeout_minutes
    return _found(exchange_timeout_problem(timeout_s, minutes, KEYS))
