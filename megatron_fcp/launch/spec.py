"""Run configs: a YAML file that says everything a run needs, read into validated, frozen dataclasses.

    name: llama3_8b
    device: gpu
    model: {num_layers: 32, hidden_size: 4096, ...}
    parallel: {nodes: 32, gpus_per_node: 8, tensor: 1, pipeline: 1, context: 8}
    training: {seq_length: 131072, global_batch_size: 64, train_iters: 1000, lr: 3.0e-4, ...}
    context_parallel: {mode: fcp, scheduler: fcp, ...}
    data: {blend: [[1.0, /data/web_text_document]], tokenizer: {type: HuggingFaceTokenizer, model: ...}}
    paths: {checkpoints: /ckpt/llama3_8b, logs: /logs/llama3_8b}
    container: {image: /images/megatron-fcp.sqsh, mounts: [/data:/data]}

The file is read by :mod:`megatron_fcp.launch.yamlsafe` (a key given twice, ``.nan``/``.inf``, more than a few
aliases, deep nesting and oversized files are refused in one line). :func:`load_run_config` reports every problem it
finds at once, each as one line ``dotted.key: what is wrong and what would work``, in a :class:`ConfigError`. Each
section checks its own keys when it is made (the ``context_parallel`` keys are FCP's settings, with their own
readers); :class:`RunSpec` checks the keys together (:mod:`megatron_fcp.launch.checks`), FCP's own start-up rules
included, on the typed values: no command line is made to check a config.
:func:`megatron_fcp.launch.command.entry_args` turns a RunSpec into the entry point's arguments.
"""

from __future__ import annotations

import posixpath
import warnings
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, ClassVar

from megatron_fcp.errors import InputError
from megatron_fcp.launch import checks, yamlsafe
from megatron_fcp.launch import rules as r
from megatron_fcp.megatron.config import CONFIG_SETTINGS
from megatron_fcp.megatron.settings import Setting

DEVICES = ("gpu", "cpu")
PRECISIONS = ("bf16", "fp16", "fp32")
RECOMPUTE = ("none", "selective", "full")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
TOKENIZER_TYPES = ("HuggingFaceTokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer",
                   "TikTokenizer")
"""Megatron tokenizers that take ``--tokenizer-model`` (mock data uses ``NullTokenizer`` by itself)."""


class ConfigError(InputError):
    """The problems of a run config: ``problems`` holds one line per problem, each starting with its dotted key;
    the message is the source's name, then those lines."""

    def __init__(self, problems: list[str], source: str = "run config"):
        self.problems, self.source = list(problems), source
        count = f"{len(self.problems)} problem" + ("s" if len(self.problems) != 1 else "")
        super().__init__("\n".join([f"{source}: {count}", *self.problems]))


def _key(rule, default=MISSING):
    return field(default=default, metadata={"rule": rule})


def _section(cls, default=MISSING, default_factory=MISSING):
    return field(default=default, default_factory=default_factory, metadata={"section": cls})


class _Section:
    """A config section: lists become tuples, then every key is checked by its rule when the section is made."""

    KEY: ClassVar[str]

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _frozen(getattr(self, f.name)))
        problems = checks.field_problems(self, self.KEY)
        if problems:
            raise ConfigError([checks.line(key, message) for key, message in problems], type(self).__name__)


def _frozen(value):
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


