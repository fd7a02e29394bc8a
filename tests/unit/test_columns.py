"""The named columns of the plan's row tables (megatron_fcp.planner.columns) and the per-rank view built from
them: the column names, the view's tuple widths and the view rows as selections of the plan's tables."""

import numpy as np
import pytest

from megatron_fcp.megatron.batch import _WIDTHS
from megatron_fcp.planner.api import make_plan
from megatron_fcp.planner.columns import (
    KV,
    VIEW_KV_RECV,
    VIEW_KV_SEND,
    VIEW_Q,
    VIEW_RECV_PIECES,
    VIEW_ROWS,
    VIEW_SEND_PIECES,
    Piece,
    Q,
)
from megatron_fcp.planner.plan import KV_COLS, Q_COLS
from megatron_fcp.planner.stages import PIECE_COLS


def test_column_names_are_those_of_the_tables():
    assert Q_COLS == ("cp_rank", "doc", "start", "end")
    assert KV_COLS == ("cp_rank", "src_rank", "doc", "start", "end")
    assert PIECE_COLS == ("dst", "src", "doc", "start", "end", "src_offset", "pos", "total")
    assert [len(Q), len(KV), len(Piece)] == [4, 5, 8]
    assert _WIDTHS == (3, 4, 4, 6, 7) == tuple(len(columns) for columns in VIEW_ROWS)


@pytest.mark.parametrize("strategy", ["fcp", "magi", "ring"])
def test_view_rows_are_the_named_columns_of_the_plan_rows(strategy):
    plan = make_plan(np.array([300, 50, 700, 20, 930]), 4, 500, "causal", strategy)
    kv, pieces = plan.kv_explicit, plan.pieces
    for rank in range(plan.cp):
        view = plan.for_rank(rank)
        lists = (view.q, view.kv_recv, view.kv_send, view.recv_pieces, view.send_pieces)
        for rows, columns in zip(lists, VIEW_ROWS, strict=True):
            assert all(len(row) == len(columns) for row in rows)
        q = plan.q[plan.q[:, Q.CP_RANK] == rank]
        assert view.q == tuple(map(tuple, q[:, VIEW_Q].tolist()))
        received, sent = kv[kv[:, KV.CP_RANK] == rank], kv[kv[:, KV.SRC_RANK] == rank]
        assert sorted(view.kv_recv) == sorted(map(tuple, received[:, VIEW_KV_RECV].tolist()))
        assert sorted(view.kv_send) == sorted(map(tuple, sent[:, VIEW_KV_SEND].tolist()))
        received, sent = pieces[pieces[:, Piece.DST] == rank], pieces[pieces[:, Piece.SRC] == rank]
        assert sorted(view.recv_pieces) == sorted(map(tuple, received[:, VIEW_RECV_PIECES].tolist()))
        assert sorted(view.send_pieces) == sorted(map(tuple, sent[:, VIEW_SEND_PIECES].tolist()))
