"""The pool's trust, control channel and store, in one process (``edgepool.cluster``)."""

from __future__ import annotations

import os
import socket
import struct
import threading
from datetime import timedelta

import pytest
import torch.distributed as dist

from edgepool.cluster.channel import MAX_MESSAGE, ChannelError, Listener, Unreachable, connect
from edgepool.cluster.coordinator import bind_address
from edgepool.cluster.store import ChannelStore, host_store
from edgepool.cluster.trust import _material, new_token, pool_id, read_token, tls_context
from edgepool.errors import SpecError
from edgepool.specs.pool import PoolSpec


@pytest.fixture
def token(tmp_path):
    return read_token(new_token(tmp_path / "pool.token"))


def test_a_token_is_256_private_bits_and_never_overwritten(tmp_path):
    path = new_token(tmp_path / "t")
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(read_token(path)) == 32
    with pytest.raises(SpecError, match="never overwritten"):
        new_token(path)
    assert read_token(new_token(tmp_path / "u")) != read_token(path)
    os.chmod(path, 0o644)
    with pytest.raises(SpecError, match="chmod 600"):
        read_token(path)
    bad = tmp_path / "bad"
    bad.write_text("not a token\n")
    os.chmod(bad, 0o600)
    with pytest.raises(SpecError, match="64 hex digits"):
        read_token(bad)
    with pytest.raises(SpecError, match="no pool token"):
        read_token(None)
    with pytest.raises(SpecError, match="cannot read"):
        read_token(tmp_path / "missing")


def test_the_certificate_is_the_same_wherever_the_token_is(token):
    _material.cache_clear()
    first = _material(token)
    _material.cache_clear()
    assert _material(token) == first
    assert pool_id(token) != pool_id(bytes(32))


def _echo_listener(token: bytes, log: list[str]) -> Listener:
    def echo(ch, peer, hello):
        ch.send({"echo": hello})
        ch.close()

    return Listener(tls_context(token, server=True), "127.0.0.1", 0, {"echo": echo}, log=log.append)


