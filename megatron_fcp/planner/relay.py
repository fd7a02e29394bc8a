"""Where each sub-piece of the staged key/value exchange comes from when the CP ranks are grouped into nodes: the
"round after" relay of docs/node_aware_exchange.md (step 2). Pure integers (numpy), a function of
``(pieces, cp_node, budget)`` alone, so every rank derives the same transfers without a message.

Vocabulary (beside :mod:`megatron_fcp.planner.stages`'):

- ``cp_node``: int64 ``[cp]``, the node of each CP rank. Ranks of one node are **node-mates** (NVLink between
  them); tokens between nodes cross InfiniBand.
- A **sub-piece** is a piece cut at its receiver's stage boundaries (:func:`~.stages.split_stages`): tokens
  ``[start, end)`` of one document, owned by one rank, that the receiver holds in one stage. Its **round**: in
  forward its stage ``j``; in backward ``n - 1 - j`` (``n``: the receiver's stages).
- A rank's **stage buffer** ``j`` holds its stage ``j`` grouped by owner (ascending), inside an owner in the
  owner's local token order: the layout of :mod:`megatron_fcp.attention.schedule`. Relays leave it as it is (so
  the kernel calls stay as they are), and a stage's key/value gradients have the same rows.
- A **transfer** (columns :class:`~megatron_fcp.planner.columns.Transfer`) moves tokens ``[start, end)`` of
  one document from one end to another; an end is a rank's own key/values or one of its stage buffers, and the
  tokens are contiguous at both ends (one message each way, or part of one).

The rule, per movement (:data:`MOVEMENTS`), follows the engine's rounds (:mod:`megatron_fcp.attention.engine`):

- ``forward``: in round ``j`` a rank computes its stage ``j`` while stage ``j + 1`` travels, so all through
  round ``j`` it holds every token of its stage buffer ``j``. The tokens of a sub-piece of stage ``s >= 1`` whose
  owner is on another node come from a node-mate that holds them in its stage ``s - 1`` (from that stage
  buffer); the tokens no node-mate holds so come from the owner. Stage 0, and sub-pieces whose owner is on the
  receiver's node, come from the owner as without nodes. ``round``: the receiver's stage (the index of the
  schedule's ``send_rounds``; it travels during round ``s - 1``, stage 0 before round 0).
- ``refetch``: backward round ``k >= 1`` fetches the receiver's stage ``n - 1 - k`` again, and it travels during
  round ``k - 1``, while a rank holds its stage of round ``k - 1``. A token refetched in round ``k >= 2`` whose
  owner is on another node comes from a node-mate that holds it in round ``k - 1``. Not from the kept last stage
  (round 0): the engine frees that buffer as soon as it is computed (``release``) while the refetch of round 1
  may still travel. ``round``: ``k``.
- ``gradients``: the key/value gradients of the stage computed in backward round ``k`` are sent at the end of
  that round and travel during round ``k + 1``. The gradient rows of a token whose owner is on another node go
  to a node-mate that holds the same token in round ``k + 1``, which adds them to its own stage's gradient rows
  before its own send one round later; the others go to the owner. Capped: where several copies would go to the
  same node-mate's row, only the nearest before it (cyclically) does and the others go to the owner, so a rank
  receives at most one partial per row of its next stage and the buffer they arrive in holds at most one stage
  (:func:`_one_partial_per_row`). ``round``: ``k``. The source end is the
  computing rank's stage (its gradient rows); the destination is the summing node-mate's stage or the owner's
  own rows. The copies of a token that cross InfiniBand are those with no node-mate copy one round *later*
  (``scripts/node_relay_potential.py`` counts those with no copy one round *earlier*, as for key/values: the two
  differ where consecutive rounds hold different numbers of copies).

Chains are allowed: a relay may itself have got the tokens by relay one round earlier (or hand the sum on one
round later). Key/value relays add no memory: a relay serves from a buffer that is alive in that round anyway.
Node-mates' partial gradients arrive in a buffer of their own before they are added: at most one stage, by the cap.

Tie-break: where several node-mates hold a token in the round wanted, a rank uses the first of them after itself
in rank order, cyclically: the smallest ``(mate - rank) mod cp``. Where every node-mate holds a range, each rank
picks a different one (the node's ranks form a ring), so the relay load spreads over the node instead of falling
on its lowest rank; and a range keeps its relay for as long as that relay holds it, so transfers stay long.
"""

from __future__ import annotations

import numpy as np

