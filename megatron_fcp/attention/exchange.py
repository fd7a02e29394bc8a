"""Peer-to-peer key/value exchange over torch.distributed, with byte counters and named-peer timeouts.

One exchange posts every send and receive of a phase at once with ``batch_isend_irecv`` (arbitrary peers of
the CP group, group ranks translated to global ranks, one contiguous slice per peer, never a self-send) and
returns a handle; the caller computes while the messages are in flight and waits when it needs them. Forward
moves key/values from owners to the ranks that need them; backward moves the partial key/value gradients
back along the same lists, reversed.
"""

from __future__ import annotations

import datetime
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


class Pending:
    """Messages in flight; :meth:`wait` returns once all arrived or raises :class:`ExchangeTimeout`."""

    def __init__(self, works, peers, phase: str, cp_rank: int, timeout_s: float, buffers=()):
        self.works, self.peers, self.phase, self.cp_rank, self.timeout_s = works, peers, phase, cp_rank, timeout_s
        self.buffers = buffers  # keeps the send and receive buffers alive until the messages are done

    def wait(self) -> None:
        for work, (kind, peer) in zip(self.works, self.peers, strict=True):
            try:
                work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
            except RuntimeError as err:
                if "timed out" in str(err).lower():
                    raise ExchangeTimeout(
                        f"FCP {self.phase} exchange: CP rank {self.cp_rank} waited {self.timeout_s:g} s to {kind} "
                        f"CP rank {peer} and gave up. Rank {peer} is not running the same plan step (hung, slow, "
                        "or given a different plan); check its log.") from err
                raise ExchangeError(f"FCP {self.phase} exchange: CP rank {self.cp_rank} failed to {kind} CP rank "
                                    f"{peer} ({err}); check rank {peer}'s log.") from err
        self.works, self.buffers = [], ()


class P2PExchange:
    """Exchange for one CP process group. ``timeout_s`` bounds every wait."""

    def __init__(self, group: dist.ProcessGroup | None = None, timeout_s: float = 600.0):
        self.group = group if group is not None else dist.group.WORLD
        self.cp_rank = dist.get_rank(self.group)
        self.cp = dist.get_world_size(self.group)
        self.timeout_s = timeout_s
        self.counter = ByteCounter()
        self._global = [dist.get_global_rank(self.group, r) for r in range(self.cp)]

    def start(self, phase: str, send: torch.Tensor, send_splits, recv: torch.Tensor, recv_splits) -> Pending:
        """Post the sends of ``send[a:b]`` to each ``(peer, a, b)`` and the receives into ``recv[a:b]``."""
        ops, peers, sent, received = [], [], 0, 0
        for peer, a, b in recv_splits:
            if peer != self.cp_rank and b > a:
                ops.append(dist.P2POp(dist.irecv, recv[a:b], self._global[peer], self.group))
                peers.append(("receive from", peer))
                received += recv[a:b].numel() * recv.element_size()
        for peer, a, b in send_splits:
            if peer != self.cp_rank and b > a:
                ops.append(dist.P2POp(dist.isend, send[a:b], self._global[peer], self.group))
                peers.append(("send to", peer))
                sent += send[a:b].numel() * send.element_size()
        works = dist.batch_isend_irecv(ops) if ops else []
        if len(works) != len(ops):  # coalesced backends (NCCL) return one work for the batch
            peers = [("exchange with", "any of " + ", ".join(str(p) for _, p in peers))] * len(works)
        self.counter.add(phase, sent, received)
        return Pending(works, peers, phase, self.cp_rank, self.timeout_s, (send, recv))