@dataclass(frozen=True, kw_only=True)
class ModelSpec(_Section):
    """The GPT's shape."""

    KEY: ClassVar[str] = "model"
    num_layers: int = _key(r.whole())
    """Transformer layers (``--num-layers``)."""
    hidden_size: int = _key(r.whole())
    """Model width (``--hidden-size``)."""
    ffn_hidden_size: int = _key(r.whole())
    """MLP width (``--ffn-hidden-size``)."""
    num_attention_heads: int = _key(r.whole())
    """Query heads; a multiple of ``num_query_groups`` and of ``parallel.tensor``."""
    num_query_groups: int | None = _key(r.optional(r.whole()), None)
    """Key/value heads (grouped-query attention); None: one per query head."""
    vocab_size: int | None = _key(r.optional(r.whole(2)), None)
    """Vocabulary of mock data (``--vocab-size`` with the NullTokenizer); None with a tokenizer, which sets it."""
    rotary_base: int = _key(r.whole(), 10000)
    """RoPE base (``--rotary-base``; Llama 3: 500000)."""
    normalization: str = _key(r.choice(NORMALIZATIONS), "LayerNorm")
    """``LayerNorm`` or ``RMSNorm`` (``--normalization``)."""
    norm_epsilon: float = _key(r.number(above=True), 1e-5)
    """Epsilon of the norm layers (``--norm-epsilon``)."""
    swiglu: bool = _key(r.flag(), False)
    """SwiGLU MLP (``--swiglu``) instead of GeLU."""
    tie_embeddings: bool = _key(r.flag(), True)
    """Share the input embedding and output layer weights; false adds ``--untie-embeddings-and-output-weights``."""
    bias: bool = _key(r.flag(), True)
    """Biases in the linear layers; false adds ``--disable-bias-linear``."""

    @property
    def query_groups(self) -> int:
        """Key/value heads in effect."""
        return self.num_query_groups if self.num_query_groups is not None else self.num_attention_heads


@dataclass(frozen=True, kw_only=True)
class ParallelSpec(_Section):
    """Processes and how they split the model; the data-parallel size follows."""

    KEY: ClassVar[str] = "parallel"
    nodes: int = _key(r.whole())
    """Nodes of the job (one torchrun per node)."""
    gpus_per_node: int = _key(r.whole())
    """GPUs per node, one process each; on device cpu, the processes per node."""
    tensor: int = _key(r.whole(), 1)
    """Tensor-parallel size; above 1 Megatron's sequence parallelism is on as well (``--sequence-parallel``)."""
    pipeline: int = _key(r.whole(), 1)
    """Pipeline-parallel size (1 with mode fcp: FCP does not support pipeline parallelism yet)."""
    context: int = _key(r.whole(), 1)
    """Context-parallel size: the processes that share one packed sequence."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def data_parallel(self) -> int:
        """``world_size / (tensor x pipeline x context)`` (a whole number in a valid config)."""
        return self.world_size // (self.tensor * self.pipeline * self.context)


@dataclass(frozen=True, kw_only=True)
class TrainingSpec(_Section):
    """Sequence, batch, optimizer, precision, checkpoint and log cadence."""

    KEY: ClassVar[str] = "training"
    seq_length: int = _key(r.whole())
    """Tokens of one packed sequence over the whole CP group (``--seq-length``; also the RoPE length)."""
    micro_batch_size: int = _key(r.whole(), 1)
    """Sequences per micro-batch on each data-parallel rank (1 with mode fcp)."""
    global_batch_size: int | None = _key(r.optional(r.whole()), None)
    """Sequences per optimizer step over all data-parallel ranks; None: ``micro_batch_size`` x data-parallel size."""
    train_iters: int = _key(r.whole())
    """Optimizer steps (``--train-iters``; ``--steps`` of the CPU worker)."""
    lr: float = _key(r.number(above=True))
    """Peak learning rate."""
    min_lr: float = _key(r.number(), 0.0)
    """Learning rate at the end of the decay (device gpu)."""
    warmup_iters: int = _key(r.whole(0), 0)
    """Linear warm-up steps (``--lr-warmup-iters``; device gpu)."""
    lr_decay_style: str = _key(r.choice(LR_DECAY_STYLES), "linear")
    """Learning-rate decay after warm-up (device gpu)."""
    weight_decay: float = _key(r.number(), 0.01)
    """AdamW weight decay (device gpu)."""
    clip_grad: float = _key(r.number(), 1.0)
    """Gradient-norm clip, 0 for none (device gpu)."""
    adam_beta1: float = _key(r.number(below=1.0), 0.9)
    """Adam beta1 (device gpu)."""
    adam_beta2: float = _key(r.number(below=1.0), 0.999)
    """Adam beta2 (device gpu; Llama: 0.95)."""
    precision: str = _key(r.choice(PRECISIONS), "bf16")
    """``bf16``, ``fp16`` or ``fp32`` parameters and activations (the CPU worker: fp32)."""
    distributed_optimizer: bool = _key(r.flag(), False)
    """Shard the optimizer state over data-parallel ranks (``--use-distributed-optimizer``; device gpu)."""
    recompute: str = _key(r.choice(RECOMPUTE), "none")
    """Activation recompute: ``none``, ``selective`` (core attention) or ``full`` (every layer, uniform)."""
    save_interval: int = _key(r.whole(), 1000)
    """Steps between checkpoints (one more is saved on SIGTERM, ``--exit-signal-handler``)."""
    log_interval: int = _key(r.whole(), 10)
    """Steps between log lines (device gpu)."""
    eval_iters: int = _key(r.whole(0), 0)
    """Validation batches per evaluation; 0 evaluates never (device gpu)."""
    eval_interval: int = _key(r.whole(), 1000)
    """Steps between evaluations (device gpu)."""
    seed: int = _key(r.whole(0), 1234)
    """Seed of the initialisation and of mock data."""
    distributed_timeout_minutes: int | None = _key(r.optional(r.whole()), None)
    """Minutes before a stuck collective or message aborts the job (``--distributed-timeout-minutes``; device gpu);
    None: Megatron's default, 10."""


