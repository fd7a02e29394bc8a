"""Peer-to-peer key/value exchange over torch.distributed, with byte counters, a memory meter and opt-in
named-peer timeouts.

Two exchanges share one interface (:class:`Exchange`), so the attention step's rounds are written once
(:mod:`megatron_fcp.attention.rounds`): :class:`P2PExchange` moves tensors between processes, and
:class:`InProcessExchange` between the ranks of one process (all ranks simulated in one process, and CP size 1).

One call posts every send and receive of a round at once with ``batch_isend_irecv`` (arbitrary peers of the CP
group, group ranks translated to global ranks, contiguous tensors, never a self-send) and returns a handle; the
caller computes while the messages are in flight and waits when it needs them. Messages between two ranks are
matched in the order they are posted, so every rank posts its rounds in the same order (see
:mod:`megatron_fcp.attention.engine`). Forward moves key/values from owners to the ranks that need them;
backward fetches again what was not kept and moves the key/value gradients back to their owners.

Waiting: by default (``timeout_s=None``) a wait is torch's plain ``Work.wait()``. On NCCL that only makes the
current CUDA stream wait for the messages (no host synchronisation, so the CPU keeps queueing kernels); on gloo it
blocks until the messages arrive or the process group's own timeout runs out. A failure is raised as
:class:`ExchangeError` naming the peer. A number of seconds (``timeout_s=S``) is for debugging hangs: every wait
then gives up after ``S`` seconds with :class:`ExchangeTimeout` naming the silent peer, but on NCCL a timed wait
makes the CPU poll ``isCompleted()`` with short sleeps, a host synchronisation in every round.
"""

from __future__ import annotations

import datetime
import math
import numbers
import time
import weakref
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist


class ExchangeError(RuntimeError):
    """A message to or from a peer failed; the message names the peer."""


class ExchangeTimeout(ExchangeError):
    """A peer did not answer in time; the message names it."""


@dataclass
class ByteCounter:
    """Bytes this rank posted to send and to receive, and seconds the host spent waiting for messages, per phase:
    ``forward`` (key/values), ``backward_kv`` (key/values fetched again) and ``backward_grad`` (key/value
    gradients going back to their owners)."""

    sent: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)
    wait_s: dict[str, float] = field(default_factory=dict)
    sent_to: dict[str, dict[int, int]] = field(default_factory=dict)
    """Per phase: bytes sent to each peer (CP group rank), from which the bytes that cross nodes follow."""

    def add(self, phase: str, sent: int, received: int, sends=()) -> None:
        """Count a round's bytes; ``sends``: its ``(peer, tensor)`` sends, counted per peer as well."""
        self.sent[phase] = self.sent.get(phase, 0) + sent
        self.received[phase] = self.received.get(phase, 0) + received
        to = self.sent_to.setdefault(phase, {})
        for peer, t in sends:
            to[peer] = to.get(peer, 0) + t.numel() * t.element_size()

    def sent_across(self, phase: str, cp_node, cp_rank: int) -> int:
        """Bytes of ``phase`` this rank (``cp_rank``) sent to ranks on other nodes (``cp_node``: node per rank)."""
        return sum(n for peer, n in self.sent_to.get(phase, {}).items() if cp_node[peer] != cp_node[cp_rank])

    def add_wait(self, phase: str, seconds: float) -> None:
        self.wait_s[phase] = self.wait_s.get(phase, 0.0) + seconds

    def reset(self) -> None:
        self.sent.clear()
        self.received.clear()
        self.wait_s.clear()
        self.sent_to.clear()


