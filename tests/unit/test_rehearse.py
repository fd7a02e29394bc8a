"""The login-node rehearsal, ``python -m megatron_fcp.launch rehearse``, on a real Megatron indexed dataset.

The corpus is written with megatron-core's own writer (``IndexedDatasetBuilder``): documents with the lengths of
Linux kernel source files (the shipped ``linux_files`` distribution), each ending with the NullTokenizer's
end-of-document token, enough documents for every split of the config's ``969,30,1`` and enough tokens for the
samples asked. ``configs/llama3_8b.yaml`` is rehearsed as it is (131072 tokens over CP 8), with the corpus in
place of its blend and the NullTokenizer in place of its tokenizer. Megatron writes its index cache into a
temporary folder of its own.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("megatron.core")

from megatron_fcp.errors import InputError  # noqa: E402
from megatron_fcp.launch import rehearse  # noqa: E402
from megatron_fcp.launch.__main__ import main  # noqa: E402
from megatron_fcp.launch.spec import load_run_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "llama3_8b.yaml"
VOCAB = 128256
"""Llama 3's vocabulary; the NullTokenizer's end-of-document token is ``VOCAB - 1``."""
CP, SLOTS = 8, 131072 // 8
GIB = float(1 << 30)


def write_corpus(prefix: Path, num_docs: int, lengths, *, eod: int = VOCAB - 1) -> None:
    """An indexed dataset at ``prefix`` of ``num_docs`` documents of random tokens below ``eod``, each ending with
    ``eod``, their lengths taken from ``lengths`` in turn."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for n in lengths[:num_docs].tolist():
        doc = rng.integers(0, VOCAB - 1, n, dtype=np.int32)
        doc[-1] = eod
        builder.add_document(doc, [n])
    builder.finalize(f"{prefix}.idx")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """Prefix of 600 documents with Linux source-file lengths (about 2.2M tokens: 64 samples of 131072 tokens,
    the 2 micro-batches of each of the config's 32 data-parallel ranks, take about 4 epochs of the train split)."""
    from megatron_fcp.data.lengths import draw_documents, load_distribution

    lengths = draw_documents(load_distribution("linux_files"), np.random.default_rng(0), 3_000_000, skip_empty=True)
    assert lengths.size >= 600
    prefix = tmp_path_factory.mktemp("corpus") / "linux_files"
    write_corpus(prefix, 600, lengths)
    return str(prefix)


def rehearse_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_fcp.launch", "rehearse", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def entry_args(prefix: str):
    """The training entry point's parsed arguments for the config with ``prefix`` as its data (as rehearse makes
    them)."""
    options = rehearse.Options(data=prefix, null_tokenizer=VOCAB)
    argv, _ = rehearse.entry_argv(load_run_config(CONFIG), options, str(Path(prefix).parent / "cache"))
    return rehearse.entry_args(argv, world_size=256)


