"""The workload of MagiAttention's published H100 context-parallel benchmark, for the simulator.

Facts from the benchmark (``megatron_fcp/data/published/magi_cp_benchmark_h100.yaml``, with quotes and line
references; ``docs/published_cp_benchmarks.md``): self-attention, batch 1, GQA 64:8:8, head dim 128, bf16,
8192 tokens per GPU (total ``8192 x cp``), masks full, causal, varlen full, varlen causal; forward and backward
timed apart on the slowest rank; ``TFLOP/s/GPU = FLOPs / (time x cp)`` with ``FLOPs_fwd = 4 x MaskArea x 64 x
128`` and ``FLOPs_bwd = 2.5 x FLOPs_fwd``.

Varlen packs (:func:`magi_packs`), the benchmark's sampler rules, paraphrased (no code copied):

1. every histogram bin ``[lo, hi]`` is ONE length, the integer midpoint ``(lo + hi) // 2``, repeated ``number``
   times (not a uniform draw inside the bin);
2. a length ``L`` becomes ``floor(L / q)`` pieces of ``q = total / 4`` tokens plus the remainder ``L mod q``
   (when non-zero); nothing is dropped;
3. the pieces are shuffled (numpy ``default_rng(seed)``, seed 42) and laid end to end; packs are consecutive
   windows of exactly ``total`` tokens, a piece crossing a window's end being cut there (its first part closes
   the pack, the rest opens the next); there are ``floor(sum / total)`` packs;
4. the packs are shuffled with the same generator and the first ``pack_num`` (20) are the masks of one data point.

The generator follows the same numpy calls in the same order (``Generator.shuffle`` of the piece array, then of
the pack list); we believe it gives the benchmark's packs, but have not checked that against the benchmark's
own output (no run here), so treat exact equality as unverified: only the rules are tested.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_fcp.data.lengths import read_histogram, resolve_lengths_source

TOKENS_PER_GPU = 8192
CP_SIZES = (8, 16, 32, 64)
MASKS = ("full", "causal", "varlen_full", "varlen_causal")
PASSES = ("fwd", "bwd")
NUM_HEADS_Q, NUM_HEADS_KV, HEAD_DIM, BYTES_PER_ELEMENT = 64, 8, 128, 2
BWD_FACTOR = 2.5
SEED = 42
PACK_NUM = 20
CHUNK_RATIO = 0.25
HISTOGRAM = "magi_hist"


def histogram_lengths(name: str = HISTOGRAM) -> tuple[np.ndarray, np.ndarray]:
    """(midpoint length per bin, documents per bin), in the file's bin order (rule 1)."""
    lows, highs, counts = read_histogram(resolve_lengths_source(name))
    return (lows + highs) // 2, counts


def pieces(lengths: np.ndarray, counts: np.ndarray, chunk_len: int) -> np.ndarray:
    """Rule 2, before the shuffle: all whole ``chunk_len`` pieces first, then the remainders bin by bin."""
    full = (lengths // chunk_len) * counts
    tails = lengths % chunk_len
    return np.concatenate([np.full(int(full.sum()), chunk_len, np.int64),
                           np.repeat(tails[tails > 0], counts[tails > 0]).astype(np.int64)])


@dataclass(frozen=True)
class PackStream:
    """All packs of one total length: the shuffled pieces laid end to end and the pack order."""

    total: int
    starts: np.ndarray
    """Start token of every shuffled piece in the stream (int64, ascending), plus the end."""
    order: np.ndarray
    """Pack indices in shuffled order."""

    def pack(self, index: int) -> np.ndarray:
        """Document lengths of pack ``order[index]``: the pieces inside the window ``[k T, (k + 1) T)``, cut at
        its ends."""
        k = int(self.order[index])
        lo, hi = k * self.total, (k + 1) * self.total
        first = int(np.searchsorted(self.starts, lo, "right")) - 1
        last = int(np.searchsorted(self.starts, hi, "left"))
        bounds = np.clip(self.starts[first:last + 1], lo, hi)
        lens = np.diff(bounds)
        return lens[lens > 0]


def pack_stream(total: int, seed: int = SEED, name: str = HISTOGRAM, chunk_ratio: float = CHUNK_RATIO) -> PackStream:
    """Rules 1-4 for packs of ``total`` tokens."""
    lengths, counts = histogram_lengths(name)
    chunk_len = int(total * chunk_ratio)
    samples = pieces(lengths, counts, chunk_len).astype(np.int32)  # the benchmark shuffles an int32 array
    rng = np.random.default_rng(seed)
    rng.shuffle(samples)
    starts = np.concatenate([[0], np.cumsum(samples, dtype=np.int64)])
    num_packs = int(starts[-1] // total)
    order = np.arange(num_packs)
    rng.shuffle(order)  # same draws as shuffling the list of packs
    return PackStream(total=total, starts=starts, order=order)


def magi_packs(cp: int, pack_num: int = PACK_NUM, seed: int = SEED, tokens_per_gpu: int = TOKENS_PER_GPU,
               name: str = HISTOGRAM) -> list[np.ndarray]:
    """The first ``pack_num`` varlen packs at ``cp`` (total ``tokens_per_gpu x cp``): int64 document lengths."""
    stream = pack_stream(tokens_per_gpu * cp, seed, name)
    return [stream.pack(i) for i in range(pack_num)]


def workload_docs(mask: str, cp: int, pack_num: int = PACK_NUM, seed: int = SEED,
                  tokens_per_gpu: int = TOKENS_PER_GPU) -> tuple[list[np.ndarray], str]:
    """(list of document-length arrays, kernel mask ``full``/``causal``) of one benchmark mask: one document of
    the whole length for ``full``/``causal`` (the benchmark's 2 repeats are identical), else the packs."""
    kernel_mask = "causal" if mask.endswith("causal") else "full"
    if mask in ("full", "causal"):
        return [np.array([tokens_per_gpu * cp], np.int64)], kernel_mask
    return magi_packs(cp, pack_num, seed, tokens_per_gpu), kernel_mask


def mask_area(lens: np.ndarray, kernel_mask: str) -> float:
    """The blog's MaskArea: sum over documents of ``n^2`` (full) or ``n (n + 1) / 2`` (causal)."""
    n = np.asarray(lens, dtype=np.float64)
    return float((n * (n + 1) / 2).sum() if kernel_mask == "causal" else (n * n).sum())


def blog_flops(lens: np.ndarray, kernel_mask: str, pass_: str, heads: int = NUM_HEADS_Q,
               head_dim: int = HEAD_DIM) -> float:
    """The blog's FLOPs: ``4 x MaskArea x heads x head_dim`` forward, 2.5 times that backward."""
    fwd = 4.0 * mask_area(lens, kernel_mask) * heads * head_dim
    return fwd * (BWD_FACTOR if pass_ == "bwd" else 1.0)


def tflops_per_gpu(lens: np.ndarray, kernel_mask: str, pass_: str, cp: int, seconds: float) -> float:
    """The blog's throughput: FLOPs / (slowest rank's seconds x cp), in TFLOP/s."""
    return blog_flops(lens, kernel_mask, pass_) / (seconds * cp) / 1e12
