"""The round-after relay (megatron_fcp.planner.relay) against token-by-token expansions of small plans: every
token that moves arrives once at the place the direct plan puts it, a relay holds what it serves in the round it
serves it (at the stated place of its staging order and stage buffer, the buffer as the engine's schedule lays it
out), relays stay inside a node, and the tokens left on InfiniBand are the counts of
scripts/node_relay_potential.py."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_fcp.attention.schedule import build_schedule
from megatron_fcp.data.lengths import load_distribution, pack_batches
from megatron_fcp.errors import InputError
from megatron_fcp.planner.api import make_plan
from megatron_fcp.planner.columns import Piece, Transfer
from megatron_fcp.planner.relay import MOVEMENTS, OWN, TRANSFER_COLS, inter_node_tokens, relay_figures, relay_transfers
from megatron_fcp.planner.stages import resolve_kv_budget, split_stages

CASES = [  # (lengths, cp, CP ranks per node, tokens per rank)
    ("random", 4, 2, 192),
    ("random", 8, 4, 256),
    ("magi_hist", 8, 4, 256),
    ("linux_dirs", 6, 3, 256),
    ("linux_files", 16, 4, 128),
    ("spamassassin", 16, 2, 128),
]
BUDGETS = ("auto", 7, None)


def _plan(lengths: str, cp: int, tokens_per_rank: int, mask: str):
    if lengths == "random":
        lens = np.random.default_rng(cp).integers(1, 2 * tokens_per_rank, 60)
        lens = lens[np.cumsum(lens) <= cp * tokens_per_rank]
    else:
        (lens,) = pack_batches(load_distribution(lengths), cp * tokens_per_rank, 1, seed=1)
    return make_plan(lens, cp, tokens_per_rank, mask)


def _expand(start: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per token of ranges ``[start, start + length)``: its range and its offset inside it."""
    row = np.repeat(np.arange(start.shape[0]), length)
    return row, np.arange(row.shape[0]) - np.repeat(np.cumsum(length) - length, length)


class Tokens:
    """What the direct plan places where, one entry per token: the key/values every rank owns (``own``: its
    local index) and every token every rank holds in a stage (``held``: stage, backward round, staging position,
    row of the stage buffer as the engine's schedule lays it out, owner)."""

    def __init__(self, plan, budget):
        self.plan = plan
        self.span, self.num_docs = int(plan.doc_lens.max()) + 1, plan.doc_lens.shape[0]
        own = [(r, d, t, i) for r in range(plan.cp)
               for i, (d, t) in enumerate((d, t) for d, s, e in plan.for_rank(r).q for t in range(s, e))]
        rank, doc, token, local = np.array(own, np.int64).reshape(-1, 4).T
        self.own_key, self.own_local, self.own_rank = self._sorted(self.key(rank, doc, token), local, rank)
        by_local = {(r, i): (d, t) for r, d, t, i in own}
        p = plan.pieces
        index, offset, length, stage, n = split_stages(p[:, Piece.POS], p[:, Piece.END] - p[:, Piece.START],
                                                       p[:, Piece.TOTAL], budget)
        sub, i = _expand(offset, length)
        piece = index[sub]
        rank, doc = p[piece, Piece.DST], p[piece, Piece.DOC]
        token = p[piece, Piece.START] + offset[sub] + i
        rows = {}  # (rank, doc, token) -> (stage, row): the schedule's stage buffers
        for r in range(plan.cp):
            for j, st in enumerate(build_schedule(plan.for_rank(r), "cpu", budget).stages):
                for src, a, b, src_offset in st.recv:
                    for row in range(a, b):
                        rows[(r, *by_local[src, src_offset + row - a])] = (j, row)
        buf_stage, buf_row = np.array([rows[key] for key in zip(rank.tolist(), doc.tolist(), token.tolist(),
                                                                strict=True)], np.int64).reshape(-1, 2).T
        np.testing.assert_array_equal(buf_stage, stage[sub])
        (self.held_key, self.held_stage, self.held_round, self.held_pos, self.held_row, self.held_owner,
         self.held_rank, self.held_doc, self.held_token) = self._sorted(
            self.key(rank, doc, token), stage[sub], n[sub] - 1 - stage[sub], p[piece, Piece.POS] + offset[sub] + i,
            buf_row, p[piece, Piece.SRC], rank, doc, token)
        assert np.all(np.diff(self.held_key) > 0), "a rank holds each token once"

    def key(self, rank, doc, token):
        return (rank * self.num_docs + doc) * self.span + token

    @staticmethod
    def _sorted(key, *columns):
        order = np.argsort(key, kind="stable")
        return (key[order], *(c[order] for c in columns))

    def find(self, sorted_key, key):
        """Indices of ``key`` in ``sorted_key``; asserts that every one is there."""
        at = np.minimum(np.searchsorted(sorted_key, key), sorted_key.shape[0] - 1)
        assert np.array_equal(sorted_key[at], key), "a token is not where the transfer says"
        return at

    def rounds(self, movement):
        return self.held_stage if movement == "forward" else self.held_round