from megatron_fcp.errors import InputError
from megatron_fcp.planner.columns import Piece, Transfer
from megatron_fcp.planner.pairs import arange_within
from megatron_fcp.planner.stages import parse_kv_budget, sort_order, split_stages

MOVEMENTS = ("forward", "refetch", "gradients")
"""The staged exchange's movements: forward stages, the stages fetched again in backward, the key/value gradients
sent back (see the module docstring)."""
TRANSFER_COLS = tuple(column.name.lower() for column in Transfer)
"""``("src", "src_stage", "src_pos", "src_offset", "dst", "dst_stage", "dst_pos", "dst_offset", "doc", "start",
"end", "round", "owner", "phase")``: the columns of transfers (:class:`~megatron_fcp.planner.columns.Transfer`)."""
OWN = -1
"""``*_stage`` (and ``*_pos``) of an end at a rank's own key/values (or, for gradients, its own gradient rows)."""


def _sub_pieces(pieces: np.ndarray, budget: int | None) -> dict[str, np.ndarray]:
    """The pieces cut at their receivers' stage boundaries (int64 arrays, one entry per sub-piece): ``rank`` (the
    receiver), ``owner``, ``doc``, ``start``, ``length``, ``own_offset`` (the owner's local index of ``start``),
    ``pos`` (the receiver's staging position of ``start``), ``stage``, ``num_stages`` (the receiver's) and
    ``buf`` (the row of ``start`` in the receiver's stage buffer)."""
    index, offset, length, stage, n = split_stages(pieces[:, Piece.POS], pieces[:, Piece.END] - pieces[:, Piece.START],
                                                   pieces[:, Piece.TOTAL], budget)
    sub = {"rank": pieces[index, Piece.DST], "owner": pieces[index, Piece.SRC], "doc": pieces[index, Piece.DOC],
           "start": pieces[index, Piece.START] + offset, "length": length,
           "own_offset": pieces[index, Piece.SRC_OFFSET] + offset, "pos": pieces[index, Piece.POS] + offset,
           "stage": stage, "num_stages": n}
    # the stage buffer: by owner, then the owner's local order (schedule.py lays stages out so)
    order = sort_order(sub["rank"], stage, sub["owner"], sub["own_offset"])
    lens, rank, stg = length[order], sub["rank"][order], stage[order]
    before = np.cumsum(lens) - lens
    is_first = np.concatenate([[True], (rank[1:] != rank[:-1]) | (stg[1:] != stg[:-1])])
    buf = np.empty_like(length)
    buf[order] = before - before[np.flatnonzero(is_first)][np.cumsum(is_first) - 1]
    sub["buf"] = buf
    return sub


