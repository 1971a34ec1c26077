"""Point-to-point transfers with timeouts, a local mailbox and byte counting.

``send`` is asynchronous (``dist.isend``); ``recv`` blocks on ``dist.irecv`` with the
run's timeout and raises a ``PeerError`` naming the silent device: the one whose
heartbeat stopped (``runtime.health``), else the peer it waited for. ``post`` puts a receive
up ahead of need, so that the transfer overlaps the receiver's compute. A transfer to the
rank itself never touches the network: it goes through an in-process mailbox.

``codec`` (``runtime.compress.Codec``, the job's ``train.wire.activations``) encodes
every point-to-point payload (the engine's boundary transfers) before it is sent and
decodes it on receipt: a receive posted early allocates the encoded message's buffer,
whose size the codec knows from the tensor's shape. The mailbox keeps the tensor as it
is (nothing crosses the network). The default codec (fp32) sends the tensor itself.

``bytes_sent`` counts what this rank handed to the network: point-to-point payloads
exactly, collectives as the bytes a ring algorithm sends (``2 (n - 1) / n`` of the
tensor for an all-reduce, ``(n - 1) / n`` of the result for an all-gather). Gloo may
pick another algorithm, so collective bytes are an estimate and labelled so.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from edgepool.errors import PeerError
from edgepool.runtime.compress import Codec
from edgepool.runtime.device import CPU, TorchDevice
from edgepool.runtime.health import Heartbeat, blame, first_line


class Wire:
    def __init__(self, rank: int, timeout_s: float, names: list[str], *, device: TorchDevice = CPU,
                 heartbeat: Heartbeat | None = None, codec: Codec | None = None):
        self.rank, self.timeout_s, self.names, self.device = rank, timeout_s, names, device
        self.heartbeat = heartbeat
        self.codec = codec or Codec("fp32", device)
        self._mailbox: dict[tuple[int, int], torch.Tensor] = {}
        self._pending: list[tuple[object, int]] = []
        self._posted: dict[tuple[int, int], tuple[object, torch.Tensor]] = {}
        self.bytes_sent = 0

    def post(self, shape: tuple[int, ...], src: int, tag: int) -> None:
        """Post a receive ahead of need. Gloo moves a message only once its receive is
        posted, so a receive posted just before the data is needed serialises the
        transfer with the receiver's compute; posted early, the transfer overlaps it."""
        if src == self.rank or (src, tag) in self._posted:
            return
        buf = self.codec.buffer(shape)
        try:
            work = dist.irecv(buf, src, tag=tag)
        except RuntimeError as exc:
            raise PeerError(f"{self._who(src)} is unreachable: {first_line(exc)}") from None
        self._posted[(src, tag)] = (work, buf)

    def _who(self, rank: int) -> str:
        return f"rank {rank} ({self.names[rank]})"

    def send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        if dst == self.rank:
            self._mailbox[(dst, tag)] = tensor
            return
        t = self.codec.encode(tensor).contiguous()
        try:
            work = dist.isend(t, dst, tag=tag)
        except RuntimeError as exc:
            raise PeerError(f"{self._who(dst)} is unreachable while sending: {first_line(exc)}") from None
        self._pending.append((work, dst))
        self.bytes_sent += t.numel() * t.element_size()

    def recv(self, shape: tuple[int, ...], src: int, tag: int, what: str) -> torch.Tensor:
        if src == self.rank:
            return self._mailbox.pop((src, tag))
        if (src, tag) in self._posted:
            work, buf = self._posted.pop((src, tag))
            self._wait(work, src, f"receiving {what}")
            return self.codec.decode(buf, shape)
        buf = self.codec.buffer(shape)
        try:
            work = dist.irecv(buf, src, tag=tag)
        except RuntimeError as exc:
            raise PeerError(f"{self._who(src)} is unreachable while {what}: {first_line(exc)}") from None
        self._wait(work, src, f"receiving {what}")
        return self.codec.decode(buf, shape)

    def _wait(self, work, peer: int, what: str) -> None:
        try:
            ok = work.wait(timeout=timedelta(seconds=self.timeout_s))
        except RuntimeError as exc:
            raise blame(self.heartbeat, self.names, self.rank, what, exc, suspect=peer, timeout_s=self.timeout_s) from None
        if ok is False:
            raise blame(self.heartbeat, self.names, self.rank, what, None, suspect=peer, timeout_s=self.timeout_s)

    def flush(self) -> None:
        """Wait for every pending send."""
        pending, self._pending = self._pending, []
        for work, dst in pending:
            self._wait(work, dst, "sending")
        assert not self._mailbox, f"unconsumed local transfers: {list(self._mailbox)}"
        assert not self._posted, f"unconsumed posted receives: {list(self._posted)}"

    def count_collective(self, tensor: torch.Tensor, group_size: int, kind: str) -> None:
        if group_size <= 1:
            return
        nbytes = tensor.numel() * tensor.element_size()
        factor = 2 * (group_size - 1) / group_size if kind == "all_reduce" else (group_size - 1) / group_size
        self.bytes_sent += int(nbytes * factor)