def _ends(t: np.ndarray, movement: str):
    """The columns of the end that holds the sub-piece (near) and of the other end (far)."""
    dst = (Transfer.DST, Transfer.DST_STAGE, Transfer.DST_POS, Transfer.DST_OFFSET)
    src = (Transfer.SRC, Transfer.SRC_STAGE, Transfer.SRC_POS, Transfer.SRC_OFFSET)
    near, far = (src, dst) if movement == "gradients" else (dst, src)
    return [t[:, c] for c in near], [t[:, c] for c in far]


def _check(plan, budget_setting, gpus_per_node: int, movement: str, tokens: Tokens, hop: bool = False
           ) -> np.ndarray:
    """Checks (1)-(3) of one movement: coverage, what a relay holds, relays inside nodes only (with ``hop``, (5):
    the same-round hop's)."""
    budget = resolve_kv_budget(budget_setting, int(plan.num_tokens.max()))
    cp_node = np.arange(plan.cp) // gpus_per_node
    t = relay_transfers(plan.pieces, cp_node, budget, movement, hop=hop)
    hopped = t[:, Transfer.PHASE] == 1
    assert np.all(np.isin(t[:, Transfer.PHASE], (0, 1))) and (hop or not hopped.any())
    if hopped.any():
        _check_hops(t, hopped, tokens, movement, cp_node)
    assert t.dtype == np.int64 and t.shape[1] == len(TRANSFER_COLS)
    assert np.all(t[:, Transfer.END] > t[:, Transfer.START])
    row, i = _expand(t[:, Transfer.START], t[:, Transfer.END] - t[:, Transfer.START])
    t_tok, token = t[row], t[row, Transfer.START] + i
    doc = t_tok[:, Transfer.DOC]
    (n_rank, n_stage, n_pos, n_off), (f_rank, f_stage, f_pos, f_off) = _ends(t_tok, movement)
    rounds = tokens.rounds(movement)
    # (1) every token that moves, once, at the direct plan's stage, staging position and buffer row
    moving = rounds >= 1 if movement == "refetch" else np.ones(rounds.shape, bool)
    near_key = tokens.key(n_rank, doc, token)
    np.testing.assert_array_equal(np.sort(near_key), tokens.held_key[moving])
    at = tokens.find(tokens.held_key, near_key)
    np.testing.assert_array_equal(n_stage, tokens.held_stage[at])
    np.testing.assert_array_equal(n_pos + i, tokens.held_pos[at])
    np.testing.assert_array_equal(n_off + i, tokens.held_row[at])
    np.testing.assert_array_equal(t_tok[:, Transfer.ROUND], rounds[at])
    np.testing.assert_array_equal(t_tok[:, Transfer.OWNER], tokens.held_owner[at])
    # from (to) the owner: its own key/values at their local index
    direct = f_stage == OWN
    assert np.all(f_pos[direct] == OWN) and np.array_equal(f_rank[direct], t_tok[direct, Transfer.OWNER])
    own_at = tokens.find(tokens.own_key, tokens.key(f_rank, doc, token)[direct])
    np.testing.assert_array_equal(f_off[direct] + i[direct], tokens.own_local[own_at])
    # (2) a relay holds the token in the round before (forward, refetch) or after (gradients), where stated
    relay = ~direct & (t_tok[:, Transfer.PHASE] == 0)
    held = tokens.find(tokens.held_key, tokens.key(f_rank, doc, token)[relay])
    np.testing.assert_array_equal(f_stage[relay], tokens.held_stage[held])
    np.testing.assert_array_equal(f_pos[relay] + i[relay], tokens.held_pos[held])
    np.testing.assert_array_equal(f_off[relay] + i[relay], tokens.held_row[held])
    step = 1 if movement == "gradients" else -1
    np.testing.assert_array_equal(rounds[held], t_tok[relay, Transfer.ROUND] + step)
    if movement == "refetch":
        assert np.all(rounds[held] >= 1), "never from the kept stage"
    # (3) relays only between node-mates, only for tokens owned on another node
    assert np.all(cp_node[f_rank[relay]] == cp_node[n_rank[relay]]) and np.all(f_rank[relay] != n_rank[relay])
    assert np.all(cp_node[t_tok[relay, Transfer.OWNER]] != cp_node[n_rank[relay]])
    # the tie-break: no node-mate nearer after the receiver (cyclically) holds the token in that round
    distance = (f_rank[relay] - n_rank[relay]) % plan.cp
    for d in range(1, plan.cp):
        mate = (n_rank[relay] + d) % plan.cp
        nearer = (d < distance) & (cp_node[mate] == cp_node[n_rank[relay]])
        key = tokens.key(mate, doc[relay], token[relay])[nearer]
        at = np.minimum(np.searchsorted(tokens.held_key, key), tokens.held_key.shape[0] - 1)
        assert not np.any((tokens.held_key[at] == key) & (rounds[at] == t_tok[relay, Transfer.ROUND][nearer] + step))
    return t


