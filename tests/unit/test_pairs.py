"""Tests for megatron_fcp.planner.pairs: exact query-key pair counts against a brute-force token count."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_fcp.planner.pairs import MASKS, block_pairs, check_mask, doc_starts, needed_kv_end, q_pairs, tri

MAX_DOC = 40
"""Documents in the brute-force tests are at most this long (the count builds a dense matrix)."""


def brute_block_pairs(q_start: int, q_end: int, k_start: int, k_end: int, mask: str) -> int:
    """Count visible pairs of queries ``[q_start, q_end)`` x keys ``[k_start, k_end)`` token by token.

    Causal: key ``j`` is visible to query ``i`` iff ``j <= i``. Full: every pair is visible.
    """
    i = np.arange(q_start, q_end)[:, None]
    j = np.arange(k_start, k_end)[None, :]
    visible = (j <= i) if mask == "causal" else np.ones((i.size, j.size), bool)
    return int(visible.sum())


def brute_q_pairs(q_start: int, q_end: int, doc_len: int, mask: str) -> int:
    """Pairs of queries ``[q_start, q_end)`` against every key of their document, token by token."""
    return brute_block_pairs(q_start, q_end, 0, doc_len, mask)


@st.composite
def doc_ranges(draw, max_doc: int = MAX_DOC):
    """A document length and two half-open ranges (query, key) inside it, empty ranges allowed."""
    doc_len = draw(st.integers(0, max_doc))
    q_start, q_end = sorted(draw(st.integers(0, doc_len)) for _ in range(2))
    k_start, k_end = sorted(draw(st.integers(0, doc_len)) for _ in range(2))
    return doc_len, q_start, q_end, k_start, k_end


# ---- tri ----


@pytest.mark.parametrize(("n", "expected"), [(0, 0), (1, 1), (2, 3), (4, 10), (128, 8256)])
def test_tri_small_values(n, expected):
    assert int(tri(n)) == expected


def test_tri_is_exact_beyond_int32_and_vectorised():
    n = np.array([2**31, 3 * 2**20, 0])
    out = tri(n)
    assert out.dtype == np.int64
    assert out.tolist() == [2**31 * (2**31 + 1) // 2, 3 * 2**20 * (3 * 2**20 + 1) // 2, 0]


# ---- block_pairs / q_pairs against brute force ----


@pytest.mark.parametrize("mask", MASKS)
@settings(max_examples=150, deadline=None)
@given(ranges=doc_ranges())
def test_block_pairs_matches_brute_force(mask, ranges):
    _, q_start, q_end, k_start, k_end = ranges
    got = block_pairs(q_start, q_end, k_start, k_end, mask)
    assert int(got) == brute_block_pairs(q_start, q_end, k_start, k_end, mask)


@pytest.mark.parametrize("mask", MASKS)
@settings(max_examples=150, deadline=None)
@given(ranges=doc_ranges())
def test_q_pairs_matches_brute_force(mask, ranges):
    doc_len, q_start, q_end, _, _ = ranges
    assert int(q_pairs(q_start, q_end, doc_len, mask)) == brute_q_pairs(q_start, q_end, doc_len, mask)


@pytest.mark.parametrize("mask", MASKS)
@settings(max_examples=30, deadline=None)
@given(batch=st.lists(doc_ranges(), min_size=1, max_size=20))
def test_pairs_broadcast_elementwise_over_arrays(mask, batch):
    doc_len, q_start, q_end, k_start, k_end = (np.array(col, dtype=np.int64) for col in zip(*batch, strict=True))
    blocks = block_pairs(q_start, q_end, k_start, k_end, mask)
    queries = q_pairs(q_start, q_end, doc_len, mask)
    assert blocks.dtype == np.int64 and queries.dtype == np.int64
    assert blocks.tolist() == [brute_block_pairs(*row[1:], mask) for row in batch]
    assert queries.tolist() == [brute_q_pairs(row[1], row[2], row[0], mask) for row in batch]


@pytest.mark.parametrize("mask", MASKS)
@settings(max_examples=100, deadline=None)
@given(ranges=doc_ranges(), data=st.data())
def test_block_pairs_add_up_over_a_key_split(mask, ranges, data):
    """Splitting the keys at any point splits the count; all keys of the document give q_pairs."""
    doc_len, q_start, q_end, k_start, k_end = ranges
    cut = data.draw(st.integers(k_start, k_end))
    whole = block_pairs(q_start, q_end, k_start, k_end, mask)
    assert whole == block_pairs(q_start, q_end, k_start, cut, mask) + block_pairs(q_start, q_end, cut, k_end, mask)
    assert block_pairs(q_start, q_end, 0, doc_len, mask) == q_pairs(q_start, q_end, doc_len, mask)


@pytest.mark.parametrize(
    ("mask", "args", "expected"),
    [
        ("causal", (0, 4, 0, 4), 10),  # the lower triangle of a 4x4 block
        ("causal", (4, 8, 0, 4), 16),  # keys wholly before the queries: a full block
        ("causal", (0, 4, 4, 8), 0),  # keys wholly after the queries: nothing
        ("causal", (2, 5, 3, 7), 3),  # queries 2,3,4 see keys {}, {3}, {3,4}
        ("full", (2, 5, 3, 7), 12),
        ("full", (0, 0, 0, 9), 0),
    ],
)
def test_block_pairs_hand_counted(mask, args, expected):
    assert int(block_pairs(*args, mask)) == expected


def test_q_pairs_of_a_long_document_is_exact():
    n = 1 << 20
    assert int(q_pairs(0, n, n, "causal")) == n * (n + 1) // 2
    assert int(q_pairs(0, n, n, "full")) == n * n
    assert int(q_pairs(n - 1, n, n, "causal")) == n


# ---- needed_kv_end / check_mask ----


def test_needed_kv_end_is_the_query_end_for_causal_and_the_document_for_full():
    assert np.asarray(needed_kv_end(np.array([3, 7]), np.array([10, 10]), "causal")).tolist() == [3, 7]
    assert np.asarray(needed_kv_end(np.array([3, 7]), np.array([10, 12]), "full")).tolist() == [10, 12]


@pytest.mark.parametrize("mask", MASKS)
def test_needed_kv_end_covers_exactly_the_keys_with_pairs(mask):
    """Every key before needed_kv_end is seen by some query of the range, and no key after it."""
    doc_len, q_start, q_end = 12, 5, 9
    end = int(needed_kv_end(q_end, doc_len, mask))
    seen = [brute_block_pairs(q_start, q_end, j, j + 1, mask) > 0 for j in range(doc_len)]
    assert seen == [j < end for j in range(doc_len)]


def test_check_mask_names_the_choices():
    assert check_mask("full") == "full"
    with pytest.raises(ValueError, match=r"unknown mask 'sliding'.*causal, full"):
        check_mask("sliding")


@settings(max_examples=200, deadline=None)
@given(lens=st.lists(st.integers(0, 50), min_size=1, max_size=200), data=st.data())
def test_doc_starts_is_the_prefix_sum_at_the_documents_asked_for(lens, data):
    """Any documents, repeated, unsorted, the first and the last included, few of many (the segment sums) or many
    of few (the prefix sum): the start a prefix sum gives."""
    lens = np.asarray(lens, np.int64)
    docs = data.draw(st.lists(st.integers(0, lens.shape[0] - 1), max_size=12))
    expected = np.concatenate([[0], np.cumsum(lens)])[np.asarray(docs, np.int64)]
    got = doc_starts(lens, docs)
    assert got.dtype == np.int64 and got.tolist() == expected.tolist()