class MemoryMeter:
    """Bytes of tracked buffers alive now and at most, per kind (``kv``: received key/values; ``grad``: key/value
    gradients of received rows; ``returned``: gradients of this rank's own key/values coming back), measured from
    the buffers' storages.

    A tracked storage counts while anything holds it (a view, a message in flight, autograd) and at its current
    size (a storage resized to 0 counts 0). Memory only grows when a buffer is created, so sampling at each
    :meth:`track` call finds the exact peak.
    """

    def __init__(self):
        self._live: dict[str, list[weakref.ref]] = {}
        self.peak: dict[str, int] = {}

    def track(self, kind: str, *tensors: torch.Tensor) -> None:
        """Count the storages of ``tensors`` (once each, however often tracked) and update the peak."""
        refs = self._live.setdefault(kind, [])
        for t in tensors:
            if t is None:
                continue
            storage = t.untyped_storage()
            if not any(r() is storage for r in refs):
                refs.append(weakref.ref(storage))
        self.peak[kind] = max(self.peak.get(kind, 0), self.current(kind))

    def current(self, kind: str) -> int:
        """Bytes of ``kind`` buffers alive now."""
        alive = [r for r in self._live.get(kind, []) if r() is not None]
        self._live[kind] = alive
        return sum(r().nbytes() for r in alive if r() is not None)

    def reset_peak(self) -> None:
        """Start a new peak measurement from what is alive now."""
        self.peak = {kind: self.current(kind) for kind in self._live}


_CLOCK_SLACK_S = 1e-3
"""torch truncates a wait's timeout to whole milliseconds, so its deadline can fall this much before ours."""


class Pending:
    """Messages in flight; :meth:`wait` returns once all arrived (see the module docstring for how it waits).

    ``timeout_s``: None waits as torch does by default (failures raise :class:`ExchangeError` naming the peer);
    a number of seconds bounds each wait and raises :class:`ExchangeTimeout` naming the peer that did not answer.
    ``posted_at`` (``time.monotonic()``, default: now) is when the messages were posted, the start of the
    deadline bookkeeping that tells a timeout from other failures (see :meth:`timed_out`). ``counter``: where
    :meth:`wait` adds the seconds the host spent waiting (the exchange's :class:`ByteCounter`; None: not counted).
    """

    def __init__(self, works, peers, phase: str, cp_rank: int, timeout_s: float | None = None, buffers=(),
                 posted_at: float | None = None, counter: ByteCounter | None = None):
        self.works, self.peers, self.phase, self.cp_rank, self.timeout_s = works, peers, phase, cp_rank, timeout_s
        self.buffers = buffers  # keeps the send and receive buffers alive until the messages are done
        self.posted_at = time.monotonic() if posted_at is None else posted_at
        self.result = None
        self.counter = counter

    def timed_out(self) -> bool:
        """Whether our own ``timeout_s`` has passed since the messages were posted (never, without one).

        torch raises no timeout type for a wait that runs out of time: gloo raises a plain ``RuntimeError``
        (gloo's ``IoException`` for a point-to-point receive, ``c10::Error`` "Operation timed out!" for a
        collective), NCCL a ``DistBackendError``, as for any NCCL failure. Both deadlines lie at or after
        ``posted_at + timeout_s`` (gloo counts from the wait, NCCL from the post), so a wait that fails after that
        is a timeout and one that fails before is another failure. Without ``timeout_s`` a failure may still be the
        process group's own timeout, but that is torch's, reported as :class:`ExchangeError` with torch's words.
        """
        if self.timeout_s is None:
            return False
        return time.monotonic() - self.posted_at >= self.timeout_s - _CLOCK_SLACK_S

    def _wait_one(self, work) -> None:
        """Wait for one work: plain ``wait()`` without a timeout of ours, a timed wait with one."""
        if self.timeout_s is None:
            work.wait()
        else:
            work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))

    def _error(self, kind: str, peer, err: RuntimeError) -> ExchangeError:
        """The one-line error of a failed wait on ``peer``: a timeout of ours, or another failure."""
        if self.timed_out():
            return ExchangeTimeout(
                f"FCP {self.phase} exchange: CP rank {self.cp_rank} waited {self.timeout_s:g} s to {kind} CP rank "
                f"{peer} and gave up. CP rank {peer} is not running the same plan step (hung, slow, or given a "
                "different plan); check its log.")
        return ExchangeError(f"FCP {self.phase} exchange: CP rank {self.cp_rank} failed to {kind} CP rank {peer} "
                             f"({err}); check rank {peer}'s log.")

    def wait(self):
        """Wait for every message; returns (and forgets) :attr:`result`, the receive buffer it was posted with."""
        start = time.perf_counter()
        for work, (kind, peer) in zip(self.works, self.peers, strict=True):
            try:
                self._wait_one(work)
            except RuntimeError as err:  # torch.distributed.DistError is a RuntimeError too
                raise self._error(kind, peer, err) from err
        if self.counter is not None and self.works:
            self.counter.add_wait(self.phase, time.perf_counter() - start)
        self.works, self.buffers = [], ()
        result, self.result = self.result, None
        return result


