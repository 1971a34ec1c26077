"""The training loop of one rank, and the run description every rank reads.

``RunSpec`` (written by the launcher to ``DIR/run.json``) holds the validated pool, job
and plan, so every rank, local or on another host, runs from the same facts. Rank 0
writes ``DIR/metrics.jsonl`` (one ``StepRecord`` per step), ``DIR/trace.json`` (the
timed ops of the last step on every rank) and ``DIR/summary.json`` (``specs.metrics``).

Memory: ``peak_memory_bytes`` is the peak resident set of the rank's process (CPU
tensors and the Python/torch runtime together), its own high-water mark (``machine.peak_rss_bytes``). ``cpu_s`` is the
CPU time the rank's process used in the step: the busy time the modelled energy meter
needs.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict

from edgepool.data import Sampler
from edgepool.errors import SpecError
from edgepool.models import build_model
from edgepool.models.config import ModelConfig, job_model_config
from edgepool.runtime import checkpoint
from edgepool.runtime.device import CPU
from edgepool.runtime.engine import Engine
from edgepool.models.lora import Tuning
from edgepool.runtime.reshard import full_shapes
from edgepool.runtime.groups import StageGroups, connect_store, init_world, shutdown, world_store
from edgepool.runtime.health import Comm, Heartbeat
from edgepool.runtime.regroup import Joining, Regroup, beat_prefix, restore
from edgepool.specs.job import JobSpec
from edgepool.specs.metrics import (DeviceStep, RankTrace, StepRecord, Summary, Trace, append_record, read_metrics,
                                    summarize, write_json)
from edgepool.specs.plan import Plan
from edgepool.specs.pool import PoolSpec
from edgepool.sim.lower import is_data_owner


class RunSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pool: PoolSpec
    job: JobSpec
    plan: Plan
    out_dir: str
    steps: int
    resume: bool = False
    threads: int = 1
    # a fine-tuning run (LoRA, freeze) from pretrained weights: the digest of those weights
    # (``models.hf.weights_digest``), which stay frozen and are never checkpointed
    base: str = ""

    def dump(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2))

    def identity(self) -> dict:
        """What makes a checkpoint this run's: the model and the training values that
        shape the trajectory. A checkpoint's manifest carries it; resuming needs all of
        it to match (``runtime.checkpoint.differences`` names what does not). The plan
        is not part of it: a checkpoint is resharded to the plan of the run that
        resumes it (``runtime.reshard``), on as many devices as that plan has."""
        import hashlib
        import json

        t = self.job.train
        model = json.dumps(job_model_config(self.job).to_dict(), sort_keys=True)
        return {"model": hashlib.sha256(model.encode()).hexdigest()[:10], "seed": t.seed,
                "global_batch": t.global_batch, "seq_len": t.seq_len, "optimizer": t.optimizer, "lr": t.lr,
                "weight_decay": t.weight_decay, **self._fine_tuning()}

    def _fine_tuning(self) -> dict:
        """LoRA, freezing, precision and the wire's compression shape the trajectory too, and a fine-tuning run's
        frozen pretrained base (its digest: the checkpoints hold only what trains); each
        is named only when set, so checkpoints written before they existed still resume."""
        t = self.job.train
        out: dict = {}
        if t.lora is not None:
            out["lora"] = t.lora.model_dump(mode="json")
        if t.freeze:
            out["freeze"] = list(t.freeze)
        if t.precision != "fp32":
            out["precision"] = t.precision
        if not t.wire.is_off:
            out["wire"] = t.wire.model_dump(mode="json")
        if self.base:
            out["base"] = self.base
        return out

    @classmethod
    def read(cls, path: Path) -> "RunSpec":
        return cls.model_validate_json(Path(path).read_text())


def initial_state(job: JobSpec, cfg: ModelConfig) -> dict[str, torch.Tensor] | None:
    """Pretrained weights in full-model names (parts the checkpoint lacks keep their seeded init)."""
    if job.model.pretrained is None:
        return None
    from edgepool.models.hf import load_pretrained

    _, state, _missing = load_pretrained(job.model.pretrained)
    full = build_model(cfg, seed=job.train.seed).state_dict()
    full.update(state)
    return full


def sampler_for(run: RunSpec, device: str, cfg: ModelConfig) -> Sampler:
    job = run.job
    return Sampler(
        path=job.data.path_for(device), seq_len=job.train.seq_len, family=cfg.family, seed=job.train.seed,
        mask_token_id=cfg.mask_token_id, mlm_fraction=cfg.mlm_fraction, fmt=job.data.format,
        text_field=job.data.text_field, pretrained=job.model.pretrained,
    )


def run_rank(rank: int, world_size: int, run: RunSpec, *, init_method: str | None = None, log=print,
             hard_exit: bool = False, meter_factory=None) -> Summary | None:
    """Train on this rank. Joins the world group unless one is already live (tests).

    Each step is one window of this rank's energy meter (``step_meter``, or
    ``meter_factory(run, device, engine) -> (meter, skipped)``); the step record carries
    every device's joules and the meter's source label.

    Under a launcher that recovers in memory (``runtime.regroup``), a lost peer does not
    end this rank: it regroups with the other survivors under the launcher's new plan,
    keeping its process and its state, and goes on (a standby, left out of the new plan,
    returns None).

    ``hard_exit`` (a rank process of its own): after a clean run and a final barrier,
    leave with ``os._exit(0)`` instead of tearing gloo down. Now and then (about 1 run
    in 7 here) gloo's teardown aborted a finished rank ("terminate called without an
    active exception"), which would report a good run as failed."""
    import os

    torch.set_num_threads(run.threads)
    out = Path(run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = CPU  # where tensors live (``runtime.device``); only the CPU is built today
    own_group = not dist.is_initialized()
    # a device the launcher takes into the running run (``runtime.regroup``): no world yet
    taken_in = int(os.environ.get("EDGEPOOL_JOIN_GEN") or 0) if own_group else 0
    if taken_in:
        store = connect_store(rank, timeout_s=run.job.train.timeout_s)
    else:
        if own_group:
            init_world(rank, world_size, init_method=init_method or "env://", timeout_s=run.job.train.timeout_s,
                       device=tensors)
        store = world_store()
    clean = False
    regroup = Regroup.from_env(store, run.job.train.timeout_s) if own_group else None
    heartbeat, comm, assignment = None, None, None
    if taken_in:
        if regroup is None:
            raise SpecError("EDGEPOOL_JOIN_GEN is set but the launcher does not regroup (EDGEPOOL_REGROUP)")
        assignment = regroup.join(os.environ["EDGEPOOL_DEVICE"], taken_in, log=log)
        run = run.model_copy(update={"plan": assignment.plan})
        rank = assignment.rank
    try:
        while True:
            plan = run.plan
            gen = assignment.gen if assignment is not None else 0
            heartbeat = (Heartbeat(store, rank, plan.world_size, store_host=_store_host(), prefix=beat_prefix(gen),
                                   regrouping=regroup.moved if regroup is not None else None).start()
                         if store is not None else None)
            comm = Comm(rank, plan.devices, heartbeat, run.job.train.timeout_s)
            try:
                summary = _train(run, rank, comm, heartbeat, tensors, log, meter_factory, regroup, assignment)
                break
            except Joining as j:  # devices taken in at this step boundary
                heartbeat.stop()
                assignment = regroup.rejoin(rank, plan.devices[rank], plan, log=log, gen=j.gen)
            except Exception as exc:  # noqa: BLE001 - a lost peer, when the launcher regroups
                if regroup is None or not _regrouping(regroup, exc, run.job.train.detect_s):
                    raise
                heartbeat.stop()
                assignment = regroup.rejoin(rank, plan.devices[rank], plan, log=log)
            if assignment.rank is None:  # a standby: this device is not in the new plan
                regroup.stop()
                clean = True
                return None
            run = run.model_copy(update={"plan": assignment.plan})
            rank = assignment.rank
        clean = True
        return summary
    finally:
        if regroup is not None:
            regroup.stop()
        if own_group and clean and hard_exit:
            import os
            import sys

            if dist.is_initialized():
                comm.barrier("waiting for every rank to finish")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        if own_group and clean and dist.is_initialized():
            comm.barrier("waiting for every rank to finish")
        if heartbeat is not None:
            heartbeat.stop() if clean else heartbeat.leave()
        if own_group:
            shutdown(clean=False)


def _regrouping(regroup, exc: BaseException, detect_s: float) -> bool:
    """Whether ``exc`` is a peer lost in a run that regroups: a failed collective or
    transfer, and the launcher starting a new generation within the detection bound."""
    from edgepool.errors import PeerError

    if not isinstance(exc, (PeerError, RuntimeError)) or isinstance(exc, SpecError):
        return False
    return regroup.moved.wait(detect_s + 4 * regroup.beat_s + 2.0)


def _train(run: RunSpec, rank: int, comm: Comm, heartbeat, tensors, log, meter_factory, regroup,
           assignment) -> Summary | None:
    """One generation of the run: this rank's engine under ``run.plan``, from step 0, a
    checkpoint, or (``assignment``) the state the survivors kept."""
    job, plan = run.job, run.plan
    out = Path(run.out_dir)
    if dist.get_world_size() != plan.world_size:
        raise SpecError(f"the plan has {plan.world_size} devices but {dist.get_world_size()} ranks joined")
    cfg = job_model_config(job)
    identity = run.identity()
    device = plan.devices[rank]
    # In-memory backups (``runtime.regroup``): every ``replicate_every`` steps each rank
    # snapshots its state and backs it up on a peer, in the background over a group of
    # their own; without them, the snapshot of each checkpoint step. A new plan starts
    # its own, from the state it starts with.
    replicate = backup_every(run) if regroup is not None and plan.world_size > 1 else 0
    groups = StageGroups.build(plan, rank, job.train.timeout_s, device=tensors, backups=bool(replicate))
    sampler = sampler_for(run, device, cfg) if is_data_owner(plan, rank) else None
    tuning = Tuning.of(job.train)
    engine = Engine(
        plan, cfg, rank=rank, sampler=sampler, global_batch=job.train.global_batch, seq_len=job.train.seq_len,
        groups=groups, lr=job.train.lr, optimizer=job.train.optimizer, weight_decay=job.train.weight_decay,
        seed=job.train.seed, timeout_s=job.train.timeout_s, tuning=tuning, device=tensors, heartbeat=heartbeat,
        # the frozen part of a fine-tuning run is never in a checkpoint or a peer's backup
        state_dict=initial_state(job, cfg) if assignment is None or tuning is not None else None,
        precision=job.train.precision, wire=job.train.wire,
    )
    ckpt_root = out / "checkpoints"
    start = 0
    if regroup is not None:
        regroup.groups = groups  # torn down when the run regroups
    if assignment is not None and assignment.source == "memory":
        restore(engine, assignment, regroup, ckpt_root, identity, full_shapes(cfg, tuning), comm, log=log)
        start = assignment.step
    elif run.resume or assignment is not None:
        start = _resume(run, rank, engine, ckpt_root, identity, comm, cfg, log)
    if regroup is not None:
        regroup.forget()
        if replicate:  # the first backup of a fresh run; a regrouped one keeps its snapshot and backs up later
            regroup.keep_state(engine, start, groups.backup_group, backup=assignment is None)
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        earlier = read_metrics(metrics_path, log=log) if metrics_path.is_file() else []
        if start == 0 and earlier and assignment is None:
            raise SpecError(f"{metrics_path} holds {len(earlier)} steps of an earlier run; nothing was "
                            "overwritten: continue it with --resume, or start over with --fresh")
        # written anew (a new inode: a launcher following the file reads it again from its start)
        checkpoint.atomic_write_bytes(metrics_path, "".join(r.model_dump_json() + "\n" for r in earlier
                                                            if r.step < start).encode())
    gb, seq = job.train.global_batch, job.train.seq_len
    fault = _fault(rank) if assignment is None else None  # a drill's fault fires in the first generation only
    meter, skipped = (meter_factory or step_meter)(run, device, engine)
    if skipped:
        log(f"energy meter on {device}: {type(meter).__name__} ({'; '.join(skipped)})")
    for step in range(start, run.steps):
        if fault is not None and step == fault[0]:
            if fault[1]:  # killed or frozen for real
                import os
                import signal

                log(f"EDGEPOOL-FAULT at {time.time():.3f}: SIG{fault[1]} before step {step}")
                os.kill(os.getpid(), getattr(signal, f"SIG{fault[1]}"))
            raise RuntimeError(f"injected fault at step {step} (EDGEPOOL_FAULT)")
        meter.begin("step")
        res = engine.step(step, trace=step == run.steps - 1)
        backup_s = 0.0
        if replicate and (step + 1) % replicate == 0 and step + 1 < run.steps:
            t0 = time.perf_counter()  # the snapshot, and any wait for the round before: the step's
            regroup.keep_state(engine, step + 1, groups.backup_group, backup=True)
            backup_s = time.perf_counter() - t0
        reading = meter.end("step").readings.get(device)
        joules = (reading.energy_j, reading.source) if reading is not None else (None, "none")
        # each rank also says which generation the launcher opened to take devices in, as it
        # read it: all see every rank's reading, so all regroup at the same boundary
        per_rank = comm.gather_json([device, res.bytes_sent, res.peak_memory_bytes, res.cpu_s, res.trace, joules,
                                     regroup.joining if regroup is not None else 0],
                                    f"gathering the metrics of step {step}")
        join = max(p[6] for p in per_rank)
        if rank == 0:
            took = res.step_time_s + backup_s
            rec = StepRecord(
                step=step, loss=res.loss, step_time_s=took, samples_per_s=gb / took,
                tokens_per_s=gb * seq / took, plan_id=plan.plan_id,
                devices={d: DeviceStep(peak_memory_bytes=m, bytes_sent=b, cpu_s=c, energy_j=e[0], energy_source=e[1])
                         for d, b, m, c, _, e, _ in per_rank})
            append_record(metrics_path, rec)
            if res.trace:
                trace = Trace(plan_id=plan.plan_id, step=step,
                              ranks=[RankTrace(rank=r, device=d, events=[tuple(e) for e in t])
                                     for r, (d, _, _, _, t, _, _) in enumerate(per_rank)])
                write_json(out / "trace.json", trace)
        every = job.train.checkpoint_every
        if every and ((step + 1) % every == 0 or step + 1 == run.steps):  # the last step too: the model to export
            checkpoint.save(ckpt_root, step + 1, engine, rank, identity, comm)
            if regroup is not None and step + 1 not in regroup.own:  # a lost state then comes from these files
                regroup.keep_state(engine, step + 1)
        if regroup is not None and join > regroup.gen and step + 1 < run.steps:
            regroup.settle()  # every rank is at this boundary: the round in flight ends
            if step + 1 not in regroup.own:
                regroup.keep_state(engine, step + 1)
            groups.destroy()
            regroup.groups = None
            raise Joining(join, step + 1)
    if regroup is not None:
        regroup.settle()  # no backup left in flight when the groups go
    summary = None
    if rank == 0:
        summary = summarize(read_metrics(metrics_path), plan_id=plan.plan_id, parallelism=plan.parallelism,
                            schedule=plan.schedule, num_microbatches=plan.num_microbatches, resumed_from=start)
        write_json(out / "summary.json", summary)
    groups.destroy()
    return summary


def backup_every(run: RunSpec) -> int:
    """Every how many steps this run's ranks back their state up in a peer's memory:
    ``train.replicate_every``, or for ``auto`` the cost model's interval for the plan
    (``cost.model.BackupCost``: the backups under a tenth of the training time). Pure:
    every rank of a plan computes the same."""
    every = run.job.train.replicate_every
    if every != "auto":
        return int(every)
    from edgepool.cost.model import estimate, shape_for
    from edgepool.planner.search import job_profile

    prof = job_profile(run.job)
    return estimate(run.plan, run.pool, prof, shape_for(prof, run.job.train.global_batch, run.job.train.seq_len)).backup_every


def _resume(run: RunSpec, rank: int, engine, ckpt_root: Path, identity: dict, comm, cfg, log) -> int:
    """Collective: load the newest checkpoint every rank can, resharded to this plan; the step it holds."""
    plan = run.plan
    shapes = full_shapes(cfg, engine.tuning)
    found = checkpoint.find_resumable(ckpt_root, rank, identity, comm, plan=plan, shapes=shapes, shape=engine.shape,
                                      log=log)
    if found is not None:
        start, moves = found
        checkpoint.load(ckpt_root, start, engine, rank, moves, shapes)
        if rank == 0:
            written = checkpoint.read_manifest(checkpoint.step_dir(ckpt_root, start)) or {}
            how = ("" if written.get("plan_id") == plan.plan_id else
                   f" (written under plan {written.get('plan_id')} on {written.get('world_size')} devices, "
                   f"resharded to plan {plan.plan_id} on {plan.world_size})")
            log(f"resuming after step {start} from {checkpoint.step_dir(ckpt_root, start)}{how}")
        return start
    if checkpoint.step_folders(ckpt_root)[0]:
        raise checkpoint.CheckpointError(
            f"no checkpoint in {ckpt_root} can be resumed by this run (see the refusals above); nothing "
            "was overwritten: resume with the job that wrote them, or start over with --fresh")
    if rank == 0:
        log("no checkpoint to resume from; starting from step 0")
    return 0


def step_meter(run: "RunSpec", device: str, engine):
    """This rank's best energy meter and why better ones were skipped (``energy.select_meter``):
    a sensor (zeus, tegrastats) where one exists, else the modelled meter on this
    process's CPU time (over the device's CPU cap, ``EDGEPOOL_CPU_CORES``, when the
    launcher knows it; else the run's threads) and the bytes this rank sent, with the
    catalog's power figures for the device's power mode in the plan."""
    import os

    from edgepool.energy import ModelledDevice, ModelledMeter, process_cpu_seconds, select_meter

    spec = run.pool.device(device)
    cores = float(os.environ.get("EDGEPOOL_CPU_CORES") or run.threads)
    mode = run.plan.power_modes.get(device, spec.power_mode)
    modelled = ModelledMeter([ModelledDevice.from_catalog(device, spec.kind, power_mode=mode, cores=cores,
                                                          cpu_s=process_cpu_seconds(children=False),
                                                          tx_bytes=lambda: float(engine.wire.bytes_sent))])
    return select_meter(device, modelled=modelled)


def _store_host() -> int | None:
    """The rank that hosts the run's store: the one the launcher named, none under
    ``edgepool serve`` (the coordinator hosts it), else rank 0 (torch's rendezvous)."""
    import os

    if os.environ.get("EDGEPOOL_STORE_HOST"):
        return int(os.environ["EDGEPOOL_STORE_HOST"])
    return None if os.environ.get("EDGEPOOL_STORE") else 0


def _fault(rank: int) -> tuple[int, str] | None:
    """``EDGEPOOL_FAULT=rank=R,step=S[,signal=KILL|STOP]`` makes rank R fail before step S
    (tests, drills): an error, or the signal sent to itself (SIGKILL: gone; SIGSTOP: frozen)."""
    import os

    spec = os.environ.get("EDGEPOOL_FAULT")
    if not spec:
        return None
    kv = dict(part.split("=", 1) for part in spec.split(","))
    sig = kv.get("signal", "").upper()
    if sig not in ("", "KILL", "STOP"):
        raise SpecError(f"EDGEPOOL_FAULT signal {sig!r}: use KILL or STOP")
    return (int(kv["step"]), sig) if int(kv["rank"]) == rank else None


def main(argv: list[str] | None = None) -> int:
    """One rank's run from ``RUN_JSON`` (entry: ``python -m edgepool.runtime.rank``)."""
    import os
    import sys
    import traceback

    args = sys.argv[1:] if argv is None else argv
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    run = RunSpec.read(Path(args[0]))
    try:
        run_rank(rank, world, run, log=lambda m: print(m, file=sys.stderr, flush=True), hard_exit=True)
    except Exception as exc:  # noqa: BLE001 - one line for the launcher, the traceback for the log
        traceback.print_exc()
        device = run.plan.devices[rank] if rank < run.plan.world_size else "?"
        if getattr(exc, "silent", ()):  # the launcher blames these ranks (``launch.local``)
            print(f"EDGEPOOL-SILENT {','.join(map(str, exc.silent))}", file=sys.stderr, flush=True)
        print(f"EDGEPOOL-ERROR rank {rank} ({device}): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
              file=sys.stderr, flush=True)
        return 1
    return 0