def _check_hops(t: np.ndarray, hopped: np.ndarray, tokens: Tokens, movement: str, cp_node: np.ndarray) -> None:
    """(5) A hop: the token at the direct plan's place of the receiver; the lander, a node-mate, holds it in the
    same round at the stated place and receives it from its owner (on another node) in the round's first phase."""
    row, i = _expand(t[hopped, Transfer.START], t[hopped, Transfer.END] - t[hopped, Transfer.START])
    h = t[hopped][row]
    token, doc, rnd = h[:, Transfer.START] + i, h[:, Transfer.DOC], h[:, Transfer.ROUND]
    rank, lander, owner = h[:, Transfer.DST], h[:, Transfer.SRC], h[:, Transfer.OWNER]
    assert np.all(cp_node[lander] == cp_node[rank]) and np.all(lander != rank)
    assert np.all(cp_node[owner] != cp_node[rank])
    held = tokens.find(tokens.held_key, tokens.key(lander, doc, token))
    np.testing.assert_array_equal(tokens.rounds(movement)[held], rnd)
    np.testing.assert_array_equal(h[:, Transfer.SRC_STAGE], tokens.held_stage[held])
    np.testing.assert_array_equal(h[:, Transfer.SRC_POS] + i, tokens.held_pos[held])
    np.testing.assert_array_equal(h[:, Transfer.SRC_OFFSET] + i, tokens.held_row[held])
    # the lander's own copy: from the owner, first phase
    first = t[~hopped]
    row1, i1 = _expand(first[:, Transfer.START], first[:, Transfer.END] - first[:, Transfer.START])
    got = set(zip(first[row1, Transfer.DST].tolist(), first[row1, Transfer.DOC].tolist(),
                  (first[row1, Transfer.START] + i1).tolist(), first[row1, Transfer.SRC].tolist(), strict=True))
    assert all((g, d, k, o) in got for g, d, k, o in zip(lander.tolist(), doc.tolist(), token.tolist(),
                                                          owner.tolist(), strict=True))