def _relay_segments(sub: dict[str, np.ndarray], rnd: np.ndarray, query: np.ndarray, holder: np.ndarray,
                    delta: int, cp_node: np.ndarray):
    """Cut the sub-pieces ``query`` where their relay changes. A token of query sub-piece ``q`` (rank ``g``,
    round ``r``) is relayed by the sub-piece of ``holder`` of a node-mate of ``g`` that holds it in round
    ``r + delta`` (the first such mate after ``g``, cyclically); tokens no holder covers get ``-1``.

    Returns int64 arrays, one entry per segment, sorted by query then start: the sub-piece, its relay sub-piece
    (``-1``: none), start and end.
    """
    start, end = sub["start"], sub["start"] + sub["length"]
    span = int(end.max()) + 1  # token coordinates below it: key * span + token keeps keys apart
    cp = cp_node.shape[0]
    g = sub["rank"][query]
    # every (query, node-mate of its rank)
    node_size = np.bincount(cp_node)
    node_ranks = np.argsort(cp_node, kind="stable")
    mates = node_size[cp_node[g]]
    of_query = np.repeat(np.arange(query.shape[0], dtype=np.int64), mates)
    mate = node_ranks[(np.cumsum(node_size) - node_size)[cp_node[g]][of_query] + arange_within(mates)]
    keep = mate != g[of_query]
    of_query, mate = of_query[keep], mate[keep]
    pair_query = pair_holder = np.zeros(0, np.int64)
    if of_query.shape[0] and holder.shape[0]:
        # one group id per (rank, doc, round), shared by the holders and what the queries look for
        # (packed into one int64 in the same order as the rows: unique over rows sorts a byte view, 20x slower)
        ranks = np.concatenate([sub["rank"][holder], mate])
        docs = np.concatenate([sub["doc"][holder], sub["doc"][query][of_query]])
        rounds = np.concatenate([rnd[holder], rnd[query][of_query] + delta]) + 1  # delta may make it -1
        packed = (ranks * (int(docs.max()) + 1) + docs) * (int(rounds.max()) + 1) + rounds
        group = np.unique(packed, return_inverse=True)[1].reshape(-1)
        holder_group, wanted_group = group[: holder.shape[0]], group[holder.shape[0]:]
        # a rank's sub-pieces of one document in one round are disjoint: sorted by start, their ends are sorted too
        holder_start = holder_group * span + start[holder]
        order = np.argsort(holder_start, kind="stable")
        holder_start, holder_sorted = holder_start[order], holder[order]
        holder_end = holder_start + sub["length"][holder_sorted]
        a, b = start[query][of_query], end[query][of_query]
        first = np.searchsorted(holder_end, wanted_group * span + a, "right")  # the first ending after a
        count = np.maximum(np.searchsorted(holder_start, wanted_group * span + b, "left") - first, 0)
        pair_query = np.repeat(of_query, count)
        pair_holder = holder_sorted[np.repeat(first, count) + arange_within(count)]
    # the overlaps cut each query into elementary segments; each takes its most preferred covering holder
    q_start, q_end = start[query], end[query]
    cut_start = np.maximum(start[pair_holder], q_start[pair_query])
    cut_end = np.minimum(end[pair_holder], q_end[pair_query])
    own = np.arange(query.shape[0], dtype=np.int64)
    points = np.unique(np.concatenate([own * span + q_start, own * span + q_end, pair_query * span + cut_start,
                                       pair_query * span + cut_end]))
    first = np.searchsorted(points, pair_query * span + cut_start)
    covered = np.searchsorted(points, pair_query * span + cut_end) - first
    segment = np.repeat(first, covered) + arange_within(covered)
    preference = np.repeat((sub["rank"][pair_holder] - g[pair_query]) % cp, covered)
    relay = np.repeat(pair_holder, covered)
    order = sort_order(segment, preference)
    segment, relay = segment[order], relay[order]
    best = np.concatenate([[True], segment[1:] != segment[:-1]]) if segment.shape[0] else np.zeros(0, bool)
    choice = np.full(points.shape[0], -1, np.int64)
    choice[segment[best]] = relay[best]
    seg_query, seg_start = points // span, points % span
    is_segment = np.flatnonzero(np.concatenate([seg_query[1:] == seg_query[:-1], [False]]))  # not a query's end
    seg_query, choice, seg_end, seg_start = (seg_query[is_segment], choice[is_segment], seg_start[is_segment + 1],
                                             seg_start[is_segment])
    # adjacent segments of one query with one choice are one range (contiguous at both ends)
    is_new = np.concatenate([[True], (seg_query[1:] != seg_query[:-1]) | (choice[1:] != choice[:-1])])
    run_first = np.flatnonzero(is_new)
    run_last = np.append(run_first[1:], seg_query.shape[0]) - 1
    return query[seg_query[run_first]], choice[run_first], seg_start[run_first], seg_end[run_last]


def _check_cp_node(cp_node, pieces: np.ndarray) -> np.ndarray:
    cp_node = np.asarray(cp_node)
    if cp_node.ndim != 1 or cp_node.dtype.kind not in "iu" or (cp_node.size and cp_node.min() < 0):
        raise InputError(f"cp_node must be a flat list of non-negative node indices, one per CP rank; got "
                         f"{cp_node.tolist()!r:.80}")
    ranks = pieces[:, [Piece.DST, Piece.SRC]]
    if ranks.size and int(ranks.max()) >= cp_node.shape[0]:
        raise InputError(f"cp_node names the node of {cp_node.shape[0]} CP ranks but the pieces name rank "
                         f"{int(ranks.max())}; give the node of every CP rank of the plan")
    return cp_node.astype(np.int64)


