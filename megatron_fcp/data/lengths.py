"""Document-length distributions and pretraining-style packing of micro-batches.

A length distribution is an endless, seeded stream of document lengths in tokens. `pack_batches` concatenates
the stream into micro-batches of exactly `num_tokens` tokens, cutting the document that crosses each batch
boundary, as a pretraining data loader does. Each batch is an int64 array of the lengths of the document
pieces it holds, in order.
"""

import csv
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from megatron_fcp.errors import InputError
from megatron_fcp.planner.pairs import arange_within

SHIPPED = {
    "linux_files": "linux-6.1.192_files_cl100k.txt",
    "linux_dirs": "linux-6.1.192_dirs_cl100k.txt",
    "spamassassin": "spamassassin_cl100k.txt",
    "magi_hist": "magiattention_doc_length_histogram.csv",
}

_HISTOGRAM_CHUNK = 1 << 16
MAX_LENGTH = 1 << 40
"""Largest document length (and histogram bound or count) read from a file: 2^40 tokens, far above any real
document, so that sums of many of them stay inside int64."""
_INTEGER = re.compile(r"[+-]?[0-9]+")
_COUNT = re.compile(r"[0-9]+")
_RANGE = re.compile(r"\[\s*([0-9]+)\s*,\s*([0-9]+)\s*\]")


def resolve_lengths_source(name_or_path: str | Path) -> Path:
    """Return the file behind a shipped short name (a key of `SHIPPED`) or an existing file path."""
    if isinstance(name_or_path, str) and name_or_path in SHIPPED:
        return Path(str(resources.files("megatron_fcp") / "data" / "doclens" / SHIPPED[name_or_path]))
    path = Path(name_or_path)
    if not path.is_file():
        raise InputError(
            f"lengths source {str(name_or_path)!r} is neither a shipped name ({', '.join(SHIPPED)}) "
            "nor an existing file; pass one of those names or the path of a lengths file"
        )
    return path


def _data_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (line number, stripped text) of the lines of `path` that are neither blank nor '#' comments."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; pass an existing lengths file") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read it ({err.strerror}); pass a readable lengths file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (a binary file?); pass a text file with one document "
                         "length per line") from None
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise InputError(f"{path}:{line}: holds NUL bytes (a binary file?); pass a text file with one document "
                         "length per line")
    for line_number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            yield line_number, stripped


def _parse_length(path: Path, line_number: int, text: str) -> int:
    """Parse one document length, naming the file and line in any error."""
    if not _INTEGER.fullmatch(text):
        raise InputError(
            f"{path}:{line_number}: {_clip(text)!r} is not an integer; each line must hold one document length "
            "in tokens (or start with '#')"
        )
    if len(text.lstrip("+-0")) > 19:  # more digits than any int64; int() would also take long on millions
        raise InputError(f"{path}:{line_number}: document length {_clip(text)} is above {MAX_LENGTH}, the largest "
                         "a length may be")
    length = int(text)
    if length < 0:
        raise InputError(f"{path}:{line_number}: negative document length {length}; lengths must be >= 0")
    if length > MAX_LENGTH:
        raise InputError(f"{path}:{line_number}: document length {length} is above {MAX_LENGTH}, the largest "
                         "a length may be")
    return length


def _clip(text: str, width: int = 40) -> str:
    """``text`` cut to ``width`` characters for a message."""
    return text if len(text) <= width else text[:width] + "..."


def read_lengths(path: str | Path) -> np.ndarray:
    """Read a lengths file: one integer (tokens of one document) per line; '#' and blank lines are skipped.

    Returns an int64 array in file order. Raises InputError naming the file and line for a missing, unreadable,
    binary or empty file, a line that is not an integer, a negative length or one above :data:`MAX_LENGTH` (and for
    lengths that add up to more). Zero lengths (empty documents) are kept.
    """
    path = Path(path)
    lengths = [_parse_length(path, number, text) for number, text in _data_lines(path)]
    if not lengths:
        raise InputError(f"{path}: holds no lengths; put one document length per line")
    if sum(lengths) > MAX_LENGTH:
        raise InputError(f"{path}: its lengths add up to {sum(lengths)} tokens, above {MAX_LENGTH}; pass fewer or "
                         "shorter documents")
    return np.asarray(lengths, dtype=np.int64)


