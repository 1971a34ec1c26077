"""``edgepool serve`` and ``edgepool join`` on loopback, as a user tries a pool on one machine.

Real processes: a coordinator, one agent per device (each starts its own rank), the
pool token, the authenticated store. The per-step losses equal ``edgepool train`` of
the same plan; refused agents (wrong token, no token, replayed handshake, unknown or
duplicate name, another version) exit non-zero within 2 s with one line and learn
nothing of the run, which completes without them; nothing listens on every interface;
no device's data crosses the wire (a raw capture of loopback, root only).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from edgepool.cli.main import main

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "src" / "edgepool" / "data" / "corpus.txt"
DEVICES = [("a", "host-cpu", 2.0), ("b", "jetson-orin-nano", 1.5), ("c", "jetson-nano", 1.0)]
STEPS = 3


def _pool(tmp: Path, host: str, devices=DEVICES) -> Path:
    p = tmp / f"pool-{host}-{len(devices)}.yaml"
    p.write_text(yaml.safe_dump({"name": "loop", "network": {"medium": "shared", "bandwidth_mbps": 100, "latency_ms": 2},
                                 "devices": [{"name": n, "kind": k, "host": host, "compute_scale": s}
                                             for n, k, s in devices]}))
    return p


def _job(tmp: Path, data: str, name: str = "job.yaml", **train) -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump({"model": {"family": "gpt", "size": "tiny"}, "data": {"path": data},
                                 "train": {"global_batch": 8, "seq_len": 32, "steps": STEPS, "seed": 0, **train},
                                 "parallelism": {"mode": "dp", "num_microbatches": 2, "schedule": "1f1b"}}))
    return p


def _plan(tmp: Path, pool: Path, job: Path, family: str) -> Path:
    from edgepool.launch.prepare import proportional_plan
    from edgepool.specs import load_job, load_pool

    plan = proportional_plan(load_pool(pool), load_job(job), 4, family)
    p = tmp / f"plan-{family}.json"
    p.write_text(plan.dumps())
    return p


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgepool.cli.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """A coordinator process; its log lines as they come."""

    def __init__(self, *args: str):
        self.proc = _cli("serve", *args, "--no-progress")
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        for ln in self.proc.stderr:
            self.lines.append(ln.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 60.0) -> str:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            for ln in list(self.lines):
                if re.search(pattern, ln):
                    return ln
            if self.proc.poll() is not None and not self._t.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"serve never said {pattern!r}; it said: {self.lines}")

    def finish(self, timeout: float = 180.0) -> int:
        rc = self.proc.wait(timeout)
        self._t.join(5)
        return rc


def _finish(procs, timeout=180.0) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        out.append((p.returncode, err))
    return out


def _losses(out: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]


MARKER = "QZXJ-EDGEPOOL-PRIVATE-{device}-7731"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The pool token, and each device's own data file: the corpus with its marker every few lines."""
    tmp = tmp_path_factory.mktemp("pool")
    assert main(["token", "new", "-o", str(tmp / "pool.token")]) == 0
    assert (tmp / "pool.token").stat().st_mode & 0o777 == 0o600
    lines = CORPUS.read_text().splitlines()
    for name, _, _ in DEVICES:
        mark = MARKER.format(device=name)
        (tmp / f"data-{name}.txt").write_text("\n".join(f"{ln} {mark}" if i % 4 == 0 else ln
                                                        for i, ln in enumerate(lines)) + "\n")
    return tmp


def _data(tmp: Path) -> str:
    return str(tmp / "data-{device}.txt")