def relay_transfers(pieces, cp_node, budget: int | None, movement: str = "forward", rank: int | None = None,
                    hop: bool = False) -> np.ndarray:
    """The transfers of one movement (:data:`MOVEMENTS`) of the staged exchange of ``pieces`` (a plan's, columns
    :class:`~megatron_fcp.planner.columns.Piece`) under ``budget`` (tokens per stage, resolved: a positive
    integer, or None for one stage; :func:`~.stages.resolve_kv_budget` turns ``auto`` into the ranks' token
    slots), with ranks on nodes ``cp_node`` (int64 ``[cp]``), by the round-after relay (module docstring).

    Returns int64 ``[num_transfers, 13]``, columns :class:`~megatron_fcp.planner.columns.Transfer`, sorted by
    the end that holds the sub-piece (forward, refetch: ``dst``; gradients: ``src``), then its stage and staging
    position. Every sub-piece that moves is covered once, token for token; a transfer never straddles two
    sub-pieces at either end.

    ``hop``: key/values (forward, refetch) by the same-round hop as well (:func:`_landers`; the transfers from a
    lander have ``phase`` 1, the round's second phase, after the lander's first is in). A design the runtime
    does not run: docs/node_aware_exchange.md, step 5.

    ``rank``: only the sub-pieces that ``rank`` owns or that a rank of its node holds are decided. That gives every
    transfer ``rank`` sends or receives (and some others) at a fraction of the work, the same rows as in the whole
    table (a sub-piece's sources depend only on its holder's node-mates).
    """
    if movement not in MOVEMENTS:
        raise InputError(f"movement {movement!r} is not one of {', '.join(MOVEMENTS)}")
    return all_transfers(pieces, cp_node, budget, rank, (movement,), hop)[movement]


def all_transfers(pieces, cp_node, budget: int | None, rank: int | None = None, movements=MOVEMENTS,
                  hop: bool = False) -> dict[str, np.ndarray]:
    """:func:`relay_transfers` of each of ``movements`` (default all three), by movement: the pieces are cut into
    sub-pieces once for all of them."""
    budget = parse_kv_budget(budget)
    if budget == "auto":
        raise InputError("relay_transfers needs the budget in tokens per stage: resolve 'auto' first with "
                         "resolve_kv_budget('auto', int(plan.num_tokens.max()))")
    pieces = np.asarray(pieces, dtype=np.int64).reshape(-1, len(Piece))
    cp_node = _check_cp_node(cp_node, pieces)
    if pieces.shape[0] == 0:
        return {movement: np.zeros((0, len(Transfer)), np.int64) for movement in movements}
    sub = _sub_pieces(pieces, budget)
    return {movement: _transfers(sub, cp_node, movement, rank, hop) for movement in movements}


def _transfers(sub: dict[str, np.ndarray], cp_node: np.ndarray, movement: str, rank: int | None, hop: bool = False
               ) -> np.ndarray:
    """The transfers of one movement of the sub-pieces ``sub`` (:func:`relay_transfers`)."""
    stage, num_stages = sub["stage"], sub["num_stages"]
    rnd = stage if movement == "forward" else num_stages - 1 - stage
    inter = cp_node[sub["rank"]] != cp_node[sub["owner"]]
    moves = rnd >= 1 if movement == "refetch" else np.ones(rnd.shape, bool)
    may_relay = inter & (rnd >= {"forward": 1, "refetch": 2, "gradients": 0}[movement])
    holders = moves & inter
    if rank is not None:  # the sub-pieces whose sources concern rank, and their possible relays
        mine = (sub["owner"] == rank) | (cp_node[sub["rank"]] == cp_node[rank])
        may_relay, moves = may_relay & mine, moves & mine
        holders &= np.isin(cp_node[sub["rank"]], cp_node[sub["rank"][may_relay]])
    query, direct = np.flatnonzero(may_relay), np.flatnonzero(moves & ~may_relay)
    seg_start = sub["start"][direct]
    seg_sub, seg_relay, seg_end = direct, np.full(direct.shape, -1, np.int64), seg_start + sub["length"][direct]
    if query.shape[0]:
        relayed = _relay_segments(sub, rnd, query, np.flatnonzero(holders),
                                  1 if movement == "gradients" else -1, cp_node)
        seg_sub, seg_relay, seg_start, seg_end = (np.concatenate([mine, theirs]) for mine, theirs in
                                                  zip((seg_sub, seg_relay, seg_start, seg_end), relayed, strict=True))
        if movement == "gradients":
            seg_sub, seg_relay, seg_start, seg_end = _one_partial_per_row(sub, seg_sub, seg_relay, seg_start, seg_end,
                                                                          cp_node.shape[0])
    seg_phase = np.zeros(seg_sub.shape, np.int64)
    if hop and movement != "gradients":
        landing = (seg_relay < 0) & inter[seg_sub]
        if landing.any():
            hopped = _landers(sub, rnd, seg_sub[landing], seg_start[landing], seg_end[landing], cp_node)
            keep = ~landing
            seg_sub, seg_relay, seg_start, seg_end = (np.concatenate([mine[keep], theirs]) for mine, theirs in
                                                      zip((seg_sub, seg_relay, seg_start, seg_end), hopped,
                                                          strict=True))
            seg_phase = np.concatenate([seg_phase[keep], (hopped[1] >= 0).astype(np.int64)])
    return _table(sub, rnd, seg_sub, seg_relay, seg_start, seg_end, movement, seg_phase)


