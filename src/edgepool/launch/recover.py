"""Going on without a lost device: a new plan over the others, from the last checkpoint.

``train_recovering`` runs ``launch_local`` and, when a device is lost (its rank died,
or its heartbeat stopped for ``train.detect_s``: ``launch.local``), plans again over
the pool's devices that are left (the plan's and any it left out), keeping the global batch (the planner, for the family the
run had: pp stays pp, a hybrid goes to ``auto``), and starts their ranks again with
``--resume``: the newest good checkpoint is resharded to the new plan
(``runtime.reshard``), and the steps after it are redone. The run ends when every step
is done, when no device is left, or when there is no checkpoint to go on from.

Every loss is an event, in ``DIR/events.jsonl``, in ``summary.json`` (``events``) and
on the console: the device and why, the step at which it was lost, the step the run
went on from, the new ``plan_id``, whether the lost device's own samples left the run
with it (devices with data files of their own), and the recovery time (from the loss
to the next completed step).

Only a lost device is gone around: a rank killed by a signal (SIGKILL, the kernel's OOM
killer) or silent (frozen, cut off). A rank that fails on an error of its own would fail
again, so the run ends as before. The lost run's logs move to
``DIR/logs-before-recovery-N/``.

This is the restart-from-checkpoint path: the survivors' processes start again. Keeping
them, with their state and in-memory replicas of their neighbours' (issue 12's aim),
is not built yet.
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


def replan(run, devices: list[str], log=print):
    """The plan for ``run``'s job over ``devices`` only (the same family where one fits)."""
    from edgepool.launch.prepare import family_plan
    from edgepool.models.config import job_model_config

    pool = run.pool.model_copy(update={"devices": tuple(run.pool.device(d) for d in devices)})
    family = run.plan.parallelism
    if len(devices) == 1:
        family = "single"
    elif family in ("hybrid", "single"):
        family = "auto"
    return family_plan(pool, run.job, job_model_config(run.job).num_layers, family, log=log)


def _data_lost(run, device: str) -> bool:
    """Whether ``device`` owned samples no other device has (a data file of its own)."""
    try:
        mine = run.job.data.path_for(device)
        return any(run.job.data.path_for(d) != mine for d in run.plan.devices if d != device) or \
            run.pool.device(device).host not in ("local", "emulated")  # a real host's file is its own
    except KeyError:
        return True


def train_recovering(run, *, placement: Placement | None = None, on_step: Callable[[StepRecord], None] | None = None,
                     on_event: Callable[[dict], None] | None = None, log=print, **launch) -> Summary | None:
    """``launch_local(run)``, going on without each device it loses while ``train.recover``."""
    out = Path(run.out_dir)
    events: list[dict] = []
    lost: set[str] = set()
    pending: tuple[dict, float] | None = None
    last = {"step": -1}

    def step(rec: StepRecord) -> None:
        nonlocal pending
        last["step"] = rec.step
        if pending is not None and rec.plan_id == pending[0]["plan_id"]:
            event, t_lost = pending
            event["recovery_s"] = round(time.monotonic() - t_lost, 3)
            event["recovered_at"] = time.time()
            _record(out, event)
            if on_event is not None:
                on_event(event)
            pending = None
        if on_step is not None:
            on_step(rec)

    env = dict(launch.pop("env", None) or {})
    while True:
        try:
            summary = launch_local(run, placement=placement, on_step=step, env=env or None, **launch)
            break
        except RankFailed as exc:
            t_lost = time.monotonic()
            lost.add(exc.device)
            left = [d for d in run.pool.device_names if d not in lost]  # the plan's, and any standby
            # Lost: killed by a signal (SIGKILL, the kernel's OOM killer) or silent (stopped here,
            # -9). A rank that failed on an error of its own would fail again: the run ends.
            if (not run.job.train.recover or exc.rank < 0 or exc.returncode >= 0 or exc.device not in run.plan.devices
                    or not left):
                raise
            found = checkpoint.survey(out / "checkpoints", run.identity())
            if not found.usable:
                raise RankFailed(f"{exc}; no checkpoint to go on from (set train.checkpoint_every)", rank=exc.rank,
                                 device=exc.device, returncode=exc.returncode, reason=exc.reason, log=exc.log) from None
            try:
                plan = replan(run, left, log=log)
            except EdgepoolError as why:
                raise RankFailed(f"{exc}; no plan fits the devices left ({', '.join(left)}): {why}", rank=exc.rank,
                                 device=exc.device, returncode=exc.returncode, reason=exc.reason, log=exc.log) from None
            event = {"event": "device_lost", "device": exc.device, "reason": exc.reason, "detected_at": time.time(),
                     "lost_at_step": last["step"] + 1, "from_step": found.usable[0], "old_plan_id": run.plan.plan_id,
                     "plan_id": plan.plan_id, "parallelism": plan.parallelism, "devices": plan.devices,
                     "standby": [d for d in left if d not in plan.devices], "samples_lost": _data_lost(run, exc.device)}
            if plan.estimate is not None:
                event["predicted_step_s"] = plan.estimate.step_time_s
            if event["samples_lost"]:
                event["samples_lost_from_step"] = found.usable[0]
            events.append(event)
            log(f"event: device_lost {exc.device} at step {event['lost_at_step']} ({exc.reason}); going on from step "
                f"{found.usable[0]} under plan {plan.plan_id} ({plan.parallelism} over {', '.join(plan.devices)})")
            pending = (event, t_lost)
            logs = out / "logs"
            if logs.is_dir():  # the lost run's logs stay (the next launch writes new ones)
                logs.rename(out / f"logs-before-recovery-{len(events)}")
            run = run.model_copy(update={"plan": plan, "resume": True})
            env["EDGEPOOL_FAULT"] = ""  # a drill's fault fires once
    if summary is not None and events:
        summary = summary.model_copy(update={"events": events})
        write_json(out / "summary.json", summary)
        summary = read_summary(out / "summary.json")
    return summary


def _record(out: Path, event: dict) -> None:
    with open(out / "events.jsonl", "a") as f:
        f.write(json.dumps(event) + "\n")
