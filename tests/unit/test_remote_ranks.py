"""The coordinator's table of ranks on other hosts (``cluster.coordinator.RemoteRanks``):
exits, lost agents, and which forwarded step records reach ``metrics.jsonl``."""

from __future__ import annotations

import json
import queue
from types import SimpleNamespace

from edgepool.cluster.coordinator import RemoteRanks


def _rec(step: int, plan_id: str) -> dict:
    return {"step": {"step": step, "loss": 1.0 + step, "step_time_s": 0.1, "samples_per_s": 80.0,
                     "tokens_per_s": 800.0, "plan_id": plan_id, "devices": {}}}


def _table(tmp_path):
    members = {n: object() for n in "abc"}
    coord = SimpleNamespace(events=queue.Queue(), members=members, told=[])
    coord.tell = lambda device, msg: coord.told.append((device, msg))
    spec = SimpleNamespace(out_dir=str(tmp_path), plan=SimpleNamespace(plan_id="p0", devices=["a", "b", "c"]))
    (tmp_path / "logs").mkdir()
    return coord, RemoteRanks(coord, spec)


def _steps(tmp_path) -> list[tuple[int, str]]:
    path = tmp_path / "metrics.jsonl"
    return [(r["step"], r["plan_id"]) for r in map(json.loads, path.read_text().splitlines())] if path.is_file() else []


def test_exits_and_lost_agents_become_codes_and_logs(tmp_path):
    coord, t = _table(tmp_path)
    a, b, c = (t.ranks[n] for n in "abc")
    assert a.poll() is None
    coord.events.put(("exit", "b", {"exit": -9, "reason": "killed by signal SIGKILL", "message": "rank 1 died"},
                      coord.members["b"]))
    coord.events.put(("lost", "c", {"reason": "connection closed"}, coord.members["c"]))
    coord.events.put(("exit", "a", {"exit": 0}, object()))  # a stale member's: ignored
    assert (a.poll(), b.poll(), c.poll()) == (None, -9, -9)
    assert "EDGEPOOL-ERROR b: killed by signal SIGKILL" in (tmp_path / "logs" / "b.log").read_text()
    assert "lost its connection (connection closed)" in (tmp_path / "logs" / "c.log").read_text()
    b.stop()
    assert coord.told and coord.told[0][0] == "b" and "stop" in coord.told[0][1]
    assert b.wait() == -9  # nothing to reap: it does not block


def test_only_the_running_plans_records_in_order_and_late_ones_of_the_steps_kept(tmp_path):
    coord, t = _table(tmp_path)
    for step in (0, 1):
        coord.events.put(("step", "a", _rec(step, "p0"), coord.members["a"]))
    t.pump()
    assert _steps(tmp_path) == [(0, "p0"), (1, "p0")]
    # a loss: the new plan goes on from step 3; the old plan's step 2 is still on its way,
    # and its step 3 was never finished by everyone (the step is redone)
    t.follow(SimpleNamespace(plan=SimpleNamespace(plan_id="p1")), 3)
    for step, pid, who in ((2, "p0", "a"), (3, "p0", "a"), (3, "p1", "c"), (4, "p1", "c"), (4, "p0", "a")):
        coord.events.put(("step", who, _rec(step, pid), coord.members[who]))
    t.pump()
    assert _steps(tmp_path) == [(0, "p0"), (1, "p0"), (2, "p0"), (3, "p1"), (4, "p1")]
    # another loss from step 6, when step 5's record went down with its rank 0: a gap
    t.follow(SimpleNamespace(plan=SimpleNamespace(plan_id="p2")), 6)
    coord.events.put(("step", "a", _rec(6, "p2"), coord.members["a"]))
    t.pump()
    assert _steps(tmp_path)[-1] == (6, "p2") and len(_steps(tmp_path)) == 6


def test_an_agent_back_is_offered_and_started_as_a_new_rank(tmp_path):
    coord, t = _table(tmp_path)
    back = []
    t.on_back = back.append
    coord.members["b"] = new = object()
    coord.events.put(("joined", "b", {}, new))
    t.pump()
    assert t.back == {"b"} and back == ["b"]
    sent = []
    coord.send_run = lambda m, run, rank, regroup, env: sent.append((m, rank, regroup, env))
    old = t.ranks["b"]
    rank, log = t.start(1, "b", {"EDGEPOOL_JOIN_GEN": "2"}, "join-2-b.log", run=None)
    assert sent == [(new, 1, True, {"EDGEPOOL_JOIN_GEN": "2"})] and t.back == set()
    assert rank is t.ranks["b"] is not old and rank.poll() is None and log.name == "b.log"