def _one_partial_per_row(sub: dict[str, np.ndarray], seg_sub: np.ndarray, seg_relay: np.ndarray,
                         seg_start: np.ndarray, seg_end: np.ndarray, cp: int):
    """The cap on gradient relays: where several node-mates would add their partial gradients of one token to the
    same node-mate's stage, only the nearest before that node-mate (cyclically: the smallest ``(relay - rank) mod
    cp``) does; the others send theirs to the owner. So a rank receives at most one partial gradient per row of its
    next stage, and its relayed-gradient buffer holds at most one stage. Segments (sub-piece, relay or -1, start,
    end) in, the same segments with the losers' parts set to -1 out (cut where that changes)."""
    relayed = np.flatnonzero(seg_relay >= 0)
    if not relayed.shape[0]:
        return seg_sub, seg_relay, seg_start, seg_end
    holder, span = seg_relay[relayed], int(seg_end.max()) + 1
    a, b = holder * span + seg_start[relayed], holder * span + seg_end[relayed]
    points = np.unique(np.concatenate([a, b]))
    first = np.searchsorted(points, a)
    count = np.searchsorted(points, b) - first
    seg = np.repeat(np.arange(relayed.shape[0], dtype=np.int64), count)
    interval = np.repeat(first, count) + arange_within(count)
    preference = (sub["rank"][holder[seg]] - sub["rank"][seg_sub[relayed[seg]]]) % cp
    order = sort_order(interval, preference)
    seg, interval = seg[order], interval[order]
    wins = np.concatenate([[True], interval[1:] != interval[:-1]])
    order = sort_order(seg, interval)  # back to each segment's own order
    seg, interval, wins = seg[order], interval[order], wins[order]
    choice = np.where(wins, holder[seg], -1)
    is_new = np.concatenate([[True], (seg[1:] != seg[:-1]) | (choice[1:] != choice[:-1])])
    run_first = np.flatnonzero(is_new)
    run_last = np.append(run_first[1:], seg.shape[0]) - 1
    keep = np.flatnonzero(seg_relay < 0)
    return (np.concatenate([seg_sub[keep], seg_sub[relayed[seg[run_first]]]]),
            np.concatenate([seg_relay[keep], choice[run_first]]),
            np.concatenate([seg_start[keep], points[interval[run_first]] % span]),
            np.concatenate([seg_end[keep], points[interval[run_last] + 1] % span]))