class _ContextParallelSection(_Section):
    """How sequences are split over the context-parallel ranks: ``mode`` (``fcp``, this project, or ``ring``,
    Megatron's own context parallelism on GPU with Transformer Engine) and FCP's settings. Its keys, their defaults
    and their rules are FCP's settings themselves (``megatron_fcp.megatron.config.CONFIG_SETTINGS``; each key's
    meaning is its flag's help); values are kept as FCP reads them (``kv_budget_tokens``: ``"none"`` -> None,
    ``"4096"`` -> 4096)."""

    KEY: ClassVar[str] = "context_parallel"

    def __post_init__(self):
        super().__post_init__()
        for described in CONFIG_SETTINGS:
            value = described.read(getattr(self, described.key), f"{self.KEY}.{described.key}")
            object.__setattr__(self, described.key, value)


def _context_parallel_field(described: Setting) -> tuple[str, type, Any]:
    rule = r.fcp_setting(described, f"{_ContextParallelSection.KEY}.{described.key}")
    return described.key, Any, field(default=described.key_default, metadata={"rule": rule})


ContextParallelSpec = make_dataclass(
    "ContextParallelSpec", [_context_parallel_field(described) for described in CONFIG_SETTINGS],
    bases=(_ContextParallelSection,), namespace={"__doc__": _ContextParallelSection.__doc__}, frozen=True,
    kw_only=True, module=__name__)


@dataclass(frozen=True, kw_only=True)
class TokenizerSpec(_Section):
    """The tokenizer of preprocessed data."""

    KEY: ClassVar[str] = "data.tokenizer"
    type: str = _key(r.choice(TOKENIZER_TYPES))
    """Megatron tokenizer class (``--tokenizer-type``)."""
    model: str = _key(r.text("a tokenizer name or path"))
    """Hugging Face name or path of the tokenizer (``--tokenizer-model``)."""


@dataclass(frozen=True, kw_only=True)
class DataSpec(_Section):
    """Training data: a Megatron blend with its tokenizer, or mock documents with real lengths (exactly one; checked
    with the run, as mock data needs ``model.vocab_size``)."""

    KEY: ClassVar[str] = "data"
    blend: tuple[tuple[float, str], ...] | None = _key(r.optional(r.blend()), None)
    """``--data-path``: [weight, prefix] pairs of Megatron indexed datasets (``.bin``/``.idx`` prefixes)."""
    tokenizer: TokenizerSpec | None = _section(TokenizerSpec, None)
    """The tokenizer the blend was made with."""
    split: str = _key(r.split(), "969,30,1")
    """Train, validation and test weights of the blend (``--split``)."""
    mock_doclens: str | None = _key(r.optional(r.doclens()), None)
    """Mock documents: a shipped length distribution (``linux_files``, ``linux_dirs``, ``spamassassin``,
    ``magi_hist``) or a lengths file on the nodes (``--mock-data --fcp-mock-doclens``)."""


