"""How the key/value exchange waits: a plain ``Work.wait()`` by default (no host polling on NCCL), a timed wait only
when a timeout is asked for, and the start-up rule that keeps such a timeout below Megatron's process-group timeout.

Single process, no process group: torch's ``Work`` objects are replaced by recording stand-ins.
"""

from __future__ import annotations

import argparse
import datetime
import time

import pytest
import torch

from megatron_fcp.attention import exchange as exchange_module
from megatron_fcp.attention.exchange import ExchangeError, ExchangeTimeout, P2PExchange, Pending, check_timeout
from megatron_fcp.errors import InputError
from megatron_fcp.megatron.config import (
    FcpConfig,
    add_fcp_args,
    check_fcp_args,
    fcp_arg_problems,
    fcp_config_from_args,
)

CP, MY_RANK = 4, 0


class RecordingWork:
    """Stands in for a torch ``Work``: records the arguments of each ``wait`` call; fails with ``error`` if set."""

    def __init__(self, calls: list, error: RuntimeError | None = None):
        self.calls, self.error = calls, error

    def wait(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.error is not None:
            raise self.error
        return True


@pytest.fixture
def waits(monkeypatch) -> list:
    """The ``wait`` calls of every message posted through a CP group of :data:`CP` ranks faked around this process
    (rank :data:`MY_RANK`); ``batch_isend_irecv`` returns one recording work per message, as gloo does."""
    calls: list = []
    dist = exchange_module.dist
    monkeypatch.setattr(dist, "get_rank", lambda group=None: MY_RANK)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: CP)
    monkeypatch.setattr(dist, "get_global_rank", lambda group, rank: rank)
    monkeypatch.setattr(dist, "P2POp", lambda op, tensor, peer, group: (op, peer))  # torch's checks the group
    monkeypatch.setattr(dist, "batch_isend_irecv", lambda ops: [RecordingWork(calls) for _ in ops])
    monkeypatch.setattr(dist, "all_gather", lambda out, tensor, group=None, async_op=False: RecordingWork(calls))
    return calls


def run_rounds(exchange: P2PExchange, rounds: int = 3) -> int:
    """Post and wait ``rounds`` rounds (each: send to and receive from every other rank); the messages posted."""
    posted = 0
    for _ in range(rounds):
        send, recv = torch.ones(12), torch.empty(12)
        splits = [(peer, recv[4 * (peer - 1):4 * peer]) for peer in range(1, CP)]
        pending = exchange.post("forward", [(peer, send[4 * (peer - 1):4 * peer]) for peer in range(1, CP)], splits)
        posted += len(pending.works)
        pending.wait()
    return posted


def test_default_waits_are_plain_on_every_round(waits):
    exchange = P2PExchange(object())
    assert exchange.timeout_s is None
    posted = run_rounds(exchange)
    assert posted == 3 * 2 * (CP - 1) and len(waits) == posted
    assert all(call == ((), {}) for call in waits), waits  # no timeout argument: no host polling on NCCL


def test_explicit_timeout_times_every_wait(waits):
    exchange = P2PExchange(object(), timeout_s=2.5)
    posted = run_rounds(exchange)
    assert len(waits) == posted
    assert all(call == ((), {"timeout": datetime.timedelta(seconds=2.5)}) for call in waits), waits


@pytest.mark.parametrize("timeout_s, want", [(None, {}), (7, {"timeout": datetime.timedelta(seconds=7)})])
def test_all_gather_waits_as_the_exchange_does(waits, timeout_s, want):
    gathered = P2PExchange(object(), timeout_s=timeout_s).all_gather("plan check", torch.arange(3))
    assert len(gathered) == CP and waits == [((), want)]


def test_coalesced_batch_is_waited_once_without_a_timeout(waits, monkeypatch):
    """NCCL returns one work for a whole batch: it is waited once, plainly."""
    monkeypatch.setattr(exchange_module.dist, "batch_isend_irecv", lambda ops: [RecordingWork(waits)])
    send = torch.ones(4)
    pending = P2PExchange(object()).post("backward_grad", [(1, send[0:2]), (2, send[2:4])], [(3, torch.empty(4))])
    assert pending.peers == [("exchange with", "any of 3, 1, 2")]
    pending.wait()
    assert waits == [((), {})]