def _landers(sub: dict[str, np.ndarray], rnd: np.ndarray, seg_sub: np.ndarray, seg_start: np.ndarray,
             seg_end: np.ndarray, cp_node: np.ndarray):
    """The same-round hop: segments ``[seg_start, seg_end)`` of sub-pieces ``seg_sub`` that would come from an
    owner on another node, cut where their lander changes. Of the ranks of one node that receive a token in one
    round this way, one (the **lander**) receives it from the owner; the others take it from the lander's stage
    buffer of the same round, after it has landed (the round's second phase). Each range of tokens that ``k``
    candidates share is cut into ``k`` near-equal parts, each landed by one of them, so the InfiniBand bytes spread
    over the candidates' NICs; the first part goes to the candidate whose index inside its node is the owner's
    index inside its own node or the next one after it (cyclically), and so on in that order.

    Returns int64 arrays per segment: the sub-piece, its source sub-piece (``-1``: the owner; else the lander's),
    start and end."""
    node_size = np.bincount(cp_node)
    by_node = np.argsort(cp_node, kind="stable")
    local = np.empty_like(cp_node)
    local[by_node] = np.arange(cp_node.shape[0]) - (np.cumsum(node_size) - node_size)[cp_node[by_node]]
    rank, owner, doc = sub["rank"][seg_sub], sub["owner"][seg_sub], sub["doc"][seg_sub]
    size = node_size[cp_node[rank]]
    preference = ((local[rank] - local[owner]) % size) * cp_node.shape[0] + rank
    node, rounds = cp_node[rank], rnd[seg_sub] + 1
    packed = (node * (int(doc.max()) + 1) + doc) * (int(rounds.max()) + 1) + rounds
    group = np.unique(packed, return_inverse=True)[1].reshape(-1)
    span = int(seg_end.max()) + 1
    a, b = group * span + seg_start, group * span + seg_end
    points = np.unique(np.concatenate([a, b]))
    first = np.searchsorted(points, a)
    count = np.searchsorted(points, b) - first
    seg = np.repeat(np.arange(seg_sub.shape[0], dtype=np.int64), count)
    interval = np.repeat(first, count) + arange_within(count)
    # an interval with k candidates (in order of preference) is cut into k equal parts: candidate p lands part p
    # and takes the others from their landers, so every candidate receives 1/k of it over InfiniBand
    order = sort_order(interval, preference[seg])
    seg, interval = seg[order], interval[order]
    first_of = np.flatnonzero(np.concatenate([[True], interval[1:] != interval[:-1]]))
    counts = np.diff(np.append(first_of, seg.shape[0]))
    k, p = np.repeat(counts, counts), arange_within(counts)
    pair = np.repeat(np.arange(seg.shape[0], dtype=np.int64), k)
    part = arange_within(k)
    lander = seg[np.repeat(first_of, counts)[pair] + part]
    at, length = points[interval[pair]], points[interval[pair] + 1] - points[interval[pair]]
    a, b = at + length * part // k[pair], at + length * (part + 1) // k[pair]
    choice = np.where(part == p[pair], -1, seg_sub[lander])
    keep = np.flatnonzero(b > a)
    keep = keep[np.lexsort((a[keep], seg[pair][keep]))]
    piece_of, choice, a, b = seg[pair][keep], choice[keep], a[keep], b[keep]
    # adjacent parts of one segment with one source are one range (contiguous at both ends)
    is_new = np.concatenate([[True], (piece_of[1:] != piece_of[:-1]) | (choice[1:] != choice[:-1])
                             | (a[1:] != b[:-1])])
    run_first = np.flatnonzero(is_new)
    run_last = np.append(run_first[1:], piece_of.shape[0]) - 1
    return seg_sub[piece_of[run_first]], choice[run_first], a[run_first] % span, b[run_last] % span


def _table(sub, rnd, seg_sub, seg_relay, seg_start, seg_end, movement: str, seg_phase) -> np.ndarray:
    """Segments (sub-piece, relay sub-piece or -1, start, end) -> transfer rows, sorted (:func:`relay_transfers`)."""
    offset = seg_start - sub["start"][seg_sub]
    near = (sub["rank"][seg_sub], sub["stage"][seg_sub], sub["pos"][seg_sub] + offset, sub["buf"][seg_sub] + offset)
    relayed = seg_relay >= 0
    other = np.where(relayed, seg_relay, 0)
    other_offset = seg_start - sub["start"][other]
    far = (np.where(relayed, sub["rank"][other], sub["owner"][seg_sub]),
           np.where(relayed, sub["stage"][other], OWN),
           np.where(relayed, sub["pos"][other] + other_offset, OWN),
           np.where(relayed, sub["buf"][other] + other_offset, sub["own_offset"][seg_sub] + offset))
    src, dst = (near, far) if movement == "gradients" else (far, near)
    out = np.empty((seg_sub.shape[0], len(Transfer)), np.int64)
    for columns, end in (((Transfer.SRC, Transfer.SRC_STAGE, Transfer.SRC_POS, Transfer.SRC_OFFSET), src),
                         ((Transfer.DST, Transfer.DST_STAGE, Transfer.DST_POS, Transfer.DST_OFFSET), dst)):
        for column, values in zip(columns, end, strict=True):
            out[:, column] = values
    out[:, Transfer.DOC] = sub["doc"][seg_sub]
    out[:, Transfer.START], out[:, Transfer.END] = seg_start, seg_end
    out[:, Transfer.ROUND] = rnd[seg_sub]
    out[:, Transfer.OWNER] = sub["owner"][seg_sub]
    out[:, Transfer.PHASE] = seg_phase
    return out[sort_order(near[0], near[1], near[2])]


def inter_node_tokens(transfers: np.ndarray, cp_node) -> int:
    """Tokens of ``transfers`` (:func:`relay_transfers`) that cross between nodes ``cp_node`` (InfiniBand)."""
    cp_node = np.asarray(cp_node, dtype=np.int64)
    crossing = cp_node[transfers[:, Transfer.SRC]] != cp_node[transfers[:, Transfer.DST]]
    return int((transfers[crossing, Transfer.END] - transfers[crossing, Transfer.START]).sum())