def parse_samples(stdout: str) -> list[list[tuple[int, int, int]]]:
    """``(rank, tokens, padding)`` of every rank row, per reported sample."""
    samples = []
    for line in stdout.splitlines():
        if line.startswith("sample "):
            samples.append([])
        elif samples and (row := re.match(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s", line)):
            samples[-1].append(tuple(int(x) for x in row.groups()))
    return samples


def test_rehearses_llama3_8b_at_full_length_on_every_cp_rank(corpus):
    result = rehearse_command(str(CONFIG), "--data", corpus, "--null-tokenizer", str(VOCAB), "--samples", "2")
    assert result.returncode == 0, result.stderr
    samples = parse_samples(result.stdout)
    assert len(samples) == 2
    for rows in samples:
        assert [rank for rank, _, _ in rows] == list(range(CP))
        assert all(tokens == SLOTS for _, tokens, _ in rows)
    assert "create_attention_mask False" in result.stdout
    assert re.search(r"the same plan on all 8 ranks; attention [\d.]+ ms modeled", result.stdout)
    peak = re.search(r"loader peak memory: ([\d.]+) GiB.*this process ([\d.]+) GiB, largest worker ([\d.]+) GiB",
                     result.stdout)
    assert peak is not None, result.stdout
    assert all(float(x) < 4.0 for x in peak.groups()), peak.group(0)


def test_the_dataset_config_builds_no_attention_mask(corpus):
    from megatron_fcp.megatron.datasets import dense_mask_bytes, gpt_dataset_config
    from megatron_fcp.megatron.pretrain_gpt import _gpt_dataset_config

    args = entry_args(corpus)
    assert args.create_attention_mask_in_dataloader  # Megatron's default: a dense mask per sample
    assert gpt_dataset_config(args).create_attention_mask is False
    assert _gpt_dataset_config(args).create_attention_mask is False
    assert dense_mask_bytes(131072) == 128 * (1 << 30)  # float32 ones and their float32 tril at once


def provider_error(args, monkeypatch, capsys) -> str:
    """What the training entry point's ``datasets_provider`` prints for ``args`` before exiting with 2."""
    import megatron.training
    from megatron.core import mpu

    from megatron_fcp.megatron.pretrain_gpt import datasets_provider

    monkeypatch.setattr(megatron.training, "get_args", lambda: args)
    monkeypatch.setattr(mpu, "get_context_parallel_rank", lambda: 0)
    monkeypatch.setattr(mpu, "get_context_parallel_global_ranks", lambda: list(range(args.context_parallel_size)))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        datasets_provider([2, 0, 0])
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_a_missing_prefix_is_one_line_and_exit_2_as_in_training(tmp_path, corpus, monkeypatch, capsys):
    missing = str(tmp_path / "no_such_corpus")
    result = rehearse_command(str(CONFIG), "--data", missing, "--null-tokenizer", str(VOCAB))
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"megatron-fcp: error: --data-path {missing}: no {missing}.bin")
    assert result.stderr == provider_error(entry_args(missing), monkeypatch, capsys)


def test_documents_without_end_of_document_tokens_fail_as_in_training(tmp_path, monkeypatch, capsys):
    prefix = tmp_path / "no_eod"
    write_corpus(prefix, 600, np.full(600, 50), eod=7)  # every document ends with 7, not with VOCAB - 1
    assert main(["rehearse", str(CONFIG), "--data", str(prefix), "--null-tokenizer", str(VOCAB)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.splitlines()) == 1
    assert out.err.startswith(f"megatron-fcp: error: --data-path {prefix}: 64 of 64 documents read do not end with "
                              f"the tokenizer's end-of-document token {VOCAB - 1}")
    assert out.err == provider_error(entry_args(str(prefix)), monkeypatch, capsys)


def test_an_empty_split_fails_instead_of_hanging_megatron(tmp_path, monkeypatch, capsys):
    prefix = tmp_path / "few_docs"
    write_corpus(prefix, 100, np.full(100, 5000))  # 969,30,1 leaves the test split round(0.1) = 0 documents
    assert main(["rehearse", str(CONFIG), "--data", str(prefix), "--null-tokenizer", str(VOCAB)]) == 2
    err = capsys.readouterr().err
    assert err == (f"megatron-fcp: error: --data-path {prefix}: --split 969,30,1 leaves the test split 0 of its 100 "
                   "documents and no tokens, and Megatron's dataset builder never finishes on an empty split; use more "
                   "documents or give the test split weight 0\n")


def test_rehearse_refuses_data_for_a_mock_config(capsys):
    assert main(["rehearse", str(ROOT / "configs" / "tiny_cpu.yaml"), "--data", "/nowhere/corpus"]) == 2
    assert "tiny_cpu trains on mock documents (data.mock_doclens)" in capsys.readouterr().err


def test_replace_flag_swaps_a_flag_and_its_values():
    argv = ["--seq-length", "8", "--data-path", "0.7", "/a", "0.3", "/b", "--split", "1,0,0", "--bf16"]
    assert rehearse.replace_flag(argv, ("--data-path",), ["--data-path", "/c"]) == [
        "--seq-length", "8", "--data-path", "/c", "--split", "1,0,0", "--bf16"]
    assert rehearse.replace_flag(argv, ("--vocab-size",), ["--vocab-size", "9"])[-2:] == ["--vocab-size", "9"]
    with pytest.raises(InputError, match="--samples must be >= 1"):
        rehearse.rehearse_run("c.yaml", load_run_config(CONFIG), rehearse.Options(samples=0), "/tmp", print)


def test_the_launch_command_still_imports_neither_torch_nor_megatron():
    code = ("import sys, megatron_fcp.launch.rehearse, megatron_fcp.launch.__main__; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