def test_failure_without_a_timeout_is_an_exchange_error_naming_the_peer():
    """With no timeout of ours, a failure is never called our timeout, however long after the post it comes."""
    calls: list = []
    work = RecordingWork(calls, RuntimeError("Connection closed by peer"))
    pending = Pending([work], [("receive from", 2)], "forward", 1, posted_at=time.monotonic() - 3600)
    assert not pending.timed_out()
    with pytest.raises(ExchangeError, match="CP rank 1 failed to receive from CP rank 2 .*Connection closed") as info:
        pending.wait()
    assert not isinstance(info.value, ExchangeTimeout) and "\n" not in str(info.value)
    assert calls == [((), {})]


def test_failure_past_an_explicit_timeout_names_the_silent_peer():
    calls: list = []
    work = RecordingWork(calls, RuntimeError("Operation timed out!"))
    pending = Pending([work], [("send to", 3)], "backward", 0, 5.0, posted_at=time.monotonic() - 5.0)
    assert pending.timed_out()
    with pytest.raises(ExchangeTimeout, match="waited 5 s to send to CP rank 3"):
        pending.wait()
    assert calls == [((), {"timeout": datetime.timedelta(seconds=5.0)})]


@pytest.mark.parametrize("bad", [0, -1.0, True, "10", float("nan"), float("inf")])
def test_exchange_refuses_a_timeout_that_is_not_none_or_positive_seconds(bad, waits):
    with pytest.raises(ValueError, match="None .* or a finite number of seconds > 0"):
        P2PExchange(object(), timeout_s=bad)
    assert check_timeout(None) is None and check_timeout(3) == 3.0


# -- --fcp-exchange-timeout and the start-up rule ----------------------------------------------------------------
GOOD = dict(context_parallel_mode="fcp", context_parallel_size=4, tensor_model_parallel_size=1,
            pipeline_model_parallel_size=1, seq_length=4096, micro_batch_size=1, calculate_per_token_loss=True,
            num_attention_heads=8, position_embedding_type="rope", attention_dropout=0.0, mock_data=False,
            reset_position_ids=True)


def args(**changes) -> argparse.Namespace:
    return argparse.Namespace(**{**GOOD, **changes})


def config_problems(**changes) -> list:
    """FCP's start-up problems of :data:`GOOD` with ``changes`` (GPU unknown)."""
    return fcp_arg_problems(args(**changes), world_size=4, compute_capability=None)


def test_flag_defaults_to_no_timed_wait_and_says_it_polls():
    parser = add_fcp_args(argparse.ArgumentParser())
    assert parser.parse_args([]).fcp_exchange_timeout is None
    assert parser.parse_args(["--fcp-exchange-timeout", "none"]).fcp_exchange_timeout is None
    assert parser.parse_args(["--fcp-exchange-timeout", "90"]).fcp_exchange_timeout == 90.0
    action = next(a for a in parser._actions if "--fcp-exchange-timeout" in a.option_strings)
    assert all(words in action.help for words in ("poll", "NCCL", "--distributed-timeout-minutes"))
    assert FcpConfig(cp=1, seq_length=1).exchange_timeout_s is None
    assert fcp_config_from_args(args()).exchange_timeout_s is None
    assert fcp_config_from_args(args(fcp_exchange_timeout=90.0)).exchange_timeout_s == 90.0


@pytest.mark.parametrize("timeout_s, minutes", [(600.0, None), (601.0, None), (1200.0, 20), (1e6, 30)])
def test_timeout_not_below_the_distributed_timeout_is_refused_at_start_up(timeout_s, minutes):
    with pytest.raises(InputError) as err:
        check_fcp_args(args(fcp_exchange_timeout=timeout_s, distributed_timeout_minutes=minutes), world_size=4)
    text, limit = str(err.value), (minutes or 10) * 60
    assert text.startswith(f"--fcp-exchange-timeout {timeout_s:g} s is not shorter than "
                           f"--distributed-timeout-minutes {minutes or 10} ({limit} s)"), text
    assert f"pass --fcp-exchange-timeout {limit // 2}" in text and "unset" in text and "\n" not in text


@pytest.mark.parametrize("timeout_s, minutes", [(None, None), (599.0, None), (30.0, 1), (1199.0, 20)])
def test_timeout_below_the_distributed_timeout_or_unset_is_accepted(timeout_s, minutes):
    check_fcp_args(args(fcp_exchange_timeout=timeout_s, distributed_timeout_minutes=minutes), world_size=4)


@pytest.mark.parametrize("bad", [-5.0, 0.0, float("inf")])
def test_bad_timeout_is_reported_once_by_the_config(bad):
    problems = config_problems(fcp_exchange_timeout=bad)
    assert len(problems) == 1 and problems[0][0] == "--fcp-exchange-timeout", problems
    assert f"must be > 0 seconds and finite, got {bad!r}" in problems[0][1]