def test_only_holders_of_the_token_talk(token):
    log: list[str] = []
    lst = _echo_listener(token, log)
    try:
        addr, port = lst.address
        ch = connect(addr, port, tls_context(token, server=False))
        ch.send({"hello": "echo", "x": 1})
        assert ch.recv(timeout=5) == {"echo": {"hello": "echo", "x": 1}}
        ch.close()
        with pytest.raises(ChannelError, match="does not hold this pool's token"):
            connect(addr, port, tls_context(bytes(32), server=False))
        # An unknown greeting is refused with one message, and nothing else.
        ch = connect(addr, port, tls_context(token, server=False))
        ch.send({"hello": "what"})
        assert ch.recv(timeout=5) == {"refused": "not an edgepool agent"}
        with pytest.raises(ChannelError):
            ch.recv(timeout=5)
        # Plain TCP, no TLS: refused in the handshake, within its bound.
        with socket.create_connection((addr, port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            try:
                assert s.recv(100)[:1] in (b"", b"\x15")  # closed, or a TLS alert
            except ConnectionResetError:
                pass
    finally:
        lst.close()
    assert any("refused a connection" in ln for ln in log), log


def test_a_message_over_the_limit_or_not_an_object_is_refused(token):
    got: list[BaseException] = []

    def raw(ch, peer, hello):
        ch.sock.sendall(struct.pack(">I", MAX_MESSAGE + 1))
        try:
            ch.recv(timeout=5)
        except ChannelError as exc:
            got.append(exc)

    lst = Listener(tls_context(token, server=True), "127.0.0.1", 0, {"raw": raw}, log=lambda m: None)
    try:
        ch = connect(*lst.address, tls_context(token, server=False))
        ch.send({"hello": "raw"})
        with pytest.raises(ChannelError, match="over the limit"):
            ch.recv(timeout=5)
        ch.sock.sendall(struct.pack(">I", 2) + b"[]")
        ch.close()
    finally:
        lst.close()
    with pytest.raises(Unreachable):
        connect("127.0.0.1", lst.address[1], tls_context(token, server=False), timeout=1)


def test_the_store_behaves_as_a_c10d_store_and_wants_the_run_id(token):
    lst = host_store("127.0.0.1", 0, token, "run-1", log=lambda m: None)
    try:
        addr, port = lst.address
        st = ChannelStore(addr, port, token, "run-1", 0, timedelta(seconds=5))
        st.set("k", b"v")
        assert st.get("k") == b"v"
        assert st.add("n", 2) == 2 and st.add("n", 3) == 5
        assert st.check(["k", "n"]) and not st.check(["k", "nope"])
        assert st.compare_set("c", b"", b"x") == b"x"
        assert st.compare_set("c", b"y", b"z") == b"x"
        assert st.num_keys() == 3
        assert st.delete_key("c") and not st.check(["c"])
        with pytest.raises(dist.DistStoreError):
            st.wait(["never"], timedelta(seconds=0.2))
        # A blocking wait in one thread does not hold up another thread's calls.
        seen = []
        t = threading.Thread(target=lambda: (st.wait(["late"], timedelta(seconds=5)), seen.append(st.get("late"))))
        t.start()
        st.set("late", b"1")
        t.join(10)
        assert seen == [b"1"]
        prefixed = dist.PrefixStore("p", st)  # as torch.distributed wraps it
        prefixed.set("a", "b")
        assert st.get("p/a") == b"b"
        with pytest.raises(ChannelError, match="not a rank of the current run"):
            ChannelStore(addr, port, token, "run-2", 0, timedelta(seconds=5)).set("x", b"1")
    finally:
        lst.close()


def test_serve_listens_where_the_pool_says_and_never_guesses():
    def pool(**kw):
        return PoolSpec.model_validate({"devices": [{"name": "a", "kind": "host-cpu", "host": "192.168.1.10"}], **kw})

    assert bind_address(pool(coordinator="192.168.1.2"), None) == "192.168.1.2"
    assert bind_address(pool(), "10.0.0.1") == "10.0.0.1"
    with pytest.raises(SpecError, match="names no coordinator address"):
        bind_address(pool(), None)
    local = PoolSpec.model_validate({"devices": [{"name": "a", "kind": "host-cpu", "host": "127.0.0.1"},
                                                 {"name": "b", "kind": "host-cpu"}]})
    assert bind_address(local, None) == "127.0.0.1"
    with pytest.raises(ValueError, match="coordinator"):
        pool(coordinator="-oProxyCommand=x")


def test_idle_connections_and_bad_requests_do_not_take_the_listener_down(token, monkeypatch):
    import time

    import edgepool.cluster.channel as chmod

    monkeypatch.setattr(chmod, "HANDSHAKE_S", 0.5)
    log: list[str] = []
    lst = host_store("127.0.0.1", 0, token, "run-1", log=log.append)
    try:
        addr, port = lst.address
        idle = [socket.create_connection((addr, port)) for _ in range(chmod.MAX_PENDING + 8)]  # never say a word
        time.sleep(1.5)
        st = ChannelStore(addr, port, token, "run-1", 0, timedelta(seconds=5))
        st.set("k", b"v")  # still served
        from edgepool.cluster.store import StoreServer

        assert "error" in StoreServer().handle({"op": "wait", "keys": ["x"], "timeout": float("inf")})
        for req in ({"op": "wait", "keys": ["x"], "timeout": 1e400}, {"op": "get", "key": "x", "timeout": -1},
                    {"op": "add", "key": "k", "amount": "nope"}, {"op": "zz"}):
            with pytest.raises(ChannelError):
                st._call(req)
        assert st.get("k") == b"v"
        for s in idle:
            s.close()
    finally:
        lst.close()


def test_a_store_that_does_not_answer_blames_its_host_rank_or_nobody():
    """A local run's store lives in rank 0; under serve the coordinator holds it, and no rank is to blame."""
    from edgepool.runtime.health import Heartbeat

    class Dead(dist.Store):
        def add(self, key, n):
            raise RuntimeError("no store")

        def set_timeout(self, t):
            pass

    for host, want in ((0, [0]), (None, [])):
        hb = Heartbeat(Dead(), 1, 3, beat_s=0.01, store_host=host)
        assert hb.silent() == want
    assert Heartbeat(Dead(), 0, 3, beat_s=0.01, store_host=0).silent() == []