def _copies_left(tokens: Tokens, movement: str, cp_node: np.ndarray, hop: bool = False) -> int:
    """Inter-node token copies with no copy on the node in the partner round (gradients: the round after; the
    others: the round before), counted directly."""
    rounds = tokens.rounds(movement)
    inter = cp_node[tokens.held_rank] != cp_node[tokens.held_owner]
    if movement == "refetch":
        inter &= rounds >= 1
    node_key = (cp_node[tokens.held_rank] * tokens.num_docs + tokens.held_doc) * tokens.span + tokens.held_token
    copies = set(zip(node_key[inter].tolist(), rounds[inter].tolist(), strict=True))
    step = 1 if movement == "gradients" else -1
    if hop and movement != "gradients":  # once per (node, token, round) unless a node-mate of each copy had it
        holders: dict[tuple[int, int], set[int]] = {}
        for k, r, g in zip(node_key[inter].tolist(), rounds[inter].tolist(), tokens.held_rank[inter].tolist(),
                           strict=True):
            holders.setdefault((k, r), set()).add(g)
        return sum(any(not (holders.get((k, r + step), set()) - {g}) for g in group)
                   for (k, r), group in holders.items())
    if movement == "gradients":  # capped: each node-mate copy one round later takes one copy's partial
        holders = {}
        for k, r, g in zip(node_key[inter].tolist(), rounds[inter].tolist(), tokens.held_rank[inter].tolist(),
                           strict=True):
            holders.setdefault((k, r), []).append(g)
        cp = cp_node.shape[0]
        taken = 0
        for (k, r), group in holders.items():
            later = holders.get((k, r + 1), [])
            if later:  # each copy picks the first later holder after it; that holder takes one of them
                taken += len({min(later, key=lambda h, g=g: (h - g) % cp) for g in group})
        return int(inter.sum()) - taken
    left = [(k, r + step) not in copies for k, r in zip(node_key[inter].tolist(), rounds[inter].tolist(), strict=True)]
    return int(np.sum(left))


@pytest.fixture(scope="module")
def potential(load_script):
    return load_script("node_relay_potential")


def _one_partial_per_row(t: np.ndarray, budget, tokens: Tokens, cp_node: np.ndarray) -> int:
    """The cap on gradient relays: a rank receives at most one node-mate's partial gradient per row of a stage, so
    the relayed-gradient buffer of a round holds at most one stage (``budget`` tokens, or the rank's whole order
    without a budget). Returns the gradient copies the cap sent to their owners instead (a node-mate one round
    later held the token, but a nearer copy took it)."""
    relayed = t[t[:, Transfer.DST_STAGE] != OWN]
    row, i = _expand(relayed[:, Transfer.START], relayed[:, Transfer.END] - relayed[:, Transfer.START])
    key = np.column_stack([relayed[row, Transfer.DST], relayed[row, Transfer.DST_STAGE],
                           relayed[row, Transfer.DST_OFFSET] + i])
    assert np.unique(key, axis=0).shape[0] == key.shape[0], "two partial gradients for one row"
    figures = relay_figures(tokens.plan.pieces, cp_node, budget, tokens.plan.cp)
    most = budget if budget is not None else int(tokens.plan.pieces[:, Piece.TOTAL].max(initial=0))
    assert figures["peak_relayed_grad_tokens"].max(initial=0) <= most
    # the copies with a later node-mate copy that still go to their owner across nodes
    direct = t[(t[:, Transfer.DST_STAGE] == OWN) & (cp_node[t[:, Transfer.SRC]] != cp_node[t[:, Transfer.DST]])]
    row, i = _expand(direct[:, Transfer.START], direct[:, Transfer.END] - direct[:, Transfer.START])
    node = cp_node[direct[row, Transfer.SRC]]
    later = set(zip(cp_node[tokens.held_rank].tolist(), tokens.held_doc.tolist(), tokens.held_token.tolist(),
                    tokens.held_round.tolist(), strict=True))
    return sum((n, d, k, r + 1) in later for n, d, k, r in zip(
        node.tolist(), direct[row, Transfer.DOC].tolist(), (direct[row, Transfer.START] + i).tolist(),
        direct[row, Transfer.ROUND].tolist(), strict=True))


