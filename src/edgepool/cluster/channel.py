"""The control channel: JSON messages over the pool's mutual TLS (``cluster.trust``).

A message is a 4-byte big-endian length and that many bytes of UTF-8 JSON, an object
at the top. Nothing else is ever decoded from a peer: no pickle, and a message larger
than ``MAX_MESSAGE`` or nested deeper than Python's JSON parser allows is refused.
Every wait has a timeout; every failure is a ``ChannelError`` with one line.
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import struct
import threading
import time
from typing import Callable

from edgepool.errors import EdgepoolError

MAX_MESSAGE = 64 << 20
HANDSHAKE_S = 5.0  # a TLS handshake that takes longer is refused
PING_S = 2.0  # the coordinator and every agent tell each other they are alive this often
WAIT_S = 8 * PING_S  # a side silent this long is gone


class ChannelError(EdgepoolError, ConnectionError):
    pass


class Unreachable(ChannelError):
    """Nothing answers at the address (not up yet, or gone): worth retrying, unlike a refusal."""


def tls_failure(exc: BaseException) -> str:
    """One line for a failed TLS handshake, in words."""
    text = str(exc)
    if "certificate" in text.lower() or "unknown ca" in text.lower():
        return "the other side does not hold this pool's token (TLS refused the certificate)"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "the TLS handshake timed out"
    return f"the TLS handshake failed ({text.splitlines()[0][:200] if text else type(exc).__name__})"


IO_S = 30.0  # one TLS record in flight, or one send, may take this long before the channel counts as broken
MAX_PENDING = 32  # TLS handshakes in progress at once; more connections are closed at once


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


class Channel:
    """One TLS connection, safe to use from several threads: one lock serialises every
    OpenSSL call on it (OpenSSL allows no read and write on one connection at the same
    time); a reader waits for data with ``select`` outside the lock, so senders never
    queue behind a blocking read. Every send and every record read is bounded by ``IO_S``."""

    def __init__(self, sock: ssl.SSLSocket, peer: str):
        self.sock, self.peer = sock, peer
        self.sock.settimeout(IO_S)
        self._io = threading.Lock()

    def send(self, obj: dict) -> None:
        try:
            data = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise ChannelError(f"cannot send a message that is not plain JSON ({exc})") from None
        if len(data) > MAX_MESSAGE:
            raise ChannelError(f"a message of {len(data)} bytes is over the channel's limit of {MAX_MESSAGE}")
        try:
            with self._io:
                self.sock.sendall(struct.pack(">I", len(data)) + data)
        except (OSError, ValueError) as exc:
            self.close()  # a send cut halfway leaves the stream unusable
            raise ChannelError(f"lost the connection to {self.peer} ({type(exc).__name__})") from None

    def recv(self, timeout: float | None = None) -> dict:
        """The next message; ``ChannelError`` on end of connection, timeout or a bad message."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            (size,) = struct.unpack(">I", self._read(4, deadline, timeout))
            if size > MAX_MESSAGE:
                raise ChannelError(f"{self.peer} sent a message of {size} bytes, over the limit of {MAX_MESSAGE}")
            data = self._read(size, deadline, timeout)
        except ChannelError:  # an OSError too: keep its own words
            raise
        except (socket.timeout, TimeoutError):
            raise ChannelError(f"{self.peer} stopped in the middle of a message") from None
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ChannelError(f"lost the connection to {self.peer} ({type(exc).__name__})") from None
        try:
            obj = json.loads(data, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            raise ChannelError(f"{self.peer} sent a message that is not JSON") from None
        if not isinstance(obj, dict):
            raise ChannelError(f"{self.peer} sent a message that is not a JSON object")
        return obj

    def _read(self, n: int, deadline: float | None, timeout: float | None) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            if not self.sock.pending():  # nothing decrypted waiting: wait for bytes, without the lock
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready, _, _ = select.select([self.sock], [], [], left)
                if not ready:
                    raise ChannelError(f"{self.peer} sent nothing within {timeout:g} s")
            with self._io:
                chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ChannelError(f"{self.peer} closed the connection")
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def connect(addr: str, port: int, ctx: ssl.SSLContext, *, timeout: float = HANDSHAKE_S) -> Channel:
    """A TLS channel to ``addr:port`` (the pool certificate checked both ways)."""
    from edgepool.cluster.trust import SERVER_NAME

    where = f"{addr}:{port}"
    try:
        raw = socket.create_connection((addr, port), timeout=timeout)
    except OSError as exc:
        raise Unreachable(f"cannot reach {where}: {exc.strerror or exc}") from None
    return _handshake(raw, ctx, where, f"refused by {where}", server_hostname=SERVER_NAME)


def accept(raw: socket.socket, peer: str, ctx: ssl.SSLContext) -> Channel:
    """The server side of one connection: the TLS handshake, bounded by ``HANDSHAKE_S``."""
    raw.settimeout(HANDSHAKE_S)
    return _handshake(raw, ctx, peer, f"refused a connection from {peer}", server_side=True)


def _handshake(raw: socket.socket, ctx: ssl.SSLContext, peer: str, refused: str, **wrap) -> Channel:
    try:
        sock = ctx.wrap_socket(raw, **wrap)
    except (ssl.SSLError, OSError) as exc:
        raw.close()
        raise ChannelError(f"{refused}: {tls_failure(exc)}") from None
    return Channel(sock, peer)


class Listener:
    """TLS connections on one address: each in a thread of its own, its greeting
    (``{"hello": KIND, ...}``) handed to ``handlers[KIND](channel, peer, hello)``.
    A failed handshake, a missing greeting or an unknown kind is refused and logged."""

    def __init__(self, ctx: ssl.SSLContext, bind: str, port: int, handlers: dict[str, Callable], *, log=print):
        from edgepool.errors import SpecError

        self._ctx, self.handlers, self.log = ctx, handlers, log
        if not bind:
            raise SpecError("an empty address to listen on; give one (0.0.0.0 only to mean every interface)")
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        try:
            self._sock = socket.create_server((bind, port), family=family, backlog=64)
        except OSError as exc:
            raise SpecError(f"cannot listen on {bind}:{port}: {exc.strerror or exc}") from None
        self.address = self._sock.getsockname()[:2]
        self._closed = False
        self._pending = threading.BoundedSemaphore(MAX_PENDING)
        self._open: set[Channel] = set()
        self._open_lock = threading.Lock()
        threading.Thread(target=self._accept_loop, name="edgepool-accept", daemon=True).start()

    def close(self) -> None:
        """Stop listening now (``shutdown`` wakes the thread blocked in ``accept``; a bare close would not)."""
        self._closed = True
        for stop in (lambda: self._sock.shutdown(socket.SHUT_RDWR), self._sock.close):
            try:
                stop()
            except OSError:
                pass
        with self._open_lock:
            for ch in list(self._open):  # every connection it accepted ends with it
                ch.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                raw, addr = self._sock.accept()
            except OSError as exc:
                if self._closed:
                    return
                self.log(f"accept failed ({exc.strerror or exc}); retrying")  # out of descriptors, say
                time.sleep(0.5)
                continue
            if not self._pending.acquire(blocking=False):  # too many handshakes at once: not waited on
                raw.close()
                continue
            threading.Thread(target=self._handle, args=(raw, f"{addr[0]}:{addr[1]}"), daemon=True).start()

    def _handle(self, raw: socket.socket, peer: str) -> None:
        try:
            ch = accept(raw, peer, self._ctx)
        except ChannelError as exc:
            self.log(str(exc))
            return
        finally:
            self._pending.release()
        with self._open_lock:
            self._open.add(ch)
        try:
            try:
                hello = ch.recv(timeout=HANDSHAKE_S)
            except ChannelError as exc:
                self.refuse(ch, peer, f"no greeting ({exc})")
                return
            handler = self.handlers.get(hello.get("hello"))
            if handler is None:
                self.refuse(ch, peer, "not an edgepool agent")
                return
            handler(ch, peer, hello)
        except Exception as exc:  # noqa: BLE001 - a bad peer ends its own connection, nothing else
            self.log(f"dropped the connection from {peer}: {type(exc).__name__}: {str(exc)[:200]}")
        finally:
            with self._open_lock:
                self._open.discard(ch)
            ch.close()

    def refuse(self, ch: Channel, who: str, reason: str) -> None:
        self.log(f"refused {who}: {reason}")
        try:
            ch.send({"refused": reason})
        except ChannelError:
            pass
        ch.close()
