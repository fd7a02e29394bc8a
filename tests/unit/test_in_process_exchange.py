"""The in-process exchange, which runs the attention step's rounds for every rank of one process: messages between
two ranks meet in the order they are posted, whichever end comes first; a handle is ready once all its messages
have met; bytes are counted as the process-group exchange counts them; mismatches and deadlocks stop with one
line."""

from __future__ import annotations

import pytest
import torch

from megatron_fcp.attention.engine import run_together
from megatron_fcp.attention.exchange import ExchangeError, InProcessExchange


def test_messages_meet_in_posting_order_whichever_end_comes_first():
    a, b = InProcessExchange.group(2)
    first, second = torch.empty(3), torch.empty(2)
    receiving = b.post("forward", [], [(0, first), (0, second)])  # before the sends
    assert not receiving.ready()
    sending = a.post("forward", [(1, torch.arange(3.0)), (1, torch.tensor([7.0, 8.0]))], [])
    assert sending.ready() and receiving.ready()
    assert first.tolist() == [0.0, 1.0, 2.0] and second.tolist() == [7.0, 8.0]
    back = torch.empty(2)
    sending = b.post("backward_grad", [(0, torch.tensor([5.0, 6.0]))], [])  # before the receive
    assert not sending.ready()
    receiving = a.post("backward_grad", [], [(1, back)])
    assert sending.ready() and receiving.ready() and back.tolist() == [5.0, 6.0]
    assert (a.counter.sent, a.counter.received) == ({"forward": 20, "backward_grad": 0},
                                                    {"forward": 0, "backward_grad": 8})
    assert (b.counter.sent, b.counter.received) == ({"forward": 0, "backward_grad": 8},
                                                    {"forward": 20, "backward_grad": 0})


def test_empty_and_self_messages_do_not_travel():
    (only,) = InProcessExchange.group(1)
    pending = only.post("forward", [(0, torch.ones(2))], [(0, torch.empty(2))])
    pending.result = "buffer"
    assert pending.ready() and pending.wait() == "buffer" and pending.result is None
    assert only.counter.sent == {"forward": 0}


def test_a_wait_before_the_other_end_posts_names_the_rank():
    _, b = InProcessExchange.group(2)
    with pytest.raises(ExchangeError, match="CP rank 1 waits for 1 messages no other rank has posted"):
        b.post("forward", [], [(0, torch.empty(1))]).wait()


def test_mismatched_messages_stop_with_one_line():
    a, b = InProcessExchange.group(2)
    b.post("forward", [], [(0, torch.empty(3))])
    with pytest.raises(ExchangeError, match="CP rank 0 sends torch.float32 .2,. where CP rank 1 receives"):
        a.post("forward", [(1, torch.ones(2))], [])


def _rounds(exchange, peers, log):
    """A rank that receives one tensor from each of ``peers`` in turn, sending one to the next rank first."""
    for peer in peers:
        got = torch.empty(1)
        pending = exchange.post("forward", [((exchange.cp_rank + 1) % exchange.cp, torch.ones(1))], [(peer, got)])
        yield pending
        pending.wait()
        log.append((exchange.cp_rank, peer))
    return exchange.cp_rank


def test_run_together_runs_each_rank_until_it_waits():
    log: list = []
    exchanges = InProcessExchange.group(3)
    results = run_together([_rounds(ex, [(ex.cp_rank - 1) % 3] * 2, log) for ex in exchanges])
    assert results == [0, 1, 2] and sorted(log) == sorted((r, (r - 1) % 3) for r in range(3) for _ in range(2))


def test_run_together_names_the_ranks_of_a_deadlock():
    a, b = InProcessExchange.group(2)

    def wait_for(exchange, peer):  # receives from its peer, which never sends
        pending = exchange.post("backward_kv", [], [(peer, torch.empty(1))])
        yield pending
        pending.wait()

    with pytest.raises(ExchangeError, match=r"CP rank 0 \(backward_kv\), CP rank 1 \(backward_kv\)"):
        run_together([wait_for(a, 1), wait_for(b, 0)])
