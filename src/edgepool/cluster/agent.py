"""``edgepool join``: the agent on each device of a pool across hosts.

It reaches the coordinator over the pool's mutual TLS (``cluster.trust``; the token
never travels), names its device and edgepool version, and sends its facts: cores,
memory and the energy meters this host has, and once admitted a short matmul speed
probe (torch loads only then, so a refusal comes at once). It waits for the run, and then starts its device's rank as ``train`` does
(``launch.local.launch_local`` for this one rank: the rank cannot outlive the agent)
with the rendezvous on the coordinator's authenticated store (``cluster.store``) and
gloo bound to the interface that reaches the coordinator. The agent of rank 0 forwards
each step record (in a run that regroups after a loss, every agent: rank 0 may change);
every agent reports its rank's exit. When the coordinator says stop, or its connection
is lost, the rank is stopped. An agent that joins a running run (``train.rejoin_s``)
waits until the coordinator takes its device in, and leaves when the run ends first.

The data stays here: ``--data PATH`` replaces this device's file in the job (the run
description names paths only); samples are read by the rank and never sent. Results
of this device's rank (its log, checkpoints, and for rank 0 ``metrics.jsonl``) are
written to ``--work`` on this device.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import edgepool
from edgepool.cluster.channel import PING_S, WAIT_S, ChannelError, Unreachable, connect
from edgepool.errors import EdgepoolError, SpecError

JOIN_ENV = ("EDGEPOOL_JOIN_GEN", "EDGEPOOL_DEVICE")  # what a coordinator may add to a rank's environment

REACH_S = 120.0  # how long an agent keeps trying to reach a coordinator that is not up yet


class Refused(EdgepoolError):
    pass


def device_facts(kind: str | None = None) -> dict:
    """What this host has, cheaply (sent in the greeting): cores, memory, energy meters."""
    from edgepool.energy import meter_report

    facts: dict = {"cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                facts["memory_gb"] = round(int(line.split()[1]) / 1e6, 2)
    except OSError:
        pass
    facts["meters"] = [name for name, ok, _ in meter_report() if ok]
    if kind:
        facts["kind"] = kind
    return facts


def speed_probe(seconds: float = 0.2) -> float:
    """A short matmul probe, GFLOP/s (sent once admitted: torch loads only then)."""
    import torch

    n = 256
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return round(2 * n**3 * reps / (time.perf_counter() - t0) / 1e9, 2)


def join(coordinator: str, token_path, device: str, *, data: str | None = None, work: str | None = None,
         kind: str | None = None, log=print) -> int:
    """Join, train this device's part, report; 0 when the run ends well, else an error."""
    from edgepool.cluster.trust import read_token, tls_context
    from edgepool.machine import iface_of, parse_endpoint

    addr, port = parse_endpoint(coordinator, "--coordinator")
    token = read_token(token_path)
    if data is not None and not Path(data).is_file():
        raise SpecError(f"--data {data}: no such file on this device")
    facts = device_facts(kind)
    ctx, deadline, said = tls_context(token, server=False), time.monotonic() + REACH_S, False
    while True:  # the coordinator may not be up yet; a refusal is final at once
        try:
            ch = connect(addr, port, ctx)
            break
        except Unreachable as exc:
            if time.monotonic() > deadline:
                raise EdgepoolError(f"{exc}: no coordinator (`edgepool serve`) answered within {REACH_S:g} s") from None
            if not said:
                log(f"waiting for the coordinator at {coordinator} ({exc})")
                said = True
            time.sleep(0.5)
        except ChannelError as exc:
            raise EdgepoolError(str(exc)) from None
    try:
        ch.send({"hello": "join", "version": edgepool.__version__, "device": device, "facts": facts})
        msg = ch.recv(timeout=10.0)
        if "refused" in msg:
            raise Refused(f"the coordinator at {coordinator} refused {device}: {msg['refused']}")
        if "admitted" not in msg:
            raise EdgepoolError(f"the coordinator at {coordinator} answered neither admitted nor refused")
        log(f"admitted to pool {msg.get('pool')!r} as {device}; waiting for the run")
        done = threading.Event()
        threading.Thread(target=_ping, args=(ch, done), name="edgepool-ping", daemon=True).start()
        ch.send({"facts": {"gflops": speed_probe()}})
        while True:
            msg = ch.recv(timeout=WAIT_S)  # the coordinator pings every PING_S
            if "stop" in msg:
                raise EdgepoolError(f"the coordinator cancelled the run: {msg['stop']}")
            if "unused" in msg:
                log(f"{device} is not in this run: {msg['unused']}")
                return 0
            if "done" in msg:  # joined a running run that ended before taking this device in
                log(f"{device}: the run ended without taking this device in")
                return 0
            if "run" in msg:
                break
        try:
            return _run(ch, msg, device, data=data, work=work, token_path=Path(token_path).resolve(),
                        iface=iface_of(ch.sock.getsockname()[0]), log=log)
        finally:
            done.set()
    except ChannelError as exc:
        raise EdgepoolError(f"lost the coordinator at {coordinator}: {exc}") from None
    finally:
        ch.close()