def check_timeout(timeout_s: float | None) -> float | None:
    """``timeout_s`` if it is None (no timeout of ours) or a number of seconds > 0; ValueError otherwise."""
    if timeout_s is None:
        return None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real) or not 0 < timeout_s < math.inf:
        raise ValueError(f"exchange timeout must be None (wait as torch does) or a finite number of seconds > 0, "
                         f"got {timeout_s!r}")
    return float(timeout_s)


def travelling(messages, cp_rank: int) -> list[tuple[int, torch.Tensor]]:
    """The ``(peer, tensor)`` messages of ``cp_rank`` that travel: to or from another rank, not empty."""
    return [(peer, t) for peer, t in messages if peer != cp_rank and t.numel()]


def nbytes(messages) -> int:
    """Bytes of ``(peer, tensor)`` messages."""
    return sum(t.numel() * t.element_size() for _, t in messages)


class P2PExchange:
    """Exchange for one CP process group. ``timeout_s``: None (default) waits as torch does, with no host
    synchronisation on NCCL; a number of seconds bounds every wait and names a silent peer (debugging; on NCCL the
    CPU polls every round)."""

    def __init__(self, group: dist.ProcessGroup | None = None, timeout_s: float | None = None):
        self.group = group if group is not None else dist.group.WORLD
        self.cp_rank = dist.get_rank(self.group)
        self.cp = dist.get_world_size(self.group)
        self.timeout_s = check_timeout(timeout_s)
        self.counter = ByteCounter()
        self.memory = MemoryMeter()
        self._global = [dist.get_global_rank(self.group, r) for r in range(self.cp)]

    def post(self, phase: str, sends, recvs) -> Pending:
        """Post ``(peer, tensor)`` sends and receives (contiguous tensors, peers as CP group ranks), in order."""
        ins, outs = travelling(recvs, self.cp_rank), travelling(sends, self.cp_rank)
        ops = [dist.P2POp(dist.irecv, t, self._global[peer], self.group) for peer, t in ins]
        ops += [dist.P2POp(dist.isend, t, self._global[peer], self.group) for peer, t in outs]
        peers = [("receive from", peer) for peer, _ in ins] + [("send to", peer) for peer, _ in outs]
        return self._launch(phase, ops, peers, nbytes(outs), nbytes(ins), (sends, recvs), outs)

    def all_gather(self, phase: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every CP rank's ``tensor`` (same shape everywhere), waiting as :class:`Pending` does (at most
        ``timeout_s`` for the others when one is set)."""
        gathered = [torch.empty_like(tensor) for _ in range(self.cp)]
        posted_at = time.monotonic()
        work = dist.all_gather(gathered, tensor, group=self.group, async_op=True)
        others = [r for r in range(self.cp) if r != self.cp_rank]
        names = ", ".join(map(str, others[:8])) + (f" and {len(others) - 8} more" if len(others) > 8 else "")
        Pending([work], [("hear from", names)], phase, self.cp_rank, self.timeout_s, posted_at=posted_at).wait()
        return gathered

    def _launch(self, phase, ops, peers, sent, received, buffers, outs=()) -> Pending:
        posted_at = time.monotonic()
        works = dist.batch_isend_irecv(ops) if ops else []
        if len(works) != len(ops):  # coalesced backends (NCCL) return one work for the batch
            peers = [("exchange with", "any of " + ", ".join(str(p) for _, p in peers))] * len(works)
        self.counter.add(phase, sent, received, outs)
        return Pending(works, peers, phase, self.cp_rank, self.timeout_s, buffers, posted_at, self.counter)


class Exchange(Protocol):
    """What the attention step's rounds need of an exchange: a rank of a CP group that posts a round's messages
    and counts them (``counter``) and the buffers it holds (``memory``)."""

    cp_rank: int
    cp: int
    counter: ByteCounter
    memory: MemoryMeter

    def post(self, phase: str, sends, recvs):
        """Post ``(peer, tensor)`` sends and receives; returns a handle whose ``wait()`` returns its ``result``
        once every message has arrived (:class:`Pending`, :class:`LocalPending`)."""


class LocalPending:
    """Messages of one round between the ranks of one process; :meth:`ready` once every one has met its other
    end (and been copied). As :class:`Pending` does, it holds its send and receive buffers until :meth:`wait`
    (so that they live as long as in the distributed step); ``result``: as :class:`Pending`'s."""

    def __init__(self, phase: str, cp_rank: int, buffers=()):
        self.phase, self.cp_rank, self.buffers = phase, cp_rank, buffers
        self.unmatched = 0
        self.result = None

    def ready(self) -> bool:
        return self.unmatched == 0

    def wait(self):
        """Returns (and forgets) :attr:`result`; raises :class:`ExchangeError` if a message has no other end yet."""
        if not self.ready():
            raise ExchangeError(f"FCP {self.phase} exchange: CP rank {self.cp_rank} waits for {self.unmatched} "
                                "messages no other rank has posted yet")
        self.buffers = ()
        result, self.result = self.result, None
        return result


