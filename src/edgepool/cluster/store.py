"""The run's rendezvous store, served by the coordinator over the authenticated channel.

torch.distributed's TCPStore has no authentication and listens on every interface:
anyone who reaches its port can join the rendezvous or rewrite it. Under ``serve`` the
coordinator holds the store instead (``StoreServer``, a dict in its memory) and each
rank reaches it through ``ChannelStore``, a ``torch.distributed.Store`` subclass whose
every call is one request on the pool's mutual TLS (``cluster.channel``). A store
connection must name the run's id, which the coordinator hands only to the agents it
admitted, for this run only. ``init_process_group(store=ChannelStore(...))`` then does
the rendezvous (gloo's address exchange), the subgroups and the heartbeats
(``runtime.health``) over it.

Values are bytes (base64 in the JSON messages). ``get`` and ``wait`` block on the
server until the keys exist or the caller's timeout passes, as TCPStore's do. A client
keeps one connection per thread, so the heartbeat thread never queues behind a
blocking ``wait`` of the main thread.
"""

from __future__ import annotations

import base64
import hmac
import threading
import time
from datetime import timedelta
from typing import Callable

import torch.distributed as dist

from edgepool.cluster.channel import Channel, ChannelError, Listener, Unreachable, connect


def _b(v) -> bytes:
    return v if isinstance(v, bytes) else (bytes(v) if isinstance(v, (bytearray, list)) else str(v).encode())


MAX_WAIT_S = 86_400.0  # the longest wait a store request may ask for (the job's timeout_s is at most this)


class StoreServer:
    """A key-value store in the coordinator's memory; ``serve(channel)`` answers one connection."""

    def __init__(self):
        self._data: dict[str, bytes] = {}
        self._cv = threading.Condition()

    def keys(self) -> list[str]:
        with self._cv:
            return list(self._data)

    def items(self, prefix: str) -> dict[str, bytes]:
        """The keys under ``prefix`` and their values, read at one moment."""
        with self._cv:
            return {k: v for k, v in self._data.items() if k.startswith(prefix)}

    def put(self, key: str, value: bytes) -> None:
        """Set ``key`` from this process (the launcher's side of ``runtime.regroup``)."""
        with self._cv:
            self._data[key] = bytes(value)
            self._cv.notify_all()

    def add(self, key: str, amount: int) -> int:
        return int(self.handle({"op": "add", "key": key, "amount": amount})["value"])

    def _wait(self, keys: list[str], timeout: float) -> bool:
        return self._cv.wait_for(lambda: all(k in self._data for k in keys), timeout)

    def handle(self, req: dict) -> dict:
        op, data = req.get("op"), self._data
        with self._cv:
            if op == "set":
                data[req["key"]] = base64.b64decode(req["value"])
                self._cv.notify_all()
                return {}
            if op in ("get", "wait"):
                keys = [req["key"]] if op == "get" else list(req["keys"])
                timeout = float(req["timeout"])
                if not 0.0 <= timeout <= MAX_WAIT_S:
                    return {"error": f"a wait of {timeout:g} s is outside 0..{MAX_WAIT_S:g} s"}
                if not self._wait(keys, timeout):
                    return {"timeout": [k for k in keys if k not in data]}
                return {"value": base64.b64encode(data[req["key"]]).decode()} if op == "get" else {}
            if op == "add":
                value = int(data.get(req["key"], b"0")) + int(req["amount"])
                data[req["key"]] = str(value).encode()
                self._cv.notify_all()
                return {"value": value}
            if op == "check":
                return {"value": all(k in data for k in req["keys"])}
            if op == "compare_set":
                key, expected, desired = req["key"], base64.b64decode(req["expected"]), base64.b64decode(req["desired"])
                current = data.get(key)
                if (current is None and expected == b"") or current == expected:
                    data[key] = current = desired
                    self._cv.notify_all()
                return {"value": base64.b64encode(current if current is not None else expected).decode()}
            if op == "delete_key":
                return {"value": data.pop(req["key"], None) is not None}
            if op == "num_keys":
                return {"value": len(data)}
        return {"error": f"unknown store operation {op!r}"}

    def serve(self, channel: Channel) -> None:
        """Answer one connection's requests until it closes."""
        while True:
            try:
                req = channel.recv()
            except ChannelError:
                return
            try:
                reply = self.handle(req)
            except (KeyError, TypeError, ValueError, OverflowError) as exc:
                reply = {"error": f"bad store request ({type(exc).__name__})"}
            try:
                channel.send(reply)
            except ChannelError:
                return