class LengthDistribution(ABC):
    """A seeded, endless stream of document lengths in tokens."""

    @abstractmethod
    def chunks(self, rng: np.random.Generator) -> Iterator[np.ndarray]:
        """Yield int64 arrays of document lengths forever, in drawing order."""

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Return the first `n` document lengths of the stream drawn with `rng` (int64)."""
        drawn, num_drawn = [], 0
        for chunk in self.chunks(rng):
            if num_drawn >= n:
                break
            drawn.append(chunk[: n - num_drawn])
            num_drawn += len(drawn[-1])
        return np.concatenate(drawn) if drawn else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class EmpiricalLengths(LengthDistribution):
    """The documents of a lengths file, walked in a random order that is reshuffled at every pass."""

    lengths: np.ndarray
    """int64 document lengths, in file order."""
    source: str = "<array>"
    """Where the lengths came from, for messages."""

    def __post_init__(self) -> None:
        if len(self.lengths) == 0 or int(self.lengths.sum()) == 0:
            raise InputError(f"{self.source}: no document has any tokens; packing needs non-empty documents")

    @classmethod
    def from_file(cls, path: str | Path) -> "EmpiricalLengths":
        """Load the lengths of `path` (see `read_lengths`)."""
        return cls(read_lengths(path), source=str(path))

    def chunks(self, rng: np.random.Generator) -> Iterator[np.ndarray]:
        """Yield one fresh permutation of all documents per pass."""
        while True:
            yield rng.permutation(self.lengths)


@dataclass(frozen=True, eq=False)
class HistogramLengths(LengthDistribution):
    """Lengths drawn from a histogram: a bin by its count, then uniformly within its inclusive bounds."""

    lows: np.ndarray
    """int64 smallest length of each bin."""
    highs: np.ndarray
    """int64 largest length of each bin (inclusive)."""
    counts: np.ndarray
    """int64 number of documents in each bin."""
    source: str = "<histogram>"
    """Where the histogram came from, for messages."""

    def __post_init__(self) -> None:
        if int(self.counts[self.highs > 0].sum()) == 0:
            raise InputError(
                f"{self.source}: no bin with documents has tokens; packing needs non-empty documents"
            )

    @classmethod
    def from_file(cls, path: str | Path) -> "HistogramLengths":
        """Load a histogram csv with columns `range` (like "[0, 10]") and `number` (documents per bin)."""
        lows, highs, counts = read_histogram(path)
        return cls(lows, highs, counts, source=str(path))

    def chunks(self, rng: np.random.Generator) -> Iterator[np.ndarray]:
        """Yield fixed-size chunks of independently drawn lengths."""
        weights = self.counts / self.counts.sum()
        while True:
            bins = rng.choice(len(weights), size=_HISTOGRAM_CHUNK, p=weights)
            yield rng.integers(self.lows[bins], self.highs[bins], endpoint=True, dtype=np.int64)


def _parse_bin(path: Path, line_number: int, row: dict) -> tuple[int, int, int]:
    """Parse one histogram row into (low, high, count), naming the file and line in any error."""
    match = _RANGE.fullmatch((row.get("range") or "").strip())
    count_text = (row.get("number") or "").strip()
    if not match or not _COUNT.fullmatch(count_text):
        raise InputError(
            f'{path}:{line_number}: expected a range like "[0, 10]" and a non-negative integer number, '
            f"got range={row.get('range')!r} number={row.get('number')!r}"
        )
    if max(len(match[1]), len(match[2]), len(count_text)) > 19 or max(
            int(match[1]), int(match[2]), int(count_text)) > MAX_LENGTH:
        raise InputError(f"{path}:{line_number}: a bound or number above {MAX_LENGTH}, the largest this reads")
    low, high = int(match[1]), int(match[2])
    if low > high:
        raise InputError(
            f"{path}:{line_number}: range [{low}, {high}] is empty; write [low, high] with low <= high"
        )
    return low, high, int(count_text)


def read_histogram(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a length-histogram csv; return int64 arrays (lows, highs, counts), bounds inclusive."""
    path = Path(path)
    numbered = list(_data_lines(path))
    if not numbered:
        raise InputError(f"{path}: is empty; a histogram csv needs a header and one row per bin")
    reader = csv.DictReader([text for _, text in numbered])
    if not {"range", "number"} <= set(reader.fieldnames):
        raise InputError(f"{path}:{numbered[0][0]}: the header must name the columns 'range' and 'number'")
    bins = [_parse_bin(path, number, row) for (number, _), row in zip(numbered[1:], reader, strict=True)]
    if not bins or sum(count for _, _, count in bins) == 0:
        raise InputError(f"{path}: holds no documents; give at least one bin a positive number")
    return tuple(np.asarray(column, dtype=np.int64) for column in zip(*bins, strict=True))