@dataclass(frozen=True, kw_only=True)
class PathsSpec(_Section):
    """Folders on the nodes (shared between them)."""

    KEY: ClassVar[str] = "paths"
    checkpoints: str = _key(r.text("a folder path"))
    """Checkpoint folder: saved to and resumed from (``--save`` and ``--load``)."""
    logs: str = _key(r.text("a folder path"))
    """Log folder: job output, TensorBoard (``tensorboard/``), the CPU worker's ``losses.jsonl``."""

    @property
    def tensorboard(self) -> str:
        return posixpath.join(self.logs, "tensorboard")

    @property
    def records(self) -> str:
        """The CPU worker's per-step records (``--records``)."""
        return posixpath.join(self.logs, "losses.jsonl")


@dataclass(frozen=True, kw_only=True)
class ContainerSpec(_Section):
    """The container every node runs in (Slurm with pyxis/enroot)."""

    KEY: ClassVar[str] = "container"
    image: str = _key(r.text("an image (a .sqsh file or registry#image)"))
    """Image of ``docker/Dockerfile``: an enroot ``.sqsh`` file or a registry reference (``--container-image``)."""
    mounts: tuple[str, ...] = _key(r.text_list("a list of SRC:DST strings without commas", forbid=","), ())
    """Bind mounts, ``SRC:DST`` each (``--container-mounts``)."""