@pytest.mark.parametrize("lengths,cp,gpus_per_node,tokens_per_rank", CASES)
@pytest.mark.parametrize("mask", ["causal", "full"])
def test_relays_deliver_the_direct_plan_and_leave_the_potential_on_infiniband(potential, lengths, cp, gpus_per_node,
                                                                               tokens_per_rank, mask):
    plan = _plan(lengths, cp, tokens_per_rank, mask)
    cp_node = np.arange(cp) // gpus_per_node
    capped = 0
    for setting in BUDGETS:
        budget = resolve_kv_budget(setting, int(plan.num_tokens.max()))
        tokens = Tokens(plan, budget)
        for movement in MOVEMENTS:
            t = _check(plan, setting, gpus_per_node, movement, tokens)
            # (4) the inter-node tokens: the copies with no node-mate copy in the partner round, and the script's
            # round-after share
            shares = potential.relay_shares(plan, movement, gpus_per_node, setting)
            one_node = relay_transfers(plan.pieces, np.zeros(cp, np.int64), budget, movement)
            assert inter_node_tokens(one_node, cp_node) == shares["inter_node_tokens"]
            left = inter_node_tokens(t, cp_node)
            assert left == _copies_left(tokens, movement, cp_node)
            if movement == "gradients":
                capped += _one_partial_per_row(t, budget, tokens, cp_node)
            if shares["inter_node_tokens"]:
                assert left == round(shares["round after"] * shares["inter_node_tokens"]), (setting, movement)
    if (lengths, cp, mask) in (("linux_files", 16, "causal"), ("magi_hist", 8, "full")):
        assert capped > 0, "the cap never engaged: the check above proves nothing here"


@pytest.mark.parametrize("lengths,cp,gpus_per_node,tokens_per_rank", CASES)
@pytest.mark.parametrize("mask", ["causal", "full"])
def test_the_same_round_hop_brings_a_token_into_a_node_once_a_round(lengths, cp, gpus_per_node, tokens_per_rank,
                                                                    mask):
    plan = _plan(lengths, cp, tokens_per_rank, mask)
    cp_node = np.arange(cp) // gpus_per_node
    hops = 0
    for setting in BUDGETS:
        budget = resolve_kv_budget(setting, int(plan.num_tokens.max()))
        tokens = Tokens(plan, budget)
        for movement in MOVEMENTS:
            t = _check(plan, setting, gpus_per_node, movement, tokens, hop=True)
            hops += int((t[:, Transfer.PHASE] == 1).sum())
            without = relay_transfers(plan.pieces, cp_node, budget, movement)
            if movement == "gradients":  # gradients keep the round-after rule
                np.testing.assert_array_equal(t, without)
                continue
            left = inter_node_tokens(t, cp_node)
            assert left == _copies_left(tokens, movement, cp_node, hop=True) <= inter_node_tokens(without, cp_node)
            # every token crosses into a node at most once per round
            across = t[cp_node[t[:, Transfer.SRC]] != cp_node[t[:, Transfer.DST]]]
            row, i = _expand(across[:, Transfer.START], across[:, Transfer.END] - across[:, Transfer.START])
            key = np.column_stack([cp_node[across[row, Transfer.DST]], across[row, Transfer.DOC],
                                   across[row, Transfer.START] + i, across[row, Transfer.ROUND]])
            assert np.unique(key, axis=0).shape[0] == key.shape[0]
    assert hops > 0


def _direct(plan, budget, movement) -> np.ndarray:
    """The direct plan's transfers, one per moving sub-piece, built here from the pieces."""
    p = plan.pieces
    index, offset, length, stage, n = split_stages(p[:, Piece.POS], p[:, Piece.END] - p[:, Piece.START],
                                                   p[:, Piece.TOTAL], budget)
    rnd = stage if movement == "forward" else n - 1 - stage
    keep = rnd >= 1 if movement == "refetch" else np.ones(rnd.shape, bool)
    owner, rank = p[index, Piece.SRC], p[index, Piece.DST]
    near = np.column_stack([rank, stage, p[index, Piece.POS] + offset])
    far = np.column_stack([owner, np.full_like(owner, OWN), np.full_like(owner, OWN),
                           p[index, Piece.SRC_OFFSET] + offset])
    start = p[index, Piece.START] + offset
    rows = np.column_stack([near[:, 0], near[:, 1], near[:, 2], far, p[index, Piece.DOC], start, start + length,
                            rnd, owner])[keep]
    return rows[np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0]))]


