"""Going on without a lost device: a new plan over the others, in memory or from the last checkpoint.

``train_recovering`` runs ``launch_local`` and, when a device is lost (its rank died,
or its heartbeat stopped for ``train.detect_s``: ``launch.local``), plans again over
the devices that are left, keeping the global batch (the planner, for the family the
run had: pp stays pp, a hybrid goes to ``auto``), and goes on:

- in memory first (``InMemory``, the rank side in ``runtime.regroup``): the survivors
  keep their processes, their snapshots and the replicas they keep of their peers'
  state (``train.replicate_every``); they regroup under the new plan over a new
  generation of process groups, and the lost ranks' part comes from a replica (or a
  dp twin), else from that step's checkpoint files. No process starts again. The new
  plan's layer boundaries are set with the state's moves counted (``planner.settle``:
  with few steps left or a slow link, layers stay where they are held);
- else (a survivor failed or stayed silent while regrouping, its snapshot does not match
  a checkpoint on disk) every rank starts again with ``--resume``: the newest good
  checkpoint resharded to the new plan (``runtime.reshard``), over the devices left and
  any standby. The lost run's logs move to ``DIR/logs-before-recovery-N/``.

Either way the steps after the checkpoint are redone. The run ends when every step is
done, when no device is left, or when there is no checkpoint to go on from.

Every loss is an event, in ``DIR/events.jsonl``, in ``summary.json`` (``events``) and
on the console: the device and why, the step at which it was lost, the step the run
went on from, how (``recovery``), the new ``plan_id``, whether the lost device's own
samples left the run with it (devices with data files of their own), and the recovery
time (from the loss to the next completed step).

Only a lost device is gone around: a rank killed by a signal (SIGKILL, the kernel's OOM
killer) or silent (frozen, cut off). A rank that fails on an error of its own would fail
again, so the run ends as before.

With ``train.rejoin_s`` a device that was lost (or left out of a new plan) is offered
back (``InMemory.offer``): when the planner predicts a step at least ``JOIN_GAIN``
shorter with it, every rank regroups at the next step boundary and the device's new
process joins with its state streamed from its peers (``runtime.regroup``: ``Joining``,
``Regroup.join``); else it stays a standby. Events ``device_joined`` and
``device_standby``.

Under ``edgepool serve`` the same handler follows ranks on other hosts
(``cluster.coordinator.RemoteRanks``) and takes devices back in when their agent joins
again; there a lost device's checkpoint files are on its own host, so its state must
come from a peer's memory. A survivor left out of a new plan hands nothing over (its
state comes from a twin, a replica or the files; held nowhere else, it stays in the plan).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from edgepool.errors import EdgepoolError
from edgepool.launch.local import Placement, RankFailed, launch_local
from edgepool.runtime import checkpoint
from edgepool.specs.metrics import StepRecord, Summary, read_summary, write_json


def replan(run, devices: list[str], log=print, every: bool = False):
    """The plan for ``run``'s job over ``devices`` only (the same family where one fits);
    ``every``: one that uses every device (in proportion to speed; ``planner.settle``
    then sets its order and boundaries)."""
    from edgepool.launch.prepare import family_plan, proportional_plan
    from edgepool.models.config import job_model_config

    pool = run.pool.model_copy(update={"devices": tuple(run.pool.device(d) for d in devices)})
    family = run.plan.parallelism
    if len(devices) == 1:
        family = "single"
    elif family in ("hybrid", "single"):
        family = "pp" if every else "auto"
    layers = job_model_config(run.job).num_layers
    return proportional_plan(pool, run.job, layers, family) if every else family_plan(pool, run.job, layers, family,
                                                                                       log=log)


def _data_lost(run, device: str) -> bool:
    """Whether ``device`` owned samples no other device has (a data file of its own)."""
    try:
        mine = run.job.data.path_for(device)
        return any(run.job.data.path_for(d) != mine for d in run.plan.devices if d != device) or \
            run.pool.device(device).host not in ("local", "emulated")  # a real host's file is its own
    except KeyError:
        return True


class _Events:
    """The run's ``device_lost`` events: built, logged, and completed with the recovery
    time at the first step the new plan finishes."""

    def __init__(self, out: Path, log, on_step, on_event):
        self.out, self.log, self.on_step, self.on_event = out, log, on_step, on_event
        self.events: list[dict] = []
        self.lost: set[str] = set()
        self.pending: tuple[dict, float] | None = None
        self.last_step = -1

    def step(self, rec: StepRecord) -> None:
        self.last_step = rec.step
        if self.pending is not None and rec.plan_id == self.pending[0]["plan_id"]:
            event, t_lost = self.pending
            took = "join_s" if event["event"] == "device_joined" else "recovery_s"
            event[took] = round(time.monotonic() - t_lost, 3)
            if "phases_s" in event:  # the new world, the state handed over, and the step redone
                event["phases_s"]["regroup_and_step"] = round(event[took] - sum(event["phases_s"].values()), 3)
            event["recovered_at"] = time.time()
            _record(self.out, event)
            if self.on_event is not None:
                self.on_event(event)
            self.pending = None
        if self.on_step is not None:
            self.on_step(rec)

    def lost_device(self, run, exc: RankFailed, t_lost: float, plan, left: list[str], from_step: int,
                    how: str, detected_at: float | None = None, phases: dict | None = None) -> dict:
        event = {"event": "device_lost", "device": exc.device, "reason": exc.reason,
                 "detected_at": detected_at or time.time(),
                 # the records of the steps before may still be on their way (a launcher elsewhere)
                 "lost_at_step": max(self.last_step + 1, from_step), "from_step": from_step,
                 "old_plan_id": run.plan.plan_id,
                 "plan_id": plan.plan_id, "parallelism": plan.parallelism, "devices": plan.devices,
                 "standby": [d for d in left if d not in plan.devices], "samples_lost": _data_lost(run, exc.device),
                 "recovery": how}
        if plan.estimate is not None:
            event["predicted_step_s"] = plan.estimate.step_time_s
        if event["samples_lost"]:
            event["samples_lost_from_step"] = from_step
        if phases:  # where the recovery's time went, up to the answer; the rest on step()
            event["phases_s"] = {k: round(v, 3) for k, v in phases.items()}
        self.events.append(event)
        self.log(f"event: device_lost {exc.device} at step {event['lost_at_step']} ({exc.reason}); going on from "
                 f"step {from_step} under plan {plan.plan_id} ({plan.parallelism} over {', '.join(plan.devices)}; "
                 f"{how})")
        self.pending = (event, t_lost)
        return event


    def joined(self, run, plan, devices: list[str], step: int, t0: float, before_s: float, after_s: float) -> dict:
        event = {"event": "device_joined", "device": ", ".join(devices), "joined": devices, "from_step": step,
                 "old_plan_id": run.plan.plan_id, "plan_id": plan.plan_id, "parallelism": plan.parallelism,
                 "devices": plan.devices, "predicted_before_s": before_s, "predicted_step_s": after_s,
                 "recovery": "in memory"}
        self.events.append(event)
        self.log(f"event: device_joined {event['device']} at step {step}: plan {plan.plan_id} ({plan.parallelism} over "
                 f"{', '.join(plan.devices)}), predicted step {after_s:.3f} s against {before_s:.3f} s")
        self.pending = (event, t0)
        return event

    def standby(self, run, device: str, before_s: float, after_s: float | None) -> None:
        event = {"event": "device_standby", "device": device, "at_step": self.last_step + 1,
                 "plan_id": run.plan.plan_id, "predicted_step_s": before_s, "predicted_with_s": after_s}
        self.events.append(event)
        _record(self.out, event)
        with_it = f"{after_s:.3f} s with it" if after_s is not None else "no plan that uses it"
        self.log(f"event: device_standby {device} at step {event['at_step']}: kept out (the planner predicts "
                 f"{with_it}, {before_s:.3f} s without)")


def predicted_step_s(run, plan) -> float:
    """The simulator's step for ``plan`` of ``run``'s job (its backups included), as the
    planner sees it: the same figure for the plan running and for one with more devices."""
    from edgepool.cost.model import shape_for
    from edgepool.planner.search import job_profile
    from edgepool.sim import simulate

    prof = job_profile(run.job)
    return simulate(plan, run.pool, prof, shape_for(prof, run.job.train.global_batch, run.job.train.seq_len)).step_time_s


JOIN_GAIN = 0.05  # a device is taken in when the planner predicts a step at least this much shorter


def _lost(run, exc: RankFailed) -> bool:
    """Whether ``exc`` is a lost device to go on without: killed by a signal (SIGKILL, the
    kernel's OOM killer) or silent (stopped here, -9). A rank that failed on an error of
    its own would fail again."""
    return run.job.train.recover and exc.rank >= 0 and exc.returncode < 0 and exc.device in run.plan.devices


class InMemory:
    """``launch_local``'s ``regroup``: the survivors keep their processes and state
    (``runtime.regroup`` has the protocol). Raises the failure when it cannot (the rank's
    own error, a survivor that does not report within ``wait_s``, no state to go on
    from); ``train_recovering`` then restarts from the checkpoint."""

    def __init__(self, events: _Events, *, wait_s: float, log=print):
        self.events, self.wait_s, self.log = events, wait_s, log
        self.store = None  # the run's store, set by ``launch_local``
        self.gen = 0
        self.standby: list = []  # processes left out of a new plan; they leave on their own
        self.away: dict[str, float] = {}  # devices out of the plan -> since when (lost, or left out)
        self.declined: set[tuple[str, str]] = set()  # (plan_id, device) the planner kept out
        # whether a device away can be started again (under ``serve``: its agent is back)
        self.available: Callable[[str], bool] = lambda device: True
        self.next_offer = 0.0

    def __call__(self, failure: RankFailed, run, procs: dict, logs: dict, beats):
        from edgepool.launch.local import _stop_all
        from edgepool.runtime.regroup import GEN, beat_prefix, key

        if not _lost(run, failure):
            raise failure
        t_lost, detected_at = time.monotonic(), time.time()
        _stop_all({failure.rank: procs[failure.rank]} if failure.rank in procs else {})
        self.gen += 1
        g = self.gen
        self.store.put(key(g, "lost"), json.dumps({"rank": failure.rank, "device": failure.device}).encode())
        _set_counter(self.store, GEN, g)
        self.away[failure.device] = time.monotonic()
        survivors = {r: p for r, p in procs.items() if r != failure.rank}
        reports: dict[int, dict] = {}
        deadline = time.monotonic() + self.wait_s
        t_cut = time.monotonic()
        while len(reports) < len(survivors):
            held = self.store.items(key(g, "held/"))
            reports = {int(k.rsplit("/", 1)[1]): json.loads(v) for k, v in held.items()}
            gone = [r for r, p in survivors.items() if p.poll() is not None]
            if gone or time.monotonic() > deadline:
                self.log(f"regrouping failed ({'rank ' + str(gone[0]) + ' exited' if gone else 'no report within '}"
                         f"{'' if gone else f'{self.wait_s:g} s'}); restarting from the checkpoint")
                self._stop(g, "another device was lost while regrouping")
                raise failure
            time.sleep(0.02)
        out = Path(run.out_dir)
        t_reported = time.monotonic()
        left = [run.plan.devices[r] for r in sorted(survivors)]
        try:
            plan = replan(run, left, log=self.log)
        except EdgepoolError as why:
            self._stop(g, f"no plan fits the devices left: {why}")
            raise RankFailed(f"{failure}; no plan fits the devices left ({', '.join(left)}): {why}", rank=failure.rank,
                             device=failure.device, returncode=failure.returncode, reason=failure.reason,
                             log=failure.log) from None
        # A survivor the new plan leaves out (a standby) leaves without handing anything
        # over: its state, like a lost rank's, comes from a twin, a replica or the files.
        staying = {r: reports[r] for r in survivors if run.plan.devices[r] in plan.devices}
        gone = [r for r in range(run.plan.world_size) if r not in staying]
        step, source, holders, files = self._state(run, out, staying, gone)
        if source != "memory" and len(staying) < len(survivors):
            # A survivor left out holds state nobody else does (its replica went with the
            # lost device, and no checkpoint here has it: under ``serve`` the files stay
            # on each host): keep every survivor in the plan and go on from memory.
            kept = self._state(run, out, {r: reports[r] for r in survivors}, [failure.rank])
            if kept[1] == "memory":
                plan, (step, source, holders, files) = replan(run, left, every=True), kept
                self.log(f"keeping every survivor ({', '.join(left)}) in the plan: the state of a device the planner "
                         "left out is held nowhere else")
        if step is None:
            self._stop(g, "no state to go on from")
            raise failure
        if source == "memory":
            plan = self._settle(run, plan, holders, files, step)
        ranks = {r: (plan.devices.index(run.plan.devices[r]) if run.plan.devices[r] in plan.devices else None)
                 for r in survivors}
        _truncate_metrics(out / "metrics.jsonl", step)
        self.events.lost.add(failure.device)
        how = ("in memory" if source == "memory" and not files else
               f"in memory, the state of {', '.join(run.plan.devices[r] for r in files)} from the checkpoint"
               if source == "memory" else "in memory, state from the checkpoint")
        phases = {"stop_lost": t_cut - t_lost, "reports": t_reported - t_cut, "plan": time.monotonic() - t_reported}
        self.events.lost_device(run, failure, t_lost, plan, left, step, how, detected_at=detected_at, phases=phases)
        new_run = run.model_copy(update={"plan": plan, "resume": True})
        new_run.dump(out / "run.json")
        beats.follow(beat_prefix(g))
        self.store.put(key(g, "plan"), json.dumps({"plan": plan.model_dump(mode="json"), "step": step,
                                                   "source": source, "files": files,
                                                   "holders": {str(r): h for r, h in holders.items()},
                                                   "ranks": {str(r): j for r, j in ranks.items()}}).encode())
        self.standby += [procs[r] for r, j in ranks.items() if j is None]
        self.away.update({run.plan.devices[r]: float("-inf") for r, j in ranks.items() if j is None})
        return (new_run, {j: procs[r] for r, j in ranks.items() if j is not None},
                {j: logs[r] for r, j in ranks.items() if j is not None})

    def offer(self, run, procs: dict, logs: dict, beats, start):
        """``launch_local``'s poll between steps: take a device back in when one is away
        (lost ``train.rejoin_s`` ago, or left out of the plan) and the planner predicts a
        step at least ``JOIN_GAIN`` shorter with it; else it stays a standby (said once per
        plan). Returns what ``__call__`` does, or None when nothing changed."""
        after = run.job.train.rejoin_s
        now = time.monotonic()
        if not after or now < self.next_offer:
            return None
        self.next_offer = now + 1.0
        cands = [d for d, t in self.away.items() if now - t >= after and d not in run.plan.devices
                 and (run.plan.plan_id, d) not in self.declined and self.available(d)]
        # nothing to take in, the last event's plan has not finished a step yet, or the run ends
        if not cands or self.events.pending is not None or self.events.last_step + 2 >= run.steps:
            return None
        try:
            plan = replan(run, [*run.plan.devices, *cands], log=lambda m: None)
        except EdgepoolError:
            plan = None
        joining = [d for d in plan.devices if d not in run.plan.devices] if plan is not None else []
        before_s = predicted_step_s(run, run.plan)
        after_s = predicted_step_s(run, plan) if joining else None
        if not joining or any(d not in plan.devices for d in run.plan.devices) or after_s > before_s * (1 - JOIN_GAIN):
            for d in cands:
                self.declined.add((run.plan.plan_id, d))
                self.events.standby(run, d, before_s, after_s)
            return None
        return self._join(run, plan, joining, procs, logs, beats, start, before_s, after_s)

    def _join(self, run, plan, joining: list[str], procs: dict, logs: dict, beats, start, before_s, after_s):
        """Take ``joining`` in at the next step boundary (``runtime.regroup``): every rank
        reports its snapshot of that step, the new devices' processes start and join, and
        their state comes from the ranks that hold it."""
        from edgepool.launch.local import _stop_all
        from edgepool.runtime.regroup import JOIN, beat_prefix, key

        t0 = time.monotonic()
        self.gen += 1
        g = self.gen
        self.store.put(key(g, "join"), json.dumps({"devices": joining}).encode())
        taking = run.model_copy(update={"plan": plan})
        started = {d: start(plan.devices.index(d), d, {"EDGEPOOL_JOIN_GEN": str(g), "EDGEPOOL_DEVICE": d},
                            f"join-{g}-{d}.log", taking) for d in joining}
        _set_counter(self.store, JOIN, g)
        self.log(f"taking {', '.join(joining)} in at the next step boundary (predicted step {after_s:.3f} s against "
                 f"{before_s:.3f} s)")
        deadline = time.monotonic() + self.wait_s
        while True:
            reports = {int(k.rsplit("/", 1)[1]): json.loads(v) for k, v in self.store.items(key(g, "held/")).items()}
            came = {k.rsplit("/", 1)[1] for k in self.store.items(key(g, "joiner/"))}
            if len(reports) == len(procs) and all(d in came for d in joining):
                break
            late = time.monotonic() > deadline
            # a rank of the run in trouble (a loss follows), or a device to take in that is not there
            trouble = late and len(reports) < len(procs) or any(p.poll() is not None for p in procs.values())
            failed = [d for d, (p, _) in started.items() if p.poll() is not None or late]
            if trouble or failed:
                _stop_all({i: p for i, (p, _) in enumerate(started.values())})
                self.away.update({d: time.monotonic() for d in joining})
                if trouble:
                    self.store.put(key(g, "plan"), json.dumps({"again": True}).encode())
                    self.log(f"taking {', '.join(joining)} in was called off: a device of the run stopped answering")
                    return None
                self.log(f"{', '.join(failed)} could not be taken in; going on without")
                plan, joining, started = run.plan, [], {}
                continue
            time.sleep(0.02)
        out = Path(run.out_dir)
        step, source, holders, _ = self._state(run, out, reports, [])
        ranks = {r: plan.devices.index(run.plan.devices[r]) for r in procs}
        _truncate_metrics(out / "metrics.jsonl", step)
        new_run = run.model_copy(update={"plan": plan, "resume": True})
        new_run.dump(out / "run.json")
        beats.follow(beat_prefix(g))
        self.store.put(key(g, "plan"), json.dumps({
            "plan": plan.model_dump(mode="json"), "old_plan": run.plan.model_dump(mode="json"), "step": step,
            "source": source, "files": [], "holders": {str(r): h for r, h in holders.items()},
            "ranks": {str(r): j for r, j in ranks.items()},
            "joined": {d: plan.devices.index(d) for d in joining}}).encode())
        if joining:
            for d in joining:
                self.away.pop(d, None)
            self.events.joined(run, plan, joining, step, t0, before_s, after_s)
        new_procs = {ranks[r]: p for r, p in procs.items()}
        new_logs = {ranks[r]: logs[r] for r in procs}
        for d, (p, path) in started.items():
            new_procs[plan.devices.index(d)], new_logs[plan.devices.index(d)] = p, path
        return new_run, new_procs, new_logs

    def _stop(self, g: int, why: str) -> None:
        from edgepool.runtime.regroup import key

        self.store.put(key(g, "plan"), json.dumps({"stop": why}).encode())

    def _settle(self, run, plan, holders: dict, files: list, step: int):
        """``plan`` with the layer boundaries that end the run soonest, the state's moves
        between the devices left counted (``planner.settle``)."""
        from edgepool.cost.model import shape_for
        from edgepool.planner.search import job_profile
        from edgepool.planner.settle import settle
        from edgepool.sim import simulate

        prof = job_profile(run.job)
        shape = shape_for(prof, run.job.train.global_batch, run.job.train.seq_len)
        s = settle(plan, run.plan, holders, files, run.pool, prof, shape, run.steps - step)
        if not s.changed:
            return plan
        self.log(f"keeping layers where they are: plan {s.plan.plan_id} ({s.moved_bytes / 1e6:.1f} MB to move, "
                 f"{s.move_s:.2f} s; step {s.step_s:.3f} s) instead of the planner's {plan.plan_id} "
                 f"({s.planner_move_s:.2f} s to move; step {s.planner_step_s:.3f} s), {run.steps - step} steps left")
        objective = plan.estimate.objective if plan.estimate is not None else None
        return s.plan.with_estimate(simulate(s.plan, run.pool, prof, shape).to_estimate(objective))

    @staticmethod
    def _state(run, out: Path, reports: dict[int, dict], lost: list[int]):
        """The step to go on from and where its state comes from: the newest step that
        every survivor of the new plan (``reports``) holds a snapshot of
        (``runtime.regroup``) and at which each other old rank (``lost``: lost, or left
        out) has a twin among them (``specs.layout.twins``), a replica kept by one, or a
        checkpoint of this plan on disk. Returns (step, ``"memory"``,
        survivor -> the old ranks whose state it gives, lost ranks read from files);
        else the newest good checkpoint, (step, ``"checkpoint"``, {}, []); else None."""
        from edgepool.specs.layout import twins

        found = checkpoint.survey(out / "checkpoints", run.identity())
        pid = run.plan.plan_id
        common: set[int] | None = None
        for rep in reports.values():
            steps = {t for p, t in rep.get("snapshots", []) if p == pid}
            common = steps if common is None else common & steps
        for t in sorted(common or (), reverse=True):
            holders = {s: [s] for s in sorted(reports)}
            files: list[int] = []
            written = None
            for r in lost:
                if any(q in reports for q in twins(run.plan, r)):
                    continue
                keeper = next((s for s in sorted(reports) if [pid, t] in reports[s].get("replicas", {}).get(str(r), [])),
                              None)
                if keeper is not None:
                    holders[keeper].append(r)
                    continue
                if written is None:
                    written = checkpoint.read_manifest(checkpoint.step_dir(out / "checkpoints", t)) or {}
                if t in found.usable and written.get("plan_id") == pid:
                    files.append(r)
                else:
                    break
            else:
                return t, "memory", holders, files
        return (found.usable[0], "checkpoint", {}, []) if found.usable else (None, "", {}, [])

    def close(self) -> None:
        from edgepool.launch.local import _stop_all

        _stop_all(dict(enumerate(self.standby)))


def _set_counter(store, name: str, value: int) -> None:
    """Set the store's counter ``name`` (read by the ranks with ``add(name, 0)``) to ``value``."""
    store.add(name, value - int(store.add(name, 0)))


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of the steps before ``step`` (they are redone from there), in a
    file written anew (``launch.local`` then reads it from its start)."""
    from edgepool.specs.metrics import read_metrics

    if path.is_file():
        kept = [r for r in read_metrics(path) if r.step < step]
        checkpoint.atomic_write_bytes(path, "".join(r.model_dump_json() + "\n" for r in kept).encode())


def train_recovering(run, *, placement: Placement | None = None, on_step: Callable[[StepRecord], None] | None = None,
                     on_event: Callable[[dict], None] | None = None, log=print, **launch) -> Summary | None:
    """``launch_local(run)``, going on without each device it loses while ``train.recover``:
    in memory first (``InMemory``), else from the checkpoint with every rank restarted."""
    out = Path(run.out_dir)
    events = _Events(out, log, on_step, on_event)
    env = dict(launch.pop("env", None) or {})
    regroup = InMemory(events, wait_s=run.job.train.detect_s + run.job.train.timeout_s, log=log) \
        if run.job.train.recover else None
    try:
        while True:
            try:
                summary = launch_local(run, placement=placement, on_step=events.step, env=env or None,
                                       regroup=regroup, **launch)
                break
            except RankFailed as exc:
                t_lost = time.monotonic()
                if regroup is not None and regroup.gen:  # the run regrouped: its newest plan is in run.json
                    run = run.read(out / "run.json")
                events.lost.add(exc.device)
                left = [d for d in run.pool.device_names if d not in events.lost]  # the plan's, and any standby
                if not _lost(run, exc) or not left:
                    raise
                found = checkpoint.survey(out / "checkpoints", run.identity())
                if not found.usable:
                    raise RankFailed(f"{exc}; no checkpoint to go on from (set train.checkpoint_every)",
                                     rank=exc.rank, device=exc.device, returncode=exc.returncode, reason=exc.reason,
                                     log=exc.log) from None
                try:
                    plan = replan(run, left, log=log)
                except EdgepoolError as why:
                    raise RankFailed(f"{exc}; no plan fits the devices left ({', '.join(left)}): {why}",
                                     rank=exc.rank, device=exc.device, returncode=exc.returncode, reason=exc.reason,
                                     log=exc.log) from None
                events.lost_device(run, exc, t_lost, plan, left, found.usable[0], "restart from the checkpoint")
                logs = out / "logs"
                if logs.is_dir():  # the lost run's logs stay (the next launch writes new ones)
                    logs.rename(out / f"logs-before-recovery-{len(events.events)}")
                run = run.model_copy(update={"plan": plan, "resume": True})
                env["EDGEPOOL_FAULT"] = ""  # a drill's fault fires once
                if regroup is not None:
                    regroup.gen = 0
    finally:
        if regroup is not None:
            regroup.close()
    if summary is not None and events.events:
        summary = summary.model_copy(update={"events": events.events})
        write_json(out / "summary.json", summary)
        summary = read_summary(out / "summary.json")
    return summary


def _record(out: Path, event: dict) -> None:
    with open(out / "events.jsonl", "a") as f:
        f.write(json.dumps(event) + "\n")
