"""``python -m megatron_fcp.launch rehearse CONFIG``: a run's data path on a login node, without a GPU.

What the training entry point (``megatron_fcp.megatron.pretrain_gpt``) would do with its data, in one process:

1. the run config becomes the entry point's arguments (:func:`megatron_fcp.launch.command.megatron_args`), with
   the overrides given here (``--data``, ``--null-tokenizer``, the index cache);
2. the entry point's start-up checks run on them: FCP's (``check_fcp_args``), megatron-core's dataset helpers,
   then Megatron's own ``parse_args`` and ``validate_args`` (there, the one GPU query, the device architecture,
   answers sm90 and ``CUDA_DEVICE_MAX_CONNECTIONS=1`` is set, as ``scripts/slurm/fcp.sbatch`` exports it);
3. the run's datasets are built by the same code as in training (:mod:`megatron_fcp.megatron.datasets`):
   Megatron's ``GPTDataset`` through its builder, or the config's mock documents;
4. every CP rank of data-parallel rank 0 reads its first ``--samples`` micro-batches through a torch
   ``DataLoader`` with the run's worker processes, Megatron's sampler and ``FcpBatchDataset`` (FCP's data hooks).

It prints, per sample, each CP rank's tokens, planning time and shipped schedule size, its modeled attention time
(:func:`megatron_fcp.sim.model.evaluate`, one layer forward and backward) and its key/value memory under the
staged exchange, then the loader's peak memory. A data path the cluster would reject is reported with the entry
point's own line (``megatron-fcp: error: ...``) and exit code 2.

Imports neither torch nor megatron-core until a rehearsal runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import logging
import os
import resource
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator

import numpy as np

from megatron_fcp.errors import InputError
from megatron_fcp.launch.command import megatron_args
from megatron_fcp.launch.spec import RunSpec
from megatron_fcp.megatron.config import add_fcp_args, fcp_config_from_args
from megatron_fcp.megatron.pretrain_gpt import check_startup
from megatron_fcp.planner.stages import resolve_kv_budget
from megatron_fcp.sim.model import HardwareProfile, PlanCost, evaluate, load_hardware

DEFAULT_SAMPLES = 2
DEFAULT_HARDWARE = "h100_node"
ASSUMED_DEVICE_ARCH = 9
"""The compute capability major version Megatron's ``validate_args`` is told (Hopper: H100, H200)."""
ENTRY_ENVIRONMENT = {"RANK": "0", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
"""Environment of rank 0 under ``scripts/slurm/fcp.sbatch`` that Megatron's argument checks read (plus
``WORLD_SIZE`` and torchrun's ``LOCAL_WORLD_SIZE``, the config's)."""
MEMORY_POLL_S = 0.02
GIB, MIB = float(1 << 30), float(1 << 20)


class EntryPointError(InputError):
    """A failure the training entry point reports with the same line: print it as ``megatron-fcp: error: ...``."""


@dataclasses.dataclass(frozen=True)
class Options:
    """What ``rehearse`` was asked for (besides the config)."""

    data: str | None = None
    """Prefix of an indexed dataset (``PREFIX.bin``/``PREFIX.idx``) used instead of the config's ``data.blend``."""
    samples: int = DEFAULT_SAMPLES
    """Micro-batches to read on every CP rank."""
    null_tokenizer: int | None = None
    """Vocabulary of Megatron's NullTokenizer used instead of the config's tokenizer (end-of-document id N - 1)."""
    cache_dir: str | None = None
    """Megatron's index cache (``--data-cache-path``); None: a temporary folder, removed afterwards."""
    hardware: str = DEFAULT_HARDWARE
    """Hardware profile of the modeled attention time (``megatron_fcp.sim``), with the config's attention heads."""


# -- 1. the entry point's arguments -----------------------------------------------------------------------------
def replace_flag(argv: list[str], flags: tuple[str, ...], new: list[str]) -> list[str]:
    """``argv`` without each of ``flags`` and its values, with ``new`` where the first of them stood (at the end if
    none is there). A flag's values are the tokens up to the next ``--`` option."""
    out, where = [], None
    i = 0
    while i < len(argv):
        if argv[i] in flags:
            where = len(out) if where is None else where
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                i += 1
            continue
        out.append(argv[i])
        i += 1
    where = len(out) if where is None else where
    return out[:where] + new + out[where:]


def entry_argv(spec: RunSpec, options: Options, cache_dir: str) -> tuple[list[str], list[str]]:
    """The entry point's arguments for ``spec`` with the overrides of ``options``, and the overrides as words."""
    argv, said = megatron_args(spec), []
    if options.data is not None:
        if spec.data.blend is None:
            raise InputError(f"--data replaces the config's data.blend, but {spec.name} trains on mock documents "
                             "(data.mock_doclens); rehearse it without --data, or give the config a data.blend")
        argv = replace_flag(argv, ("--data-path",), ["--data-path", options.data])
        said.append(f"--data-path {options.data} (instead of data.blend)")
    if options.null_tokenizer is not None:
        new = ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(options.null_tokenizer)]
        argv = replace_flag(argv, ("--tokenizer-type", "--tokenizer-model", "--vocab-size"), new)
        said.append(f"{' '.join(new)} (instead of the config's tokenizer)")
    argv = replace_flag(argv, ("--data-cache-path",), ["--data-cache-path", cache_dir])
    said.append(f"--data-cache-path {cache_dir}")
    return argv, said