# -- one rank's messages ---------------------------------------------------------------------------------------
_MERGE_KEY = (Transfer.SRC, Transfer.DST, Transfer.ROUND, Transfer.SRC_STAGE, Transfer.DST_STAGE)


def merged_messages(transfers: np.ndarray) -> np.ndarray:
    """Transfers merged into messages: rows ``(src, dst, round, src_stage, dst_stage, src_offset, dst_offset,
    length)``, one per run of transfers between the same two buffers in one round that is contiguous in both.
    Sorted by sender, receiver, round, then the two buffers (own key/values, ``-1``, first) and the sender's
    offset: the order in which both ends post them. Both ends merge the same rows alike, so message sizes agree."""
    t = np.asarray(transfers, dtype=np.int64).reshape(-1, len(Transfer))
    key = [t[:, c] + 1 if c in (Transfer.SRC_STAGE, Transfer.DST_STAGE) else t[:, c] for c in _MERGE_KEY]
    t = t[sort_order(*key, t[:, Transfer.SRC_OFFSET])]
    length = t[:, Transfer.END] - t[:, Transfer.START]
    same = np.all(t[1:, _MERGE_KEY] == t[:-1, _MERGE_KEY], axis=1) if t.shape[0] > 1 else np.zeros(0, bool)
    follows = (same & (t[1:, Transfer.SRC_OFFSET] == t[:-1, Transfer.SRC_OFFSET] + length[:-1])
               & (t[1:, Transfer.DST_OFFSET] == t[:-1, Transfer.DST_OFFSET] + length[:-1]))
    first = np.flatnonzero(np.concatenate([[True], ~follows])) if t.shape[0] else np.zeros(0, np.int64)
    lengths = np.add.reduceat(length, first) if first.shape[0] else np.zeros(0, np.int64)
    return np.column_stack([t[first][:, _MERGE_KEY], t[first, Transfer.SRC_OFFSET], t[first, Transfer.DST_OFFSET],
                            lengths]).astype(np.int64).reshape(-1, 8)


M_SRC, M_DST, M_ROUND, M_SRC_STAGE, M_DST_STAGE, M_SRC_OFFSET, M_DST_OFFSET, M_LEN = range(8)
"""Columns of :func:`merged_messages`' rows."""


def _by_round(rows: np.ndarray, peer: int, start: int, extra: int | None = None) -> dict[int, list[tuple]]:
    """Message rows -> ``{round: [(peer, start, end[, extra]), ...]}`` in row order."""
    out: dict[int, list[tuple]] = {}
    for row in rows.tolist():
        message = (row[peer], row[start], row[start] + row[M_LEN]) + (() if extra is None else (row[extra],))
        out.setdefault(row[M_ROUND], []).append(message)
    return out


def rank_messages(pieces, cp_node, budget: int | None, rank: int) -> dict[str, dict[int, list[tuple]]]:
    """What ``rank`` posts in each round of the node-aware staged exchange of ``pieces`` (every piece received on
    the rank's node and on the nodes of the ranks it sends to: :attr:`RankPlan.node_pieces`), as message lists
    ``(peer, start, end)`` of rows of the rank's own buffer (its key/values, one of its stage buffers or their
    gradients), keyed by round, in the order they are posted (messages between two ranks meet in that order):

    - ``recv``, ``refetch_recv``: per *stage* (not round): ``(src, start, end, src_offset)`` rows of the stage
      buffer, forward and refetched, from owners first, then relays;
    - ``send``, ``refetch``: rows of its own key/values sent in each forward / backward round;
    - ``relay``, ``refetch_relay``: rows of its stage buffer of the round before, forwarded to node-mates;
    - ``grad_send``: per *stage*: rows of that stage's key/value gradients, to their owners (first) or to a
      node-mate that adds them to its own;
    - ``returns``: rows of its own key/values whose gradients come back in each backward round;
    - ``grad_relay``: per backward round ``k``: rows of its stage of round ``k + 1`` to which a node-mate's
      partial gradients, received in round ``k``, are added before that stage's own send.
    """
    out: dict[str, dict[int, list[tuple]]] = {}
    transfers = all_transfers(pieces, cp_node, budget, rank)
    for movement, recv_name, send_name, relay_name in (("forward", "recv", "send", "relay"),
                                                       ("refetch", "refetch_recv", "refetch", "refetch_relay")):
        m = merged_messages(transfers[movement])
        mine = m[m[:, M_DST] == rank]
        mine = mine[sort_order(mine[:, M_DST_STAGE], mine[:, M_SRC], mine[:, M_SRC_STAGE] + 1, mine[:, M_SRC_OFFSET])]
        out[recv_name] = {}
        for row in mine.tolist():
            out[recv_name].setdefault(row[M_DST_STAGE], []).append(
                (row[M_SRC], row[M_DST_OFFSET], row[M_DST_OFFSET] + row[M_LEN], row[M_SRC_OFFSET]))
        sent = m[m[:, M_SRC] == rank]  # already by receiver, round, own first, then the sender's offset
        out[send_name] = _by_round(sent[sent[:, M_SRC_STAGE] < 0], M_DST, M_SRC_OFFSET)
        out[relay_name] = _by_round(sent[sent[:, M_SRC_STAGE] >= 0], M_DST, M_SRC_OFFSET)
    m = merged_messages(transfers["gradients"])
    sent = m[m[:, M_SRC] == rank]
    sent = sent[sort_order(sent[:, M_SRC_STAGE], sent[:, M_DST], sent[:, M_DST_STAGE] + 1, sent[:, M_DST_OFFSET])]
    out["grad_send"] = {}
    for row in sent.tolist():
        out["grad_send"].setdefault(row[M_SRC_STAGE], []).append(
            (row[M_DST], row[M_SRC_OFFSET], row[M_SRC_OFFSET] + row[M_LEN]))
    got = m[m[:, M_DST] == rank]
    got = got[sort_order(got[:, M_ROUND], got[:, M_SRC], got[:, M_DST_OFFSET])]
    out["returns"] = _by_round(got[got[:, M_DST_STAGE] < 0], M_SRC, M_DST_OFFSET)
    out["grad_relay"] = _by_round(got[got[:, M_DST_STAGE] >= 0], M_SRC, M_DST_OFFSET)
    return out