def store_handler(store: StoreServer, run_id: Callable[[], str | None], refuse: Callable) -> Callable:
    """A ``Listener`` handler: a rank's store connection, admitted with the current run's id only."""
    def handle(ch: Channel, peer: str, hello: dict) -> None:
        want, run = run_id(), hello.get("run")
        if want is None or not isinstance(run, str) or not hmac.compare_digest(run.encode(), want.encode()):
            refuse(ch, f"a store connection from {peer}", "not a rank of the current run")
            return
        ch.send({})
        store.serve(ch)
    return handle


def host_store(bind: str, port: int, token: bytes, run_id: str, *, log=print,
               store: StoreServer | None = None) -> Listener:
    """Serve a run's store from this process (rank 0 of a local run, where TCPStore was,
    but on ``bind`` only and over TLS with the run's own token)."""
    from edgepool.cluster.trust import tls_context

    listener: Listener | None = None

    def refuse(ch, who, reason):
        listener.refuse(ch, who, reason)

    listener = Listener(tls_context(token, server=True), bind, port,
                        {"store": store_handler(store or StoreServer(), lambda: run_id, refuse)}, log=log)
    return listener


class ChannelStore(dist.Store):
    """A c10d store whose calls go to the coordinator's ``StoreServer`` over the pool's TLS."""

    def __init__(self, addr: str, port: int, token: bytes, run_id: str, rank: int,
                 timeout: timedelta = timedelta(seconds=60)):
        super().__init__()
        from edgepool.cluster.trust import tls_context

        self._where, self._ctx = (addr, port), tls_context(token, server=False)
        self._hello = {"hello": "store", "run": run_id, "rank": rank}
        self._local = threading.local()
        self._timeout = timeout

    def _channel(self) -> Channel:
        ch = getattr(self._local, "channel", None)
        if ch is None:
            deadline = time.monotonic() + self._timeout.total_seconds()
            while True:  # the store's host may not be up yet (rank 0 of a local run starts with the others)
                try:
                    ch = connect(*self._where, self._ctx)
                    break
                except Unreachable:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            try:
                ch.send(self._hello)
                reply = ch.recv(timeout=10.0)
            except ChannelError:
                ch.close()
                raise
            if "refused" in reply:
                ch.close()
                raise ChannelError(f"the store's host refused the connection: {reply['refused']}")
            self._local.channel = ch
        return ch

    def _call(self, req: dict, wait_s: float | None = None) -> dict:
        ch = self._channel()
        try:
            ch.send(req)
            reply = ch.recv(timeout=(wait_s or 0) + 30.0)
        except ChannelError:
            self._local.channel = None
            ch.close()
            raise
        if "error" in reply:
            raise ChannelError(f"the coordinator's store: {reply['error']}")
        if "timeout" in reply:
            raise dist.DistStoreError(f"timed out after {wait_s:g} s waiting for store keys {reply['timeout']}")
        return reply

    def _wait_s(self, timeout: timedelta | None = None) -> float:
        return (timeout or self._timeout).total_seconds()

    def set_timeout(self, timeout: timedelta) -> None:
        self._timeout = timeout

    def set(self, key: str, value) -> None:
        self._call({"op": "set", "key": key, "value": base64.b64encode(_b(value)).decode()})

    def get(self, key: str) -> bytes:
        s = self._wait_s()
        return base64.b64decode(self._call({"op": "get", "key": key, "timeout": s}, s)["value"])

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        s = self._wait_s(timeout)
        self._call({"op": "wait", "keys": list(keys), "timeout": s}, s)

    def add(self, key: str, amount: int) -> int:
        return int(self._call({"op": "add", "key": key, "amount": int(amount)})["value"])

    def check(self, keys: list[str]) -> bool:
        return bool(self._call({"op": "check", "keys": list(keys)})["value"])

    def compare_set(self, key: str, expected, desired) -> bytes:
        reply = self._call({"op": "compare_set", "key": key, "expected": base64.b64encode(_b(expected)).decode(),
                            "desired": base64.b64encode(_b(desired)).decode()})
        return base64.b64decode(reply["value"])

    def delete_key(self, key: str) -> bool:
        return bool(self._call({"op": "delete_key", "key": key})["value"])

    def num_keys(self) -> int:
        return int(self._call({"op": "num_keys"})["value"])