@pytest.mark.parametrize("mask", ["causal", "full"])
@pytest.mark.parametrize("setting", BUDGETS)
def test_without_node_mates_every_sub_piece_comes_from_its_owner(mask, setting):
    plan = _plan("magi_hist", 8, 256, mask)
    budget = resolve_kv_budget(setting, int(plan.num_tokens.max()))
    for cp_node in (np.zeros(8, np.int64), np.arange(8), np.arange(8) // 4):
        for movement in MOVEMENTS:
            t = relay_transfers(plan.pieces, cp_node, budget, movement)
            (n_rank, n_stage, n_pos, _), far = _ends(t, movement)
            got = np.column_stack([n_rank, n_stage, n_pos, *far, t[:, [Transfer.DOC, Transfer.START, Transfer.END,
                                                                      Transfer.ROUND, Transfer.OWNER]]])
            if cp_node.max() in (0, 7):  # one node, or one rank per node: the direct plan, row for row
                np.testing.assert_array_equal(got, _direct(plan, budget, movement))
            # inside a node, always from the owner
            same = cp_node[t[:, Transfer.OWNER]] == cp_node[n_rank]
            assert np.all(far[1][same] == OWN) and np.array_equal(far[0][same], t[same, Transfer.OWNER])


def test_transfers_are_a_function_of_the_pieces_cp_node_and_budget():
    plan = _plan("linux_files", 16, 128, "causal")
    budget = resolve_kv_budget("auto", int(plan.num_tokens.max()))
    cp_node = np.arange(16) // 4
    shuffled = plan.pieces[np.random.default_rng(0).permutation(plan.pieces.shape[0])]
    for movement in MOVEMENTS:
        t = relay_transfers(plan.pieces, cp_node, budget, movement)
        np.testing.assert_array_equal(t, relay_transfers(plan.pieces.copy(), cp_node.copy(), budget, movement))
        np.testing.assert_array_equal(t, relay_transfers(shuffled, cp_node.tolist(), budget, movement))
        assert np.any(t[:, Transfer.SRC_STAGE if movement != "gradients" else Transfer.DST_STAGE] != OWN)


def test_cp256_linux_files_leaves_the_potential_on_infiniband(potential):
    (lens,) = pack_batches(load_distribution("linux_files"), 256 * 1024, 1, seed=0)
    plan = make_plan(lens, 256, 1024, "causal")
    budget = resolve_kv_budget("auto", int(plan.num_tokens.max()))
    cp_node = np.arange(256) // 8
    for movement in ("forward", "refetch"):
        shares = potential.relay_shares(plan, movement, 8, "auto")
        left = inter_node_tokens(relay_transfers(plan.pieces, cp_node, budget, movement), cp_node)
        assert left == round(shares["round after"] * shares["inter_node_tokens"])
        assert left < 0.75 * shares["inter_node_tokens"]


def test_bad_arguments_are_named():
    plan = _plan("random", 4, 192, "causal")
    with pytest.raises(InputError, match="movement"):
        relay_transfers(plan.pieces, [0, 0, 1, 1], 7, "backward")
    with pytest.raises(InputError, match="resolve 'auto'"):
        relay_transfers(plan.pieces, [0, 0, 1, 1], "auto")
    with pytest.raises(InputError, match="node of 3 CP ranks"):
        relay_transfers(plan.pieces, [0, 0, 1], 7)
    with pytest.raises(InputError, match="non-negative"):
        relay_transfers(plan.pieces, [0, 0, -1, 1], 7)
    assert relay_transfers(plan.pieces[:0], [0, 0, 1, 1], 7).shape == (0, len(Transfer))


@pytest.mark.parametrize("movement", MOVEMENTS)
@pytest.mark.parametrize("lengths,cp,gpus_per_node,tokens_per_rank", CASES[-3:])
def test_one_ranks_table_holds_every_transfer_of_that_rank(lengths, cp, gpus_per_node, tokens_per_rank, movement):
    """``relay_transfers(..., rank=r)`` decides only what concerns r: the rows r sends or receives are exactly those
    of the whole table (what rank_messages builds a rank's schedule from)."""
    plan = _plan(lengths, cp, tokens_per_rank, "causal")
    cp_node = np.arange(cp) // gpus_per_node
    budget = resolve_kv_budget("auto", int(plan.num_tokens.max()))
    whole = relay_transfers(plan.pieces, cp_node, budget, movement)
    def rows_of(t, r):
        return sorted(map(tuple, t[(t[:, Transfer.SRC] == r) | (t[:, Transfer.DST] == r)].tolist()))

    for r in range(cp):
        mine = relay_transfers(plan.pieces, cp_node, budget, movement, rank=r)
        assert rows_of(mine, r) == rows_of(whole, r), (r, movement)
        assert mine.shape[0] <= whole.shape[0]
