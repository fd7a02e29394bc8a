"""Peer-to-peer key/value exchange over torch.distributed, with byte counters, a memory meter and named-peer
timeouts.

One call posts every send and receive of a round at once with ``batch_isend_irecv`` (arbitrary peers of the CP
group, group ranks translated to global ranks, contiguous tensors, never a self-send) and returns a handle; the
caller computes while the messages are in flight and waits when it needs them. Messages between two ranks are
matched in the order they are posted, so every rank posts its rounds in the same order (see
:mod:`megatron_fcp.attention.engine`). Forward moves key/values from owners to the ranks that need them;
backward fetches again what was not kept and moves the key/value gradients back to their owners.
"""

from __future__ import annotations

import datetime
import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class ExchangeError(RuntimeError):
    """A message to or from a peer failed; the message names the peer."""


class ExchangeTimeout(ExchangeError):
    """A peer did not answer in time; the message names it."""


@dataclass
class ByteCounter:
    """Bytes this rank sent and received, per phase (``forward``, ``backward``)."""

    sent: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)

    def add(self, phase: str, sent: int, received: int) -> None:
        self.sent[phase] = self.sent.get(phase, 0) + sent
        self.received[phase] = self.received.get(phase, 0) + received

    def reset(self) -> None:
        self.sent.clear()
        self.received.clear()


class MemoryMeter:
    """Bytes of tracked buffers alive now and at most, per kind (``kv``: received key/values; ``grad``: key/value
    gradients of received rows and gradients coming back), measured from the buffers' storages.

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
    """Messages in flight; :meth:`wait` returns once all arrived or raises :class:`ExchangeTimeout`.

    ``posted_at`` (``time.monotonic()``, default: now) is when the messages were posted, the start of the
    deadline bookkeeping that tells a timeout from other failures (see :meth:`timed_out`).
    """

    def __init__(self, works, peers, phase: str, cp_rank: int, timeout_s: float, buffers=(),
                 posted_at: float | None = None):
        self.works, self.peers, self.phase, self.cp_rank, self.timeout_s = works, peers, phase, cp_rank, timeout_s
        self.buffers = buffers  # keeps the send and receive buffers alive until the messages are done
        self.posted_at = time.monotonic() if posted_at is None else posted_at
        self.result = None

    def timed_out(self) -> bool:
        """Whether ``timeout_s`` has passed since the messages were posted.

        torch raises no timeout type for a wait that runs out of time: gloo raises a plain ``RuntimeError``
        (gloo's ``IoException`` for a point-to-point receive, ``c10::Error`` "Operation timed out!" for a
        collective), NCCL a ``DistBackendError``, as for any NCCL failure. Both deadlines lie at or after
        ``posted_at + timeout_s`` (gloo counts from the wait, NCCL from the post), so a wait that fails after that
        is a timeout and one that fails before is another failure.
        """
        return time.monotonic() - self.posted_at >= self.timeout_s - _CLOCK_SLACK_S

    def wait(self):
        """Wait for every message; returns (and forgets) :attr:`result`, the receive buffer it was posted with."""
        for work, (kind, peer) in zip(self.works, self.peers, strict=True):
            try:
                work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
            except RuntimeError as err:  # torch.distributed.DistError is a RuntimeError too
                if self.timed_out():
                    raise ExchangeTimeout(
                        f"FCP {self.phase} exchange: CP rank {self.cp_rank} waited {self.timeout_s:g} s to {kind} "
                        f"CP rank {peer} and gave up. CP rank {peer} is not running the same plan step (hung, slow, "
                        "or given a different plan); check its log.") from err
                raise ExchangeError(f"FCP {self.phase} exchange: CP rank {self.cp_rank} failed to {kind} CP rank "
                                    f"{peer} ({err}); check rank {peer}'s log.") from err
        self.works, self.buffers = [], ()
        result, self.result = self.result, None
        return result


class P2PExchange:
    """Exchange for one CP process group. ``timeout_s`` bounds every wait."""

    def __init__(self, group: dist.ProcessGroup | None = None, timeout_s: float = 600.0):
        self.group = group if group is not None else dist.group.WORLD
        self.cp_rank = dist.get_rank(self.group)
        self.cp = dist.get_world_size(self.group)
        self.timeout_s = timeout_s
        self.counter = ByteCounter()
        self.memory = MemoryMeter()
        self._global = [dist.get_global_rank(self.group, r) for r in range(self.cp)]

    def post(self, phase: str, sends, recvs) -> Pending:
        """Post ``(peer, tensor)`` sends and receives (contiguous tensors, peers as CP group ranks), in order."""
        ops, peers, sent, received = [], [], 0, 0
        for peer, t in recvs:
            if peer != self.cp_rank and t.numel():
                ops.append(dist.P2POp(dist.irecv, t, self._global[peer], self.group))
                peers.append(("receive from", peer))
                received += t.numel() * t.element_size()
        for peer, t in sends:
            if peer != self.cp_rank and t.numel():
                ops.append(dist.P2POp(dist.isend, t, self._global[peer], self.group))
                peers.append(("send to", peer))
                sent += t.numel() * t.element_size()
        return self._launch(phase, ops, peers, sent, received, (sends, recvs))

    def all_gather(self, phase: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every CP rank's ``tensor`` (same shape everywhere), waiting at most ``timeout_s`` for the others."""
        gathered = [torch.empty_like(tensor) for _ in range(self.cp)]
        posted_at = time.monotonic()
        work = dist.all_gather(gathered, tensor, group=self.group, async_op=True)
        others = [r for r in range(self.cp) if r != self.cp_rank]
        names = ", ".join(map(str, others[:8])) + (f" and {len(others) - 8} more" if len(others) > 8 else "")
        Pending([work], [("hear from", names)], phase, self.cp_rank, self.timeout_s, posted_at=posted_at).wait()
        return gathered

    def start(self, phase: str, send: torch.Tensor, send_splits, recv: torch.Tensor, recv_splits) -> Pending:
        """Post the sends of ``send[a:b]`` to each ``(peer, a, b)`` and the receives into ``recv[a:b]``."""
        return self.post(phase, [(peer, send[a:b]) for peer, a, b in send_splits if b > a],
                         [(peer, recv[a:b]) for peer, a, b in recv_splits if b > a])

    def _launch(self, phase, ops, peers, sent, received, buffers) -> Pending:
        posted_at = time.monotonic()
        works = dist.batch_isend_irecv(ops) if ops else []
        if len(works) != len(ops):  # coalesced backends (NCCL) return one work for the batch
            peers = [("exchange with", "any of " + ", ".join(str(p) for _, p in peers))] * len(works)
        self.counter.add(phase, sent, received)
        return Pending(works, peers, phase, self.cp_rank, self.timeout_s, buffers, posted_at)