PHASES = {"forward": "forward", "refetch": "backward_kv", "gradients": "backward_grad"}
"""The exchange's byte-counter phase of each movement."""


def relay_figures(pieces, cp_node, budget: int | None, cp: int, hop: bool = False) -> dict[str, np.ndarray]:
    """Per rank (int64 ``[cp]``, tokens), what the node-aware exchange changes beside :func:`~.stages.p2p_memory`
    (which still gives what each rank receives and holds of key/values: a relay only changes who sends):

    - ``sent_across_forward``, ``sent_across_backward_kv``, ``sent_across_backward_grad``: tokens (key/value rows,
      or their gradient rows) the rank sends to ranks on other nodes, per exchange phase;
    - ``sent_forward``, ``sent_backward_kv``, ``sent_backward_grad``: every token the rank sends, per phase;
    - ``received_across_forward``, ...: tokens the rank receives from ranks on other nodes, per phase;
    - ``peak_returned_grad_tokens``: the most gradient rows of its own key/values that come back in one backward
      round (a relay's sum comes back in the relay's round, one later than its own stage would send it);
    - ``peak_relayed_grad_tokens``: the most rows of node-mates' partial gradients it receives in one round, to add
      to its next stage's before sending them on (a buffer of its own: the only memory the relay adds; at most the
      rows of that stage, so at most the budget).

    ``hop``: with the same-round hop as well (:func:`relay_transfers`).
    """
    cp_node = np.asarray(cp_node, dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    transfers = all_transfers(pieces, cp_node, budget, hop=hop)
    for movement, phase in PHASES.items():
        t = transfers[movement]
        length = t[:, Transfer.END] - t[:, Transfer.START]
        across = cp_node[t[:, Transfer.SRC]] != cp_node[t[:, Transfer.DST]]
        for name, end, rows in (("sent", Transfer.SRC, slice(None)), ("sent_across", Transfer.SRC, across),
                                ("received_across", Transfer.DST, across)):
            out[f"{name}_{phase}"] = np.bincount(t[rows, end], weights=length[rows], minlength=cp).astype(np.int64)
        if movement == "gradients":
            num_rounds = int(t[:, Transfer.ROUND].max(initial=0)) + 1
            for name, rows in (("peak_returned_grad_tokens", t[:, Transfer.DST_STAGE] < 0),
                               ("peak_relayed_grad_tokens", t[:, Transfer.DST_STAGE] >= 0)):
                per_round = np.bincount(t[rows, Transfer.DST] * num_rounds + t[rows, Transfer.ROUND],
                                        weights=length[rows], minlength=cp * num_rounds)
                out[name] = per_round.reshape(cp, num_rounds).max(axis=1).astype(np.int64)
    return out