def _ping(ch, done: threading.Event) -> None:
    """Tell the coordinator this agent is alive every ``PING_S`` (it counts ``WAIT_S`` of silence as gone)."""
    while not done.wait(PING_S):
        try:
            ch.send({"ping": True})
        except ChannelError:
            return


def _run(ch, msg: dict, device: str, *, data, work, token_path: Path, iface: str | None, log) -> int:
    from edgepool.data import check_file
    from edgepool.launch.local import RankFailed, Stopped, launch_local, pool_placement
    from edgepool.runtime.train import RunSpec
    from edgepool.sim.lower import is_data_owner

    run = RunSpec.model_validate(msg["run"])
    rank = int(msg["rank"])
    job = run.job
    if data is not None:
        job = job.model_copy(update={"data": job.data.model_copy(update={"paths": {**job.data.paths, device: data}})})
    out = Path(work or Path.home() / ".edgepool" / "work" / device).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = run.model_copy(update={"job": job, "out_dir": str(out)})
    log(f"rank {rank} of {run.plan.world_size} in plan {run.plan.plan_id}; results in {out}")
    try:
        if is_data_owner(run.plan, rank):
            check_file(job.data.path_for(device), seq_len=job.train.seq_len, fmt=job.data.format,
                       text_field=job.data.text_field, pretrained=job.model.pretrained)
    except SpecError as exc:
        ch.send({"exit": 2, "reason": f"its data: {exc}"})
        raise
    env = {"EDGEPOOL_STORE": msg["store"], "EDGEPOOL_RUN_ID": msg["run_id"], "EDGEPOOL_TOKEN_FILE": str(token_path)}
    # a run that goes on without a lost device (``runtime.regroup``): this rank may be rank 0
    # of a later plan, so every record it writes goes to the coordinator, which keeps the
    # running plan's and writes the summary
    regroup = bool(msg.get("regroup"))
    if regroup:
        env["EDGEPOOL_REGROUP"] = "1"
    # taken into a running run: the generation that takes it in (nothing else is taken from the message)
    env.update({k: str(v) for k, v in (msg.get("env") or {}).items() if k in JOIN_ENV})
    told: list[str] = []
    stop = threading.Event()
    threading.Thread(target=_listen, args=(ch, told, stop), name="edgepool-agent", daemon=True).start()

    def forward(rec) -> None:
        ch.send({"step": rec.model_dump(mode="json")})

    try:
        # An emulated device runs its rank in the testbed's sandbox for it, if one is up here.
        with pool_placement(run.pool, log=log, bring_up=False) as placement:
            if iface and not placement.env(device).get("GLOO_SOCKET_IFNAME"):
                env["GLOO_SOCKET_IFNAME"] = iface  # gloo binds where this agent reached the coordinator
            started = time.time()
            summary = launch_local(run, ranks=[rank], env=env, placement=placement, stop=stop,
                                   on_step=forward if rank == 0 or regroup else None, summary=not regroup)
        final: dict = {"exit": 0}
        if summary is not None:
            final["summary"] = summary.model_dump(mode="json")
        trace, ended = out / "trace.json", out / "summary.json"  # this rank was rank 0 at the end
        if ended.is_file() and ended.stat().st_mtime >= started and trace.is_file():
            import json

            final["trace"] = json.loads(trace.read_text())
        ch.send(final)
    except RankFailed as exc:
        _tell(ch, {"exit": exc.returncode or 1, "reason": exc.reason, "message": str(exc)})
        raise
    except Stopped:
        if not told:  # SIGTERM or SIGHUP to this agent
            _tell(ch, {"exit": 1, "reason": "its agent was stopped"})
            raise
        raise EdgepoolError(f"the coordinator stopped the run: {told[0]}") from None
    except Exception as exc:  # noqa: BLE001 - the coordinator hears why, not just a lost connection
        _tell(ch, {"exit": 1, "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
        raise
    while not told:  # the coordinator's "done", a failure elsewhere, or the coordinator lost (``_listen``)
        time.sleep(0.05)
    if told and told[0] != "done":
        raise EdgepoolError(f"the run failed elsewhere: {told[0]}")
    log(f"{device}: the run ended")
    return 0


def _tell(ch, msg: dict) -> None:
    try:
        ch.send(msg)
    except ChannelError:
        pass


def _listen(ch, told: list[str], stop: threading.Event) -> None:
    """While the rank runs: on the coordinator's stop, or its loss (silent ``WAIT_S``),
    set ``stop`` (``launch_local`` then stops the rank and raises ``Stopped``)."""
    while True:
        try:
            msg = ch.recv(timeout=WAIT_S)
        except ChannelError as exc:
            if not told:
                told.append(f"lost the coordinator ({exc})")
                stop.set()
            return
        if "done" in msg:
            told.append("done")
            return
        reason = msg.get("stop")
        if reason:
            told.append(str(reason))
            stop.set()
            return
