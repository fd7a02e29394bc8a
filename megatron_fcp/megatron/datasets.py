"""The training data of ``pretrain_gpt``: Megatron's GPT datasets (or FCP's mock documents), checked, and wrapped by
the FCP data hooks of one CP rank.

Shared by the training entry point (``pretrain_gpt.datasets_provider``) and the login-node rehearsal
(``python -m megatron_fcp.launch rehearse``), so that a data path that would fail on the cluster fails in both
with the same one-line :class:`InputError`:

- :func:`gpt_dataset_config`: Megatron's ``GPTDatasetConfig`` of a run, without the dense attention mask;
- :func:`check_data_path`: every ``.bin``/``.idx`` pair of the blend exists and fills every split of ``--split``,
  and its documents end with the tokenizer's end-of-document token (the document boundaries
  ``--reset-position-ids`` needs);
- :func:`build_megatron_datasets`: the train/valid/test datasets of Megatron's builder (or
  ``MockDocumentDataset``), each sample one packed sequence of the whole CP group;
- :func:`for_cp_rank` / :func:`build_datasets`: the same, as one CP rank's loader sees them (``FcpBatchDataset``
  under ``--context-parallel-mode fcp``).

megatron-core is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import os

import numpy as np

from megatron_fcp.errors import InputError
from megatron_fcp.megatron.batch import FcpBatchDataset, MockDocumentDataset
from megatron_fcp.megatron.config import fcp_config_from_args

BOUNDARY_SAMPLE_DOCS = 64
"""Documents per ``.bin``/``.idx`` pair whose last token :func:`check_data_path` reads (spread over the file)."""
DENSE_MASK_PEAK_BYTES_PER_PAIR = 4 + 4
"""Bytes per (query, key) pair of a sample that Megatron's GPTDataset holds at once while it builds the dense mask:
``torch.tril(torch.ones((s, s)))`` keeps the float32 ones and their float32 lower triangle alive together (then a
boolean copy, 1 byte per pair, is what the sample carries). Measured: 2.00 GiB more peak memory at s = 16384."""


def dense_mask_bytes(seq_length: int) -> int:
    """Peak bytes of the dense attention mask GPTDataset builds for one sample with ``create_attention_mask``."""
    return DENSE_MASK_PEAK_BYTES_PER_PAIR * seq_length * seq_length


# -- the dataset config -----------------------------------------------------------------------------------------
def build_run_tokenizer(args):
    """Megatron's tokenizer of the run (``build_tokenizer``); one :class:`InputError` line if it cannot be loaded."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    try:
        return build_tokenizer(args)
    except (OSError, ValueError, ImportError) as err:
        where = f" from {args.tokenizer_model}" if getattr(args, "tokenizer_model", None) else ""
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"--tokenizer-type {args.tokenizer_type}: cannot load the tokenizer{where} ({first}); give "
                         "--tokenizer-model a folder that holds it, or --tokenizer-type NullTokenizer --vocab-size N "
                         "for token ids < N") from None


def gpt_dataset_config(args, tokenizer=None):
    """Megatron's ``GPTDatasetConfig`` for the run in ``args`` (``tokenizer``: built from ``args`` if None).

    ``create_attention_mask`` is always False, whatever ``--create-attention-mask-in-dataloader`` says (Megatron
    turns it on by default). With it, GPTDataset builds a dense ``seq_length x seq_length`` causal mask for every
    sample: a float32 mask (64 GiB at 131072 tokens) made from a float32 matrix of ones as large, then a boolean
    copy (16 GiB) that travels with the sample; 128 GiB at once, per sample, in every data-loader worker
    (:func:`dense_mask_bytes`), a block of it rewritten per document boundary. Neither context-parallel mode reads
    it: FCP takes each document's extent from its plan and the per-document position ids, and ring mode on packed
    sequences (THD) from the document boundaries (``cu_seqlens``); its forward step builds what it needs itself.
    """
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, blend_per_split=blend_per_split,
        split=args.split, path_to_cache=args.data_cache_path, mmap_bin_files=args.mmap_bin_files,
        tokenizer=tokenizer if tokenizer is not None else build_run_tokenizer(args),
        reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss, create_attention_mask=False)


# -- data-path checks -------------------------------------------------------------------------------------------
def blend_prefixes(config) -> list[str]:
    """The ``.bin``/``.idx`` prefixes of a dataset config's blend (or blends per split), each once, in order."""
    blends = [config.blend] if config.blend is not None else list(config.blend_per_split or [])
    prefixes = [prefix for blend in blends if blend is not None for prefix in blend[0]]
    return list(dict.fromkeys(prefixes))


SPLIT_NAMES = ("train", "valid", "test")


def _check_files(prefix: str) -> None:
    missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
    if missing:
        raise InputError(f"--data-path {prefix}: no {' and no '.join(missing)}; give the prefix of an indexed "
                         "dataset made by Megatron-LM's tools/preprocess_data.py (PREFIX.bin and PREFIX.idx)")


def document_tokens(dataset) -> np.ndarray:
    """Tokens of each document of a Megatron ``IndexedDataset`` (int64, in file order)."""
    ends = np.concatenate([[0], np.cumsum(np.asarray(dataset.sequence_lengths, np.int64))])
    docs = np.asarray(dataset.document_indices, np.int64)
    return ends[docs[1:]] - ends[docs[:-1]]