class Capture:
    """Every frame on loopback (an AF_PACKET socket; root), to search for bytes that must not travel."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.2)
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.frames.append(self.sock.recv(1 << 17))
            except socket.timeout:
                pass

    def stop(self) -> tuple[bytes, int]:
        """All captured bytes, and the frames the kernel dropped (PACKET_STATISTICS)."""
        import struct

        self._stop.set()
        self._t.join()
        _, drops = struct.unpack("II", self.sock.getsockopt(263, 6, 8))  # SOL_PACKET, PACKET_STATISTICS
        self.sock.close()
        return b"".join(self.frames), drops


def _forms(text: str) -> list[bytes]:
    """The marker as text, and as byte-tokenizer ids in int64 and int32 (how tokens travel, if they do)."""
    import struct

    ids = list(text.encode())
    return [text.encode(), struct.pack(f"<{len(ids)}q", *ids), struct.pack(f"<{len(ids)}i", *ids)]


def _listeners(pids: set[int]) -> list[str]:
    """Listening TCP sockets (``ss -ltnp``) of these processes and their descendants."""
    def tree() -> set[int]:
        parent = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    parent[int(d.name)] = int(re.search(r"PPid:\s+(\d+)", (d / "status").read_text()).group(1))
                except (OSError, AttributeError):
                    pass
        ours = set(pids)
        grew = True
        while grew:
            more = {p for p, pp in parent.items() if pp in ours} - ours
            grew = bool(more)
            ours |= more
        return ours

    ours = tree()
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
    return [ln for ln in out if any(int(m) in ours for m in re.findall(r"pid=(\d+)", ln))]


def _run_pool(tmp: Path, family: str, *, watch=None, devices=DEVICES, tag: str = "") -> tuple[list[float], list[str]]:
    pool = _pool(tmp, "127.0.0.1", devices)
    job = _job(tmp, _data(tmp))
    plan = _plan(tmp, pool, job, family)
    port, token = _port(), str(tmp / "pool.token")
    out = tmp / f"serve-{family}{tag}"
    serve = Serve("--pool", str(pool), "--job", str(job), "--out", str(out), "--token", token, "--port", str(port),
                  "--plan", str(plan), "--steps", str(STEPS))
    serve.wait_for("listening on 127.0.0.1")
    agents = [_cli("join", "--coordinator", f"127.0.0.1:{port}", "--token", token, "--device", n,
                   "--work", str(tmp / f"work-{family}{tag}-{n}")) for n, _, _ in devices]
    seen = watch(serve, agents) if watch else []
    results = _finish(agents)
    assert serve.finish() == 0, serve.lines
    assert all(rc == 0 for rc, _ in results), results
    return _losses(out), seen


@pytest.mark.parametrize("family", ["pp", "hybrid"])
def test_serve_and_three_agents_equal_train(setup, family):
    tmp = setup
    local = _pool(tmp, "local")
    job = _job(tmp, _data(tmp))
    out = tmp / f"train-{family}"
    done, seen_train = threading.Event(), set()

    def poll():  # `train`'s own ranks: their store (rank 0's) and gloo listen on loopback only
        while not done.is_set():
            seen_train.update(re.sub(r"\s+", " ", ln) for ln in _listeners({os.getpid()}))
            time.sleep(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        assert main(["train", "--pool", str(local), "--job", str(job), "--plan", str(_plan(tmp, local, job, family)),
                     "--steps", str(STEPS), "--out", str(out), "--no-progress"]) == 0
    finally:
        done.set()
        poller.join()

    def listening(serve, agents):  # while the ranks train: who listens where, polled until the run ends
        seen: set[str] = set()
        while any(a.poll() is None for a in agents):
            seen.update(re.sub(r"\s+", " ", ln) for ln in _listeners({serve.proc.pid, *(a.pid for a in agents)}))
            time.sleep(0.1)
        return sorted(seen)

    got, listeners = _run_pool(tmp, family, watch=listening)
    want = _losses(out)
    assert len(got) == len(want) == STEPS
    assert got == pytest.approx(want, rel=1e-5)
    assert len({re.search(r"pid=(\d+)", ln).group(1) for ln in listeners}) > 1, \
        f"expected the coordinator's and the ranks' (gloo's) listening sockets: {listeners}"
    assert len(seen_train) > 1, seen_train
    wild = [ln for ln in [*listeners, *seen_train] if re.search(r"\s(0\.0\.0\.0|\*|\[::\]|::):\d+\s", ln)]
    assert not wild, f"listening on every interface: {wild}"
    summary = json.loads((tmp / f"serve-{family}" / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["parallelism"] == family


def _refused_quickly(proc: subprocess.Popen) -> str:
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=30)
    took = time.monotonic() - t0
    lines = err.strip().splitlines()
    assert proc.returncode != 0, err
    assert len(lines) == 1 and lines[0].startswith("edgepool join: error: "), err
    assert took < 2.0, f"took {took:.1f} s"
    return lines[0]


def _hello(port: int, token: bytes, **hello) -> list[dict]:
    """Every message the coordinator sends an agent that says ``hello``, until it closes."""
    from edgepool.cluster.channel import ChannelError, connect
    from edgepool.cluster.trust import tls_context

    ch = connect("127.0.0.1", port, tls_context(token, server=False))
    ch.send({"hello": "join", "facts": {}, **hello})
    got = []
    try:
        while True:
            got.append(ch.recv(timeout=5.0))
    except ChannelError:
        pass
    ch.close()
    return got


def test_refused_agents_learn_nothing_and_the_run_goes_on(setup):
    import edgepool
    from edgepool.cluster.trust import read_token

    tmp = setup
    devices = DEVICES[:2]
    pool = _pool(tmp, "127.0.0.1", devices)
    job = _job(tmp, str(CORPUS))
    port, token = _port(), str(tmp / "pool.token")
    other = tmp / "other.token"
    if not other.exists():
        assert main(["token", "new", "-o", str(other)]) == 0
    serve = Serve("--pool", str(pool), "--job", str(job), "--out", str(tmp / "serve-refusals"), "--token", token,
                  "--port", str(port), "--parallelism", "dp", "--steps", "2")
    serve.wait_for("listening on")
    coordinator = f"127.0.0.1:{port}"

    def join(*args: str) -> subprocess.Popen:
        return _cli("join", "--coordinator", coordinator, *args)

    # A wrong token: TLS refuses it both ways.
    line = _refused_quickly(join("--token", str(other), "--device", "a", "--work", str(tmp / "w-x")))
    assert "token" in line
    serve.wait_for("refused a connection from 127.0.0.1")
    # No token.
    assert "no pool token" in _refused_quickly(join("--device", "a"))
    # A name that is not in the pool.
    assert "not in pool" in _refused_quickly(join("--token", token, "--device", "zz"))
    serve.wait_for(r"refused device 'zz'")
    # A duplicate name: a joins, then another a.
    first = join("--token", token, "--device", "a", "--work", str(tmp / "w-a"))
    serve.wait_for(r"^a joined")
    assert "already joined" in _refused_quickly(join("--token", token, "--device", "a"))
    # Another version, and what a refused agent receives: one refusal, nothing else.
    tok = read_token(token)
    for hello, why in (({"device": "b", "version": "0.0.0"}, "edgepool 0.0.0"),
                       ({"device": "zz", "version": edgepool.__version__}, "not in pool")):
        got = _hello(port, tok, **hello)
        assert len(got) == 1 and list(got[0]) == ["refused"] and why in got[0]["refused"], got
    # A replayed handshake: what an agent sent, recorded and sent again, is refused.
    recorded = _record_join(port, tok)
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(recorded)
        back = b""
        try:
            while chunk := s.recv(65536):
                back += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    assert time.monotonic() - t0 < 2.0
    serve.wait_for("refused a connection from 127.0.0.1.*TLS")
    assert b'"run"' not in back and b"plan" not in back
    # The run goes on with a and b.
    second = join("--token", token, "--device", "b", "--work", str(tmp / "w-b"))
    results = _finish([first, second])
    assert serve.finish() == 0, serve.lines
    assert all(rc == 0 for rc, _ in results), results
    assert len(_losses(tmp / "serve-refusals")) == 2


def _record_join(port: int, token: bytes) -> bytes:
    """The bytes a real agent sends to the coordinator in a refused join (a name not in
    the pool, so the run is not disturbed), recorded through a relay."""
    from edgepool.cluster.channel import ChannelError, connect
    from edgepool.cluster.trust import tls_context

    relay = socket.create_server(("127.0.0.1", 0))
    recorded = bytearray()

    def pump(src, dst, keep):
        try:
            while data := src.recv(65536):
                if keep:
                    recorded.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def serve_relay():
        client, _ = relay.accept()
        upstream = socket.create_connection(("127.0.0.1", port))
        threading.Thread(target=pump, args=(upstream, client, False), daemon=True).start()
        pump(client, upstream, True)

    t = threading.Thread(target=serve_relay, daemon=True)
    t.start()
    ch = connect("127.0.0.1", relay.getsockname()[1], tls_context(token, server=False))
    ch.send({"hello": "join", "device": "zz-recorded", "version": "x", "facts": {}})
    try:
        ch.recv(timeout=5.0)
    except ChannelError:
        pass
    ch.close()
    t.join(5)
    relay.close()
    assert recorded
    return bytes(recorded)


@pytest.mark.root
def test_raw_data_never_crosses_the_wire(setup):
    """Every byte on loopback during serve/join runs of dp, tp, sp, pp and a hybrid: no
    device's marker (each file holds it every fourth line) appears, as text or as token
    ids. A marker sent on purpose is found (the capture works)."""
    if os.geteuid() != 0:
        pytest.skip("capturing loopback (AF_PACKET) needs root")
    tmp = setup
    cap = Capture()
    control = MARKER.format(device="control")
    with socket.create_server(("127.0.0.1", 0)) as srv, socket.create_connection(srv.getsockname()) as c:
        c.sendall(control.encode())
        srv.accept()[0].close()
    try:
        for family in ("dp", "tp", "sp"):
            _run_pool(tmp, family, devices=DEVICES[:2], tag="-captured")
        for family in ("pp", "hybrid"):
            _run_pool(tmp, family, tag="-captured")
    finally:
        data, drops = cap.stop()
    assert control.encode() in data, "the capture missed a marker sent on purpose"
    assert len(data) > 1 << 20, f"only {len(data)} bytes captured"
    assert drops == 0, f"the kernel dropped {drops} frames; the capture is incomplete"
    for name, _, _ in DEVICES:
        for form in _forms(MARKER.format(device=name)):
            assert form not in data, f"device {name}'s data crossed the wire ({form[:24]!r}...)"


def _two_agents_running(tmp: Path, tag: str) -> tuple[Serve, dict[str, subprocess.Popen]]:
    """A coordinator and agents a and b on a long dp run that does not go on without a
    lost device (``train.recover: false``; work folders ``work-TAG-*``), two steps done."""
    devices = DEVICES[:2]
    pool = _pool(tmp, "127.0.0.1", devices)
    job = _job(tmp, _data(tmp), f"job-{tag}.yaml", recover=False)
    port, token = _port(), str(tmp / "pool.token")
    serve = Serve("--pool", str(pool), "--job", str(job), "--out", str(tmp / f"serve-{tag}"), "--token", token,
                  "--port", str(port), "--parallelism", "dp", "--steps", "100000")
    serve.wait_for("listening on")
    agents = {n: _cli("join", "--coordinator", f"127.0.0.1:{port}", "--token", token, "--device", n,
                      "--work", str(tmp / f"work-{tag}-{n}")) for n, _, _ in devices}
    metrics = tmp / f"serve-{tag}" / "metrics.jsonl"
    t0 = time.monotonic()
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert time.monotonic() - t0 < 120, serve.lines
        time.sleep(0.2)
    return serve, agents


def test_a_killed_agent_is_named_and_nothing_is_left_running(setup):
    """SIGKILL one agent mid-run of a job that does not recover: its rank dies with it (the
    watchdog pipe), the coordinator names that device in one line and stops the others,
    every agent exits."""
    import signal

    serve, agents = _two_agents_running(setup, "killed")
    agents["b"].send_signal(signal.SIGKILL)
    t_kill = time.monotonic()
    assert serve.finish(timeout=60) == 2
    took = time.monotonic() - t_kill
    errors = [ln for ln in serve.lines if ln.startswith("edgepool serve: error:")]
    assert len(errors) == 1 and "device b" in errors[0], serve.lines
    rc_a, err_a = _finish([agents["a"]], timeout=60)[0]
    assert rc_a != 0 and len([ln for ln in err_a.splitlines() if "error:" in ln]) == 1, err_a
    agents["b"].wait(10)
    time.sleep(1.0)
    left = [d.name for d in Path("/proc").iterdir() if d.name.isdigit()
            and b"work-killed" in _cmdline(d)]
    assert not left, f"rank processes left: {left}"
    assert took < 30, f"the coordinator took {took:.1f} s to notice"


@pytest.mark.parametrize("how", ["KILL", "STOP"])
def test_a_rank_lost_on_its_host_and_the_pool_goes_on(setup, how):
    """pp over a, b and c under ``serve``: b's rank is SIGKILLed, or frozen by SIGSTOP,
    before step 3 (a drill in its agent's environment). The coordinator names b (its
    agent's report; a heartbeat silent in the coordinator's store, and then its agent
    stops it), the survivors regroup in memory
    with b's state from the backup a peer keeps, and the run finishes every step with the
    losses of an uninterrupted ``train`` of the same plan (1e-5); the event is in
    ``events.jsonl`` and ``summary.json``; every agent exits 0 and no rank is left."""
    tmp, steps = setup, 8
    job = _job(tmp, _data(tmp), "job-lossy.yaml", steps=steps, replicate_every=1)
    out = tmp / "train-lossy"  # the uninterrupted run, once for both
    if not (out / "summary.json").is_file():
        local = _pool(tmp, "local")
        assert main(["train", "--pool", str(local), "--job", str(job), "--plan", str(_plan(tmp, local, job, "pp")),
                     "--out", str(out), "--no-progress"]) == 0
    pool = _pool(tmp, "127.0.0.1")
    port, token = _port(), str(tmp / "pool.token")
    served = tmp / f"serve-lossy-{how}"
    serve = Serve("--pool", str(pool), "--job", str(job), "--out", str(served), "--token", token, "--port", str(port),
                  "--plan", str(_plan(tmp, pool, job, "pp")))
    serve.wait_for("listening on 127.0.0.1")
    agents = [_cli("join", "--coordinator", f"127.0.0.1:{port}", "--token", token, "--device", n,
                   "--work", str(tmp / f"work-lossy-{how}-{n}"),
                   env={**os.environ, **({"EDGEPOOL_FAULT": f"rank=1,step=3,signal={how}"} if n == "b" else {})})
              for n, _, _ in DEVICES]
    results = _finish(agents)
    assert serve.finish() == 0, serve.lines
    assert [rc for rc, _ in results] == [0, 2, 0], results  # b's agent reports its rank lost, and leaves
    got, want = _losses(served), _losses(out)
    assert len(got) == len(want) == steps
    assert got == pytest.approx(want, rel=1e-5)
    events = [json.loads(ln) for ln in (served / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["device"], e["recovery"]) for e in events] == [("device_lost", "b", "in memory")], events
    assert ("SIGKILL" if how == "KILL" else "no heartbeat") in events[0]["reason"], events
    assert events[0]["devices"] == ["a", "c"], events
    summary = json.loads((served / "summary.json").read_text())
    assert summary["steps"] == steps and summary["plan_id"] == events[0]["plan_id"] and summary["events"] == events
    assert any("device_lost b" in ln for ln in serve.lines), serve.lines
    left = [d.name for d in Path("/proc").iterdir() if d.name.isdigit() and b"work-lossy" in _cmdline(d)]
    assert not left, f"rank processes left: {left}"


def test_a_device_lost_under_serve_joins_again(setup):
    """dp over a, b and c, compute-bound and as fast, under ``serve`` with
    ``train.rejoin_s``: b's rank is SIGKILLed before step 2 and its agent leaves; a new
    agent for b joins the running run, the planner predicts a faster step with b again,
    and b is taken in at a step boundary, its state streamed from its peers. The run
    finishes over a, b and c with the losses of an uninterrupted ``train`` (1e-5)."""
    tmp, steps = setup, 150
    job = tmp / "job-back.yaml"
    job.write_text(f"model: {{family: gpt, size: tiny}}\ndata: {{path: {CORPUS}}}\n"
                   f"train: {{global_batch: 24, seq_len: 16, steps: {steps}, timeout_s: 30, rejoin_s: 0.2}}\n")

    def pool(host: str) -> Path:
        p = tmp / f"pool-back-{host}.yaml"
        p.write_text("network: {medium: switched, bandwidth_mbps: 1000}\ndevices:\n" + "".join(
            f"  - {{name: {d}, kind: host-cpu, host: '{host}', compute_scale: 0.01}}\n" for d in "abc"))
        return p

    out = tmp / "train-back"
    assert main(["train", "--pool", str(pool("local")), "--job", str(job), "--out", str(out), "--no-progress",
                 "--plan", str(_plan(tmp, pool("local"), job, "dp"))]) == 0
    port, token = _port(), str(tmp / "pool.token")
    served = tmp / "serve-back"
    serve = Serve("--pool", str(pool("127.0.0.1")), "--job", str(job), "--out", str(served), "--token", token,
                  "--port", str(port), "--plan", str(_plan(tmp, pool("127.0.0.1"), job, "dp")))
    serve.wait_for("listening on 127.0.0.1")

    def agent(n: str, tag: str = "", **env) -> subprocess.Popen:
        return _cli("join", "--coordinator", f"127.0.0.1:{port}", "--token", token, "--device", n,
                    "--work", str(tmp / f"work-back-{n}{tag}"), env={**os.environ, **env})

    agents = {n: agent(n, **({"EDGEPOOL_FAULT": "rank=1,step=2,signal=KILL"} if n == "b" else {})) for n in "abc"}
    first_b = _finish([agents["b"]], timeout=120)[0]
    assert first_b[0] == 2, first_b  # its rank was lost; it says so and leaves
    agents["b"] = agent("b", "-again")
    results = {n: _finish([p])[0] for n, p in agents.items()}
    assert serve.finish() == 0, "\n".join(serve.lines)
    assert all(rc == 0 for rc, _ in results.values()), results
    got, want = _losses(served), _losses(out)
    assert len(got) == len(want) == steps
    assert got == pytest.approx(want, rel=1e-5)
    events = [json.loads(ln) for ln in (served / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["device"]) for e in events] == [("device_lost", "b"), ("device_joined", "b")], events
    assert sorted(events[1]["devices"]) == ["a", "b", "c"] and events[1]["join_s"] > 0
    assert json.loads((served / "summary.json").read_text())["plan_id"] == events[1]["plan_id"]
    logs = "".join(p.read_text() for p in (tmp / "work-back-b-again" / "logs").glob("*.log"))
    assert "its state comes from its peers" in logs, logs[-2000:]


def _cmdline(d: Path) -> bytes:
    try:
        return (d / "cmdline").read_bytes()
    except OSError:
        return b""


def test_a_killed_coordinator_stops_every_agent(setup):
    """SIGKILL the coordinator mid-run: every agent notices (its channel closes), stops
    its rank and exits non-zero with one line; nothing is left running, nothing hangs."""
    import signal

    serve, agents = _two_agents_running(setup, "gone")
    serve.proc.send_signal(signal.SIGKILL)
    for n, (rc, err) in zip(agents, _finish(list(agents.values()), timeout=30)):
        assert rc != 0 and len([ln for ln in err.splitlines() if "error:" in ln]) == 1, (n, err)
    time.sleep(1.0)
    left = [d.name for d in Path("/proc").iterdir() if d.name.isdigit() and b"work-gone" in _cmdline(d)]
    assert not left, f"rank processes left: {left}"