# -- 2. the entry point's start-up checks -----------------------------------------------------------------------
@contextlib.contextmanager
def _entry_process(argv: list[str], world_size: int, local_world_size: int | None = None) -> Iterator[None]:
    """``sys.argv`` and the environment of the entry point's rank 0, for the duration of the block
    (``local_world_size``: the processes per node torchrun would announce; None leaves the environment's)."""
    env = ENTRY_ENVIRONMENT | {"WORLD_SIZE": str(world_size)}
    if local_world_size is not None:
        env["LOCAL_WORLD_SIZE"] = str(local_world_size)
    saved_env, saved_argv = {key: os.environ.get(key) for key in env}, sys.argv
    os.environ.update(env)
    sys.argv = ["pretrain_gpt", *argv]
    try:
        yield
    finally:
        sys.argv = saved_argv
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _import_megatron() -> None:
    """Import the megatron.training modules a rehearsal uses without the notices a GPU-less machine prints (no
    CUDA runtime, no Apex or Transformer Engine: true on a login node, and no concern of the data path); Megatron's
    progress messages (it logs at INFO) are silenced, its warnings kept."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.training.arguments  # noqa: F401
        import megatron.training.datasets.data_samplers  # noqa: F401
    logging.getLogger().setLevel(logging.WARNING)


def _validate(args) -> None:
    """Megatron's ``validate_args`` as the entry point calls it, its device query answered :data:`ASSUMED_DEVICE_ARCH`;
    its printout (every argument) is dropped."""
    from unittest import mock

    import megatron.training.arguments as arguments

    with (mock.patch.object(arguments, "get_device_arch_version", lambda: ASSUMED_DEVICE_ARCH),
          contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings()):
        warnings.simplefilter("ignore")
        try:
            arguments.validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
        except AssertionError as err:
            raise InputError(f"Megatron's validate_args refuses the arguments: {err}") from None


def entry_args(argv: list[str], world_size: int, local_world_size: int | None = None):
    """The entry point's parsed arguments, checked as ``pretrain_gpt.parse_checked_args`` checks them (FCP's
    checks and the dataset helpers fail as :class:`EntryPointError`), without its global state; ``world_size`` and
    ``local_world_size`` as torchrun would announce them (see :func:`_entry_process`)."""
    _import_megatron()
    from megatron.training.arguments import parse_args

    with _entry_process(argv, world_size, local_world_size):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12 on argparse types in Megatron's parser
            args = parse_args(extra_args_provider=add_fcp_args)
        try:
            check_startup(args, world_size=world_size)
        except InputError as err:
            raise EntryPointError(str(err)) from None
        _validate(args)
    return args


# -- 3. and 4. the datasets and every CP rank's loader ----------------------------------------------------------
def first_micro_batches(args, count: int) -> list[list[int]]:
    """Sample indices of data-parallel rank 0's first ``count`` micro-batches (Megatron's pretraining sampler)."""
    from megatron.training.datasets.data_samplers import MegatronPretrainingSampler

    sampler = MegatronPretrainingSampler(total_samples=count * args.micro_batch_size * args.data_parallel_size,
                                         consumed_samples=0, micro_batch_size=args.micro_batch_size,
                                         data_parallel_rank=0, data_parallel_size=args.data_parallel_size)
    return [list(batch) for batch in itertools.islice(iter(sampler), count)]


def _entry_data_error(err: Exception) -> EntryPointError:
    """The one line of an :class:`InputError` raised in the training path, also when a DataLoader worker raised it
    (torch then wraps the worker's traceback; its last line holds the message)."""
    text = str(err).strip().splitlines()
    line = text[-1] if len(text) > 1 else (text[0] if text else type(err).__name__)
    return EntryPointError(line.split("InputError: ", 1)[-1])


def load_tokenizer(args):
    """The run's tokenizer for tokenized data (None for mock data); where it cannot be loaded here, one line that
    says so and how to rehearse without it."""
    from megatron_fcp.megatron.datasets import build_run_tokenizer

    if args.mock_data:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return build_run_tokenizer(args)
    except InputError as err:
        raise InputError(f"{err}; to rehearse without the tokenizer, pass --null-tokenizer VOCAB") from None


def build_train_dataset(args, num_samples: int):
    """The run's train dataset (Megatron's builder, the data-path checks of training), for ``num_samples``."""
    from megatron_fcp.megatron.datasets import build_megatron_datasets

    tokenizer = load_tokenizer(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            datasets = build_megatron_datasets(args, (num_samples, 0, 0), tokenizer)
        except InputError as err:
            raise _entry_data_error(err) from None
    if datasets[0] is None:
        raise InputError(f"Megatron built no train dataset for {num_samples} samples; check --split")
    return datasets[0]


def rank_dataset(dataset, args, cp_rank: int):
    """The train dataset as CP rank ``cp_rank`` reads it (``FcpBatchDataset``, as in training)."""
    from megatron_fcp.megatron.datasets import for_cp_rank

    return for_cp_rank([dataset], args, cp_rank)[0]


def warm_up(dataset, index: int) -> None:
    """Read item ``index`` of a CP rank's dataset here, once: a data hook's error surfaces as its one line, and the
    loader's workers fork with the planner's and the schedule's one-time set-up done, as a persistent worker has
    it after its first micro-batch (so the planning times printed are those of the steady state)."""
    try:
        dataset[index]
    except InputError as err:
        raise EntryPointError(str(err)) from None


def read_rank(dataset, batches: list[list[int]], num_workers: int) -> list[dict]:
    """What CP rank's data loader yields for ``batches``: a torch DataLoader with ``num_workers`` processes and
    default collation (as Megatron's, without pinned memory), each batch as numpy arrays of its first sample."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)
    try:
        return [{key: value[0].numpy() for key, value in batch.items()} for batch in loader]
    except InputError as err:
        raise _entry_data_error(err) from None


# -- memory -----------------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of this process and its children (data-loader workers) while the block runs: this process's
    resident set plus each child's private memory (its unique set: pages it shares with this process after the
    fork are counted once), polled every :data:`MEMORY_POLL_S` seconds; plus ``ru_maxrss`` of this process and of
    the largest child that ended."""

    def __init__(self):
        self.tree_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        try:
            import psutil
        except ImportError:  # megatron-fcp[megatron] has it; without it only ru_maxrss is reported
            return
        me = psutil.Process()
        while not self._stop.is_set():
            total = me.memory_info().rss
            for child in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += child.memory_full_info().uss
            self.tree_bytes = max(self.tree_bytes, total)
            self._stop.wait(MEMORY_POLL_S)

    @staticmethod
    def maxrss_bytes(who: int) -> int:
        """``ru_maxrss`` of ``resource.RUSAGE_SELF`` or ``RUSAGE_CHILDREN`` in bytes (Linux reports KiB)."""
        return resource.getrusage(who).ru_maxrss * 1024

    def line(self) -> str:
        """The report line: the larger of the polled peak and this process's ``ru_maxrss``, then both maxima."""
        main, child = self.maxrss_bytes(resource.RUSAGE_SELF), self.maxrss_bytes(resource.RUSAGE_CHILDREN)
        peak = max(self.tree_bytes, main)
        return (f"loader peak memory: {peak / GIB:.2f} GiB (this process's resident memory plus its data-loader "
                f"workers' private memory, polled every {1e3 * MEMORY_POLL_S:.0f} ms); ru_maxrss: this process "
                f"{main / GIB:.2f} GiB, largest worker {child / GIB:.2f} GiB")


# -- the report -------------------------------------------------------------------------------------------------
def model_hardware(args, name: str) -> HardwareProfile:
    """The hardware profile ``name`` with the run's attention layer per GPU: its query and key/value heads over the
    tensor-parallel ranks, head size and 16- or 32-bit activations."""
    hw, tp = load_hardware(name), args.tensor_model_parallel_size
    groups = args.num_query_groups if args.group_query_attention else args.num_attention_heads
    return dataclasses.replace(hw, num_heads=max(1, args.num_attention_heads // tp), num_kv_heads=max(1, groups // tp),
                               head_dim=args.kv_channels, bytes_per_element=2 if args.bf16 or args.fp16 else 4)


RANK_HEADER = ("  rank  tokens  padding  plan ms  schedule ms  schedule B  attention ms  peak remote KV tokens    MiB"
               "  kept KV tokens  stages")
STAT = {name: i for i, name in enumerate(("plan_seconds", "pairs_imbalance", "comm_vs_ring", "num_docs", "pad_tokens",
                                          "schedule_seconds"))}
"""Positions in ``fcp_stats`` (``megatron_fcp.megatron.batch.STATS``)."""


def shipped_schedule(sample: dict) -> np.ndarray:
    """The per-rank arrays the loader ships for the attention step: the encoded schedule (the rank's plan view
    where an older loader ships that instead)."""
    return sample["fcp_schedule"] if "fcp_schedule" in sample else sample["fcp_plan"]


def check_schedule(sample: dict, rank: int, digest: int, cfg) -> None:
    """Decode rank ``rank``'s shipped schedule as the attention step does; :class:`InputError` unless it is this
    rank's, of the plan with ``digest``, over the rank's token slots."""
    from megatron_fcp.attention.schedule import decode_schedule

    schedule = decode_schedule(sample["fcp_schedule"])
    got = (schedule.cp_rank, schedule.plan_digest, schedule.num_tokens)
    if got != (rank, digest, cfg.tokens_per_rank):
        raise InputError(f"CP rank {rank}'s schedule is for rank {got[0]}, plan {got[1]:#x}, {got[2]} tokens; expected "
                         f"plan {digest:#x} over {cfg.tokens_per_rank} tokens: the CP ranks planned differently, which "
                         "the attention step would stop at (PlanMismatchError)")


def rank_line(rank: int, sample: dict, cost: PlanCost, kv_bytes: float) -> str:
    """One CP rank's row: what its loader shipped, its modeled attention time and its key/value memory."""
    stats, memory = sample["fcp_stats"], {key: int(value[rank]) for key, value in cost.memory.items()}
    peak = memory["peak_remote_kv_tokens"]
    return (f"  {rank:4d}  {sample['tokens'].shape[0]:6d}  {int(stats[STAT['pad_tokens']]):7d}  "
            f"{1e3 * float(stats[STAT['plan_seconds']]):7.1f}  {1e3 * float(stats[STAT['schedule_seconds']]):11.1f}  "
            f"{shipped_schedule(sample).nbytes:10d}  {1e3 * float(cost.step_s[rank]):12.3f}  {peak:21d}  "
            f"{peak * kv_bytes / MIB:6.1f}  {memory['saved_remote_kv_tokens']:14d}  {memory['num_stages']:6d}")


def plan_sample(sample: dict, cfg):
    """The plan of one packed sample, as every CP rank's data hook makes it (the hook's error if it cannot)."""
    from megatron_fcp.megatron.batch import doc_lengths_from_positions, plan_micro_batch

    try:
        return plan_micro_batch(doc_lengths_from_positions(sample["position_ids"]), cfg)
    except InputError as err:
        raise EntryPointError(str(err)) from None


def sample_lines(number: int, index: int, plan, shipped: list[dict], cfg, hw: HardwareProfile) -> list[str]:
    """The report of one micro-batch: its documents and plan, then one row per CP rank."""
    for rank, sample in enumerate(shipped):
        check_schedule(sample, rank, plan.digest, cfg)
    cost = evaluate(plan, hw, cfg.kv_budget_tokens)
    work_ms = [1e3 * float(s["fcp_stats"][STAT["plan_seconds"]] + s["fcp_stats"][STAT["schedule_seconds"]])
               for s in shipped]
    lens = plan.doc_lens
    head = (f"sample {number} (dataset index {index}): {lens.size} documents (longest {int(lens.max())} tokens); "
            f"planning + schedule {max(work_ms):.1f} ms on the slowest rank (mean {np.mean(work_ms):.1f} ms, in the "
            f"data-loader workers); the same plan on all {cfg.cp} ranks; attention {1e3 * cost.step_time_s:.3f} ms "
            "modeled on the slowest rank")
    rows = [rank_line(rank, sample, cost, hw.kv_bytes_per_token) for rank, sample in enumerate(shipped)]
    return [head, RANK_HEADER, *rows]


def _budget_words(cfg) -> str:
    budget = resolve_kv_budget(cfg.kv_budget_tokens, cfg.tokens_per_rank)
    return "one unbounded stage" if budget is None else f"at most {budget} tokens per stage"


def _preamble(config: str, spec: RunSpec, args, said: list[str], batches, hw: HardwareProfile) -> list[str]:
    cfg = fcp_config_from_args(args)
    data = f"--data-path {' '.join(args.data_path)}" if args.data_path else "mock documents"
    return [
        f"rehearse {config}: {spec.name}, FCP over CP {cfg.cp} ({cfg.tokens_per_rank} token slots per rank, "
        f"seq_length {cfg.seq_length}), data-parallel rank 0 of {args.data_parallel_size}, {len(batches)} samples",
        f"# entry-point arguments: the config's, with {'; '.join(said)}",
        "# start-up checks passed: FCP's (check_fcp_args), megatron-core's dataset helpers, Megatron's parse_args "
        f"and validate_args (device architecture taken as sm{ASSUMED_DEVICE_ARCH}0, CUDA_DEVICE_MAX_CONNECTIONS=1)",
        f"# data: {data}; create_attention_mask False; {args.num_workers} data-loader worker(s) per CP rank; "
        f"dataset indices {[b[0] for b in batches]}",
        f"# attention ms: modeled, one layer forward + backward on {hw.name} ({hw.num_heads} query / "
        f"{hw.num_kv_heads} key/value heads x {hw.head_dim}, {hw.bytes_per_element}-byte activations); key/value "
        f"tokens under the staged exchange, {_budget_words(cfg)} ({hw.kv_bytes_per_token / 1024:.0f} KiB per token); "
        "schedule B: the int64 schedule the loader ships per rank and micro-batch",
    ]


def rehearse_run(config: str, spec: RunSpec, options: Options, cache_dir: str, emit) -> list[str]:
    """Rehearse ``spec``'s data path (see module docstring): ``emit`` each line as it is ready; returns the
    closing lines (peak memory)."""
    if options.samples < 1:
        raise InputError(f"--samples must be >= 1, got {options.samples}")
    argv, said = entry_argv(spec, options, cache_dir)
    args = entry_args(argv, spec.parallel.world_size, spec.parallel.gpus_per_node)
    if args.context_parallel_mode != "fcp":
        raise InputError(f"{config}: context_parallel.mode is {args.context_parallel_mode}; rehearse runs FCP's data "
                         "hooks (mode fcp) only")
    cfg, hw = fcp_config_from_args(args), model_hardware(args, options.hardware)
    with PeakMemory() as memory:
        batches = first_micro_batches(args, options.samples)
        dataset = build_train_dataset(args, options.samples * args.micro_batch_size * args.data_parallel_size)
        for line in _preamble(config, spec, args, said, batches, hw):
            emit(line)
        plans = [plan_sample(dataset[batch[0]], cfg) for batch in batches]
        warm_up(rank_dataset(dataset, args, 0), batches[0][0])
        shipped = [read_rank(rank_dataset(dataset, args, rank), batches, args.num_workers)
                   for rank in range(cfg.cp)]  # each CP rank's loader in turn, as on its own GPU
        for number, (batch, plan) in enumerate(zip(batches, plans, strict=True)):
            for line in sample_lines(number, batch[0], plan, [rank[number] for rank in shipped], cfg, hw):
                emit(line)
    return [memory.line()]


def rehearse(config: str, spec: RunSpec, options: Options) -> list[str]:
    """:func:`rehearse_run` printing as it goes, its index cache in ``options.cache_dir`` or a temporary folder
    removed afterwards; returns the closing lines."""
    def emit(line: str) -> None:
        print(line, flush=True)

    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        cache_dir = options.cache_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="fcp-rehearse-"))
        lines = rehearse_run(config, spec, options, cache_dir, emit)
    return [*lines, f"rehearsal took {time.perf_counter() - start:.1f} s"]