def last_tokens(dataset, count: int = BOUNDARY_SAMPLE_DOCS) -> np.ndarray:
    """The last token of up to ``count`` documents spread evenly over ``dataset`` (those whose last sequence holds
    tokens)."""
    lengths = np.asarray(dataset.sequence_lengths, np.int64)
    last_sequence = np.asarray(dataset.document_indices[1:], np.int64) - 1
    last_sequence = last_sequence[last_sequence >= 0]
    last_sequence = last_sequence[lengths[last_sequence] > 0]
    picked = np.unique(np.linspace(0, last_sequence.size - 1, min(count, last_sequence.size)).astype(np.int64))
    return np.asarray([dataset.get(int(s), offset=int(lengths[s]) - 1, length=1)[0] for s in last_sequence[picked]],
                      np.int64)


def _check_splits(prefix: str, doc_tokens: np.ndarray, config) -> None:
    """Every split Megatron builds from ``prefix`` must hold tokens: on an empty one its index builder never ends
    (it adds epochs of 0 tokens until it has enough). Documents split as Megatron splits them."""
    n = doc_tokens.shape[0]
    for name, bounds in zip(SPLIT_NAMES, config.split_matrix or (), strict=False):
        if bounds is None:
            continue
        begin, end = int(round(bounds[0] * n)), int(round(bounds[1] * n))
        if doc_tokens[begin:end].sum() == 0:
            raise InputError(f"--data-path {prefix}: --split {config.split} leaves the {name} split {end - begin} of "
                             f"its {n} documents and no tokens, and Megatron's dataset builder never finishes on an "
                             f"empty split; use more documents or give the {name} split weight 0")


def _check_boundaries(prefix: str, dataset, eod: int) -> None:
    ends = last_tokens(dataset)
    wrong = int(np.count_nonzero(ends != eod))
    if wrong:
        raise InputError(f"--data-path {prefix}: {wrong} of {ends.size} documents read do not end with the "
                         f"tokenizer's end-of-document token {eod}, so packed sequences lose their document "
                         "boundaries (--reset-position-ids resets positions after that token only); tokenize with "
                         "tools/preprocess_data.py --append-eod and the run's tokenizer")


def check_data_path(config) -> None:
    """Raise :class:`InputError` (one line) where the blend of ``config`` (a ``GPTDatasetConfig``) cannot make the
    run's packed sequences: a prefix without its ``.bin`` or ``.idx`` file or without tokens, a split of
    ``--split`` left without tokens (Megatron would never finish building it), or, with ``reset_position_ids``,
    documents that do not end with the tokenizer's end-of-document token (no document boundaries).
    Object-storage prefixes are left to Megatron."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.object_storage_utils import is_object_storage_path

    for prefix in blend_prefixes(config):
        if is_object_storage_path(prefix):
            continue
        _check_files(prefix)
        dataset = IndexedDataset(prefix, multimodal=False, mmap=True)
        doc_tokens = document_tokens(dataset)
        if doc_tokens.sum() == 0:
            raise InputError(f"--data-path {prefix}: the indexed dataset holds no tokens; give a tokenized corpus")
        if config.blend is not None:
            _check_splits(prefix, doc_tokens, config)
        if config.reset_position_ids:
            _check_boundaries(prefix, dataset, int(config.tokenizer.eod))


# -- building ---------------------------------------------------------------------------------------------------
def _mock_document_datasets(args, num_samples) -> list:
    vocab = getattr(args, "padded_vocab_size", None) or args.vocab_size
    return [MockDocumentDataset(int(n), args.seq_length, args.fcp_mock_doclens, vocab, seed=args.seed + i)
            if n else None for i, n in enumerate(num_samples)]


def build_megatron_datasets(args, num_samples, tokenizer=None) -> list:
    """The ``[train, valid, test]`` datasets of the run in ``args`` (None where a split has no samples), each
    sample one packed sequence of ``--seq-length`` tokens: FCP's ``MockDocumentDataset`` for ``--mock-data``
    under FCP, else Megatron's ``MockGPTDataset`` or ``GPTDataset`` through ``BlendedMegatronDatasetBuilder``
    (every rank builds; ``num_samples`` as Megatron's ``train_val_test_num_samples``; ``tokenizer``: the run's,
    built from ``args`` if None)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    if args.context_parallel_mode == "fcp" and args.mock_data:
        return _mock_document_datasets(args, num_samples)
    config = gpt_dataset_config(args, tokenizer)
    if not args.mock_data:
        check_data_path(config)
    kind = MockGPTDataset if args.mock_data else GPTDataset
    return list(BlendedMegatronDatasetBuilder(kind, list(num_samples), lambda: True, config).build())


def for_cp_rank(datasets, args, cp_rank: int, cp_global_ranks=None) -> list:
    """``datasets`` as CP rank ``cp_rank``'s loader reads them: under FCP each wrapped by ``FcpBatchDataset``
    (this rank's planned share of every sample); in ring mode unchanged (Megatron slices in the step).
    ``cp_global_ranks``: the CP group's global ranks by CP rank, which place the CP ranks on nodes in every plan
    (``FcpConfig.with_nodes``); None: plans without a node layout."""
    if args.context_parallel_mode != "fcp":
        return list(datasets)
    cfg = fcp_config_from_args(args)
    if cp_global_ranks is not None:
        cfg = cfg.with_nodes(cp_global_ranks)
    return [FcpBatchDataset(ds, cfg, cp_rank) if ds is not None else None for ds in datasets]


def build_datasets(args, num_samples, cp_rank: int, cp_global_ranks=None) -> tuple:
    """Train/valid/test datasets of CP rank ``cp_rank`` for the run in ``args`` (what ``datasets_provider``
    returns): :func:`build_megatron_datasets`, then :func:`for_cp_rank` (``cp_global_ranks`` as there)."""
    return tuple(for_cp_rank(build_megatron_datasets(args, num_samples), args, cp_rank, cp_global_ranks))
