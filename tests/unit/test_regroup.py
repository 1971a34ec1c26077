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


def _pp4(tmp_path):
    """A RunSpec of a pipeline over a, b, c, d (backups: a->b->c->d->a)."""
    from edgepool.launch.prepare import prepare_run, proportional_plan
    from edgepool.specs import load_job, load_pool
    from edgepool.testing import CORPUS

    pool = tmp_path / "pool.yaml"
    pool.write_text("devices:\n" + "".join(f"  - {{name: {d}, kind: host-cpu, host: local}}\n" for d in "abcd"))
    job = tmp_path / "job.yaml"
    job.write_text(f"model: {{family: gpt, size: tiny}}\ndata: {{path: {CORPUS}}}\ntrain: {{global_batch: 4, seq_len: 16}}\n")
    plan = tmp_path / "plan.json"
    plan.write_text(proportional_plan(load_pool(pool), load_job(job), 4, "pp").dumps())
    return prepare_run(pool, job, out_dir=tmp_path / "run", plan_path=str(plan), log=lambda m: None)


def test_the_launcher_goes_on_from_the_newest_step_held_in_memory(tmp_path):
    """b is lost and the new plan leaves d out (a standby, which hands nothing over): the
    step to go on from is the newest that a and c both hold and at which b's replica (kept
    by c) and d's (kept by a) are held; a step missing one of them is passed over; with
    no step held in memory and no checkpoint there is nothing to go on from."""
    from edgepool.launch.recover import InMemory
    from edgepool.specs.layout import backups

    run = _pp4(tmp_path)
    pid = run.plan.plan_id
    assert backups(run.plan) == {0: 1, 1: 2, 2: 3, 3: 0}
    out = tmp_path / "run"
    reports = {0: {"snapshots": [[pid, 4], [pid, 5]], "replicas": {"3": [[pid, 4], [pid, 5]]}},
               2: {"snapshots": [[pid, 4], [pid, 5]], "replicas": {"1": [[pid, 4]]}}}
    assert InMemory._state(run, out, reports, [1, 3]) == (4, "memory", {0: [0, 3], 2: [2, 1]}, [])
    reports[2]["replicas"] = {"1": [["another plan", 5]]}
    assert InMemory._state(run, out, reports, [1, 3]) == (None, "", {}, [])
