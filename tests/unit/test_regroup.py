"""runtime.regroup: cutting the old groups' connections keeps the store's and every listener."""

import socket

from edgepool.runtime.regroup import beat_prefix, shut_connections
from edgepool.runtime.health import PREFIX


def test_shut_connections_cuts_peers_but_keeps_the_store_and_listeners():
    listener = socket.create_server(("127.0.0.1", 0))
    store = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname())
    kept = socket.create_connection(store.getsockname())
    far_peer, _ = listener.accept()
    far_store, _ = store.accept()
    try:
        n = shut_connections({store.getsockname(), kept.getsockname()})  # both ends of the store's (one process)
        # ours to the peer, and the peer's accepted end (same process here): both cut
        assert n == 2
        assert peer.recv(1) == b"" and far_peer.recv(1) == b""
        kept.sendall(b"x")
        assert far_store.recv(1) == b"x"  # the store's connection still works
        late = socket.create_connection(listener.getsockname())  # the listener still accepts
        listener.accept()[0].close()
        late.close()
    finally:
        for s in (listener, store, peer, kept, far_peer, far_store):
            s.close()


def test_each_generation_beats_under_its_own_keys():
    assert beat_prefix(0) == PREFIX
    assert beat_prefix(2).startswith(PREFIX + "/") and beat_prefix(2) != beat_prefix(1)