@dataclass(frozen=True, kw_only=True)
class RunSpec(_Section):
    """One run: what to train, where and how. Made by :func:`load_run_config`; checked as a whole when made."""

    KEY: ClassVar[str] = ""
    name: str = _key(r.text("a run name"))
    """Run name (job name, log lines)."""
    device: str = _key(r.choice(DEVICES))
    """``gpu``: Megatron's entry point on NCCL; ``cpu``: the gloo CPU worker (tiny models)."""
    model: ModelSpec = _section(ModelSpec)
    """The GPT's shape."""
    parallel: ParallelSpec = _section(ParallelSpec)
    """Nodes, processes per node and the tensor/pipeline/context split."""
    training: TrainingSpec = _section(TrainingSpec)
    """Sequence length, batch, optimizer, precision, recompute, cadence."""
    context_parallel: ContextParallelSpec = _section(ContextParallelSpec, default_factory=ContextParallelSpec)
    """FCP or ring, and FCP's settings (all defaults when left out)."""
    data: DataSpec = _section(DataSpec)
    """A blend with its tokenizer, or mock documents."""
    paths: PathsSpec = _section(PathsSpec)
    """Checkpoint and log folders."""
    container: ContainerSpec | None = _section(ContainerSpec, None)
    """The container image and mounts; None: the nodes' own environment."""

    def __post_init__(self):
        # keys together once each is fine on its own (load_run_config reports both kinds at once)
        problems = checks.field_problems(self, "") or checks.run_problems(self)
        if problems:
            raise ConfigError([checks.line(key, message) for key, message in checks.one_per_key(problems)],
                              "RunSpec")

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step in effect."""
        return self.training.global_batch_size or self.training.micro_batch_size * self.parallel.data_parallel

    @property
    def tokens_per_cp_rank(self) -> int:
        return self.training.seq_length // self.parallel.context


# -- loading ----------------------------------------------------------------------------------------------------
def _read(source) -> tuple[Any, str]:
    if isinstance(source, Mapping):
        return dict(source), "run config"
    path = Path(source)
    if path.exists() and not path.is_file():
        raise InputError(f"{path}: is not a regular file; pass a run config YAML file")
    try:
        with path.open("rb") as file:
            data = file.read(yamlsafe.MAX_BYTES + 1)  # load_yaml refuses anything longer
    except OSError as err:
        raise InputError(f"{path}: cannot read the run config ({err.strerror}); pass a YAML file") from None
    try:
        return yamlsafe.load_yaml(data), str(path)
    except InputError as err:
        raise InputError(f"{path}: {err}") from None


def _doclens_problem(value) -> str | None:
    """Why the mock lengths ``value`` (a shipped name or a file) cannot be read on this machine, or None."""
    from megatron_fcp.data.lengths import SHIPPED, load_distribution

    if not isinstance(value, str) or value in SHIPPED:
        return None
    try:
        load_distribution(value)
    except InputError as err:
        return f"{err} (paths are read from the folder the launcher runs in)"
    return None


def _unchecked(cls, values: dict):
    """An instance whose checks have not run (to check keys together while some are broken)."""
    obj = object.__new__(cls)
    for name, value in values.items():
        object.__setattr__(obj, name, value)
    return obj


def _placeholder(f):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    if "section" in f.metadata:
        return _diagnose(f.metadata["section"], {}, f.name)[0]
    return f.metadata["rule"].placeholder


def _diagnose(cls, raw, key: str) -> tuple[Any, list, set]:
    """(unchecked instance, problems, broken keys) of ``raw`` read as ``cls``; broken values are placeholders."""
    if not isinstance(raw, Mapping):
        return _unchecked(cls, {f.name: _placeholder(f) for f in fields(cls)}), [
            (key or "(top level)", f"must be a mapping of keys, got {raw!r}")], {key}
    known = [f.name for f in fields(cls)]
    problems = [(f"{key}.{name}" if key else str(name), "unknown key" + (r.suggest(name, known) or
                 f"; known keys: {', '.join(known)}")) for name in raw if name not in known]
    values, bad = {}, set()
    for f in fields(cls):
        sub = f"{key}.{f.name}" if key else f.name
        if f.name not in raw:
            required = f.default is MISSING and f.default_factory is MISSING
            if required:
                want = "a section" if "section" in f.metadata else f.metadata["rule"].want
                problems.append((sub, f"required key missing; add {f.name}: <{want}>"))
                bad.add(sub)
            values[f.name] = _placeholder(f)
        elif "section" in f.metadata and raw[f.name] is None and f.default is not None:
            problems.append((sub, f"must be a mapping of {f.name} keys, got null"))
            bad.add(sub)
            values[f.name] = _placeholder(f)
        elif "section" in f.metadata and raw[f.name] is not None:
            values[f.name], sub_problems, sub_bad = _diagnose(f.metadata["section"], raw[f.name], sub)
            problems, bad = problems + sub_problems, bad | sub_bad
        elif "section" in f.metadata:
            values[f.name] = None
        elif (problem := f.metadata["rule"].refuse(_frozen(raw[f.name]))) is not None:
            problems.append((sub, problem))
            bad.add(sub)
            values[f.name] = _placeholder(f)
        else:
            values[f.name] = _frozen(raw[f.name])
    return _unchecked(cls, values), problems, bad


def _construct(cls, raw: Mapping):
    """``cls`` made (and so checked) from ``raw``, nested sections first."""
    sections = {f.name: f.metadata["section"] for f in fields(cls) if "section" in f.metadata}
    return cls(**{name: _construct(sections[name], value) if name in sections and value is not None else value
                  for name, value in raw.items()})


def _present(raw: Mapping, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(raw, Mapping) or part not in raw:
            return False
        raw = raw[part]
    return True


def _unused(spec: RunSpec, raw: Mapping) -> list[str]:
    """Keys the config sets that the run will not read, with why."""
    unused = []
    if spec.device == "cpu":
        unused += [f"{key} is not used on device cpu: {checks.CPU_WORKER} has no such option"
                   for key in checks.GPU_ONLY if _present(raw, key)]
    if spec.context_parallel.mode == "ring":
        unused += [f"{key} is not used with context_parallel.mode ring (Megatron's own context parallelism)"
                   for key in checks.FCP_ONLY if _present(raw, key)]
    if spec.data.blend is None and _present(raw, "data.split"):
        unused.append("data.split is not used without data.blend")
    return unused


def load_run_config(source: str | Path | Mapping) -> RunSpec:
    """Read a run config (a YAML file or a mapping) into a :class:`RunSpec`.

    Raises :class:`ConfigError` listing every problem found, one line each, starting with the dotted key; warns
    (UserWarning) for each key the run will not use.
    """
    raw, name = _read(source)
    draft, problems, bad = _diagnose(RunSpec, raw, "")
    if not isinstance(raw, Mapping):
        raise ConfigError([checks.line(*problems[0])], name)
    problems += checks.run_problems(draft, frozenset(bad))
    if "data.mock_doclens" not in bad and (problem := _doclens_problem(draft.data.mock_doclens)) is not None:
        problems.append(("data.mock_doclens", problem))
    if problems:
        raise ConfigError([checks.line(key, message) for key, message in checks.one_per_key(problems)], name)
    spec = _construct(RunSpec, raw)
    for message in _unused(spec, raw):
        warnings.warn(f"{name}: {message}", UserWarning, stacklevel=2)
    return spec