class LocalHub:
    """The channels between the ranks of one process. As between processes, messages from one rank to another
    meet in the order they are posted: the ``k``-th send from ``src`` to ``dst`` fills ``dst``'s ``k``-th
    receive from ``src``, copied as soon as both are posted."""

    def __init__(self, cp: int):
        self.exchanges = [InProcessExchange(self, r, cp) for r in range(cp)]
        self._sends: dict[tuple[int, int], deque] = defaultdict(deque)
        self._recvs: dict[tuple[int, int], deque] = defaultdict(deque)

    def send(self, src: int, dst: int, tensor: torch.Tensor, pending: LocalPending) -> None:
        pending.unmatched += 1
        receives = self._recvs[(src, dst)]
        if receives:
            self._copy((tensor, pending), receives.popleft(), src, dst)
        else:
            self._sends[(src, dst)].append((tensor, pending))

    def receive(self, src: int, dst: int, tensor: torch.Tensor, pending: LocalPending) -> None:
        pending.unmatched += 1
        sends = self._sends[(src, dst)]
        if sends:
            self._copy(sends.popleft(), (tensor, pending), src, dst)
        else:
            self._recvs[(src, dst)].append((tensor, pending))

    @staticmethod
    def _copy(send, recv, src: int, dst: int) -> None:
        (data, send_pending), (buffer, recv_pending) = send, recv
        if data.shape != buffer.shape or data.dtype != buffer.dtype:
            raise ExchangeError(f"FCP {send_pending.phase} exchange: CP rank {src} sends {data.dtype} "
                                f"{tuple(data.shape)} where CP rank {dst} receives {buffer.dtype} "
                                f"{tuple(buffer.shape)}: the ranks' schedules do not match")
        buffer.copy_(data)
        send_pending.unmatched -= 1
        recv_pending.unmatched -= 1


class InProcessExchange:
    """One rank's exchange with the other ranks of its :class:`LocalHub` (:meth:`group` makes them): the tensors
    are copied in this process. Counts bytes as :class:`P2PExchange` does; waits take no time."""

    def __init__(self, hub: LocalHub, cp_rank: int, cp: int):
        self.hub, self.cp_rank, self.cp = hub, cp_rank, cp
        self.counter = ByteCounter()
        self.memory = MemoryMeter()

    @staticmethod
    def group(cp: int) -> list[InProcessExchange]:
        """The exchanges of ``cp`` ranks of one process, by rank."""
        return LocalHub(cp).exchanges

    def post(self, phase: str, sends, recvs) -> LocalPending:
        """Post ``(peer, tensor)`` sends and receives as :meth:`P2PExchange.post` does."""
        pending = LocalPending(phase, self.cp_rank, (sends, recvs))
        ins, outs = travelling(recvs, self.cp_rank), travelling(sends, self.cp_rank)
        for peer, t in ins:
            self.hub.receive(peer, self.cp_rank, t, pending)
        for peer, t in outs:
            self.hub.send(self.cp_rank, peer, t, pending)
        self.counter.add(phase, nbytes(outs), nbytes(ins), outs)
        return pending