def load_distribution(name_or_path: str | Path) -> LengthDistribution:
    """Load a shipped name or file: a .csv file as a histogram, anything else as a lengths file."""
    path = resolve_lengths_source(name_or_path)
    if path.suffix.lower() == ".csv":
        return HistogramLengths.from_file(path)
    return EmpiricalLengths.from_file(path)


def _check_positive(name: str, value: int) -> None:
    """Raise InputError unless `value` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise InputError(f"{name} must be an integer >= 1, got {value!r}")


def draw_documents(dist: LengthDistribution, rng: np.random.Generator, num_tokens: int, *,
                   skip_empty: bool = False) -> np.ndarray:
    """Draw documents from ``dist`` until they hold ``num_tokens`` tokens; cut the last one so the sum is exactly
    that. Zero-length documents are kept as 0 entries unless ``skip_empty``. Returns int64 lengths in order."""
    _check_positive("num_tokens", num_tokens)
    drawn, num_drawn = [], 0
    chunks = dist.chunks(rng)
    while num_drawn < num_tokens:
        chunk = next(chunks)
        drawn.append(chunk[chunk > 0] if skip_empty else chunk)
        num_drawn += int(drawn[-1].sum())
    docs = np.concatenate(drawn)
    ends = np.cumsum(docs)
    num_docs = int(np.searchsorted(ends, num_tokens, side="left")) + 1
    docs = docs[:num_docs].astype(np.int64)  # a copy: the last document is cut in place
    docs[-1] -= ends[num_docs - 1] - num_tokens
    return docs


def _cut_at_boundaries(docs: np.ndarray, num_tokens: int, num_batches: int) -> list[np.ndarray]:
    """Cut a document sequence of num_tokens * num_batches tokens into batches of num_tokens tokens."""
    ends = np.cumsum(docs)
    starts = ends - docs
    first_batch = starts // num_tokens
    last_batch = np.where(docs > 0, (ends - 1) // num_tokens, first_batch)
    num_pieces = last_batch - first_batch + 1
    doc_of_piece = np.repeat(np.arange(len(docs)), num_pieces)
    piece_in_doc = arange_within(num_pieces)
    batch_of_piece = first_batch[doc_of_piece] + piece_in_doc
    piece_starts = np.maximum(starts[doc_of_piece], batch_of_piece * num_tokens)
    piece_ends = np.minimum(ends[doc_of_piece], (batch_of_piece + 1) * num_tokens)
    splits = np.searchsorted(batch_of_piece, np.arange(1, num_batches), side="left")
    return np.split(piece_ends - piece_starts, splits)


def pack_batches(dist: LengthDistribution, num_tokens: int, num_batches: int, seed: int) -> list[np.ndarray]:
    """Pack documents drawn from `dist` into `num_batches` micro-batches of exactly `num_tokens` tokens.

    Documents are drawn in order with `numpy.random.default_rng(seed)` and concatenated. The document that
    crosses a batch boundary is cut there and its rest starts the next batch; a rest longer than a batch fills
    whole batches. Zero-length documents are kept as 0 entries. Returns one int64 array of piece lengths per
    batch; each sums to `num_tokens`. The same seed gives the same batches.
    """
    _check_positive("num_tokens", num_tokens)
    _check_positive("num_batches", num_batches)
    rng = np.random.default_rng(seed)
    docs = draw_documents(dist, rng, num_tokens * num_batches)
    return _cut_at_boundaries(docs, num_tokens, num_batches)
