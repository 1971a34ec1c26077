"""A run's trained model, from its checkpoint, as a Hugging Face folder (``edgepool export``).

``export_run(run_dir, out, merge=..., step=...)`` reads ``DIR/run.json`` (``RunSpec``),
picks the newest good checkpoint (or step ``step``), assembles the full-model tensors
from every rank file, completes them from the run's initial state, and hands them to
``models.export.write_hf_folder``. The orchestration lives here, not in
``models.export``, because it reads the runtime's files (checkpoints, ``RunSpec``) and
models sit below the runtime.

Checkpoints are checked as a resume checks them (``runtime.checkpoint``): a manifest
that names the plan that wrote it, this run's identity, every rank file's SHA-256, and a
safetensors header with edgepool's metadata. A bad one is refused with a one-line
reason; without ``step``, the newest good one is used and the refusals are logged.
Nothing is unpickled: rank files are read with ``safetensors.safe_open``, the rest is
JSON.

Rank files hold ``model/<full-model name>`` tensors, tp and fsdp shards as slices with
their place in the header's ``shard_spec``; ``engine.stitch`` joins them and every
stitched tensor must have its full shape. A tensor no rank file holds comes from the
run's initial state (the pretrained folder, else the seeded model), but only where the
run never trains it: everything but the adapters under ``train.lora``, and the
parameters ``train.freeze`` names. A missing tensor the run trains is an error, never
silently the initial value.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

from edgepool.errors import SpecError
from edgepool.models.lora import Tuning
from edgepool.runtime import checkpoint as ckpt
from edgepool.runtime.checkpoint import CheckpointError


def _reason(d: Path, identity: dict) -> tuple[dict | None, str | None]:
    """(manifest, None) when checkpoint folder ``d`` is good, else (None, why not)."""
    if not (d / "manifest.json").is_file():
        return None, "no manifest (a partial write)"
    manifest = ckpt.read_manifest(d)
    if manifest is None:
        return None, "manifest unreadable"
    plan = ckpt.written_plan(manifest)
    if plan is None:
        return None, "written by an older edgepool (checkpoint format 1), which cannot be exported"
    files = sorted((manifest.get("files") or {}))
    if manifest.get("world_size") != plan.world_size or files != sorted(ckpt.rank_file(i) for i in range(plan.world_size)):
        return None, "the manifest's files do not match its plan"
    why = ckpt.check(d, manifest, identity, files)
    return (manifest, None) if why is None else (None, why)


def pick_checkpoint(run_dir: Path, identity: dict, *, step: int | None = None, log=print) -> tuple[int, Path, dict]:
    """(step, folder, manifest) of the newest good checkpoint of the run in ``run_dir``
    (or of step ``step``); ``CheckpointError`` with one line when there is none."""
    root = run_dir / "checkpoints"
    steps, _ = ckpt.step_folders(root)
    if not steps:
        raise CheckpointError(f"{run_dir} has no checkpoint ({root} holds no step-NNNNNN folder); a run writes one "
                              "every train.checkpoint_every steps (0, the default, writes none): set it and train again")
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"{run_dir} has no checkpoint of step {step}; it has steps "
                                  f"{', '.join(map(str, sorted(steps)))}")
        steps = [step]
    refused = []
    for s in steps:
        d = ckpt.step_dir(root, s)
        manifest, why = _reason(d, identity)
        if manifest is not None:
            return s, d, manifest
        refused.append(f"checkpoint {d.name} refused: {why}")
        if step is None:
            log(refused[-1])
    raise CheckpointError(refused[0] if step is not None else
                          f"no usable checkpoint in {root}: {len(refused)} refused, the newest: {refused[0]}")


def read_model(d: Path, manifest: dict) -> dict:
    """The full-model tensors (``model/*``) of checkpoint folder ``d``, stitched from its
    rank files along each file's shard spec (safetensors only)."""
    import torch
    from safetensors import safe_open

    from edgepool.runtime.engine import stitch

    states, specs = [], []
    with ExitStack() as stack:
        for name in sorted(manifest["files"], key=lambda n: int(n[len("rank-"):-len(".safetensors")])):
            f = stack.enter_context(safe_open(str(d / name), framework="pt"))
            try:
                meta = json.loads(f.metadata()["edgepool"])
                spec = {k: tuple(v) for k, v in (meta.get("shard_spec") or {}).items()}
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{d.name}/{name}: unreadable edgepool metadata ({exc!r})") from None
            states.append({k[len("model/"):]: f.get_tensor(k) for k in f.keys() if k.startswith("model/")})
            specs.append({k: v for k, v in spec.items() if len(v) == 3})
    full = stitch(states, specs)
    return {k: v.to(torch.float32).contiguous() for k, v in full.items()}


def _full_shapes(cfg, lora) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model, and under ``lora`` (a ``LoraSpec``) of its adapters."""
    from edgepool.models.hf import expected_shapes
    from edgepool.models.lora import adapter_shapes

    shapes = expected_shapes(cfg)
    if lora is not None:
        shapes.update(adapter_shapes(shapes, lora.rank, lora.targets))
    return shapes


def complete(run, cfg, state: dict, *, label: str) -> tuple[dict, list[str]]:
    """``state`` checked against the model's shapes and completed from the run's initial
    state where the run never trains a tensor; (the full state, the names filled)."""
    from edgepool.models.hf import expected_shapes

    job = run.job
    lora = job.train.lora
    shapes = _full_shapes(cfg, lora)
    for k, t in state.items():
        if k not in shapes:
            raise CheckpointError(f"{label} holds {k!r}, which is no tensor of the job's model (or its adapters)")
        if tuple(t.shape) != shapes[k]:
            raise CheckpointError(f"{label}: {k} stitches to shape {tuple(t.shape)}, but the model needs "
                                  f"{shapes[k]}; the rank files do not fit together")
    missing = [k for k in shapes if k not in state]
    if not missing:
        return state, []
    adapters = [k for k in missing if k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if lora is not None and len(adapters) == len(shapes) - len(expected_shapes(cfg)):
        raise CheckpointError(f"{label} holds no LoRA adapters (*.lora_A.weight, *.lora_B.weight) although the run "
                              "sets train.lora; it was not written by a LoRA run")
    # under LoRA only the adapters train; train.freeze names what else never changes
    tuning = Tuning.of(job.train)
    trained = [k for k in missing if tuning is None or tuning.trainable(k)]
    if trained:
        raise CheckpointError(f"{label} lacks {len(trained)} tensors the run trains, e.g. {trained[0]}; "
                              "the checkpoint is incomplete")
    from edgepool.models import build_model
    from edgepool.runtime.train import initial_state

    init = initial_state(job, cfg)
    if init is None:
        init = build_model(cfg, seed=job.train.seed).state_dict()
    return {**state, **{k: init[k].detach().to("cpu").float().contiguous() for k in missing}}, missing


def run_state(run_dir: str | Path, *, step: int | None = None, log=print):
    """A run's trained model from its newest good checkpoint (or step ``step``): (the
    ``RunSpec``, its model config, the full state in full-model names, adapters apart
    and unmerged; the step; the names taken from the initial state)."""
    from edgepool.models.config import job_model_config
    from edgepool.runtime.train import RunSpec

    run_dir = Path(run_dir)
    path = run_dir / "run.json"
    if not path.is_file():
        raise SpecError(f"{run_dir} has no run.json; point --run at the folder a training run wrote (its --out)")
    try:
        run = RunSpec.read(path)
    except ValueError as exc:  # pydantic's ValidationError and bad JSON both are
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpecError(f"{path} is not a run description edgepool wrote ({first})") from None
    cfg = job_model_config(run.job)
    s, d, manifest = pick_checkpoint(run_dir, run.identity(), step=step, log=log)
    if s < run.steps:
        log(f"exporting checkpoint {d.name}: the run has {run.steps} steps, so the last {run.steps - s} step(s) are not "
            "in it (the run stopped early)")
    state, filled = complete(run, cfg, read_model(d, manifest), label=f"checkpoint {d.name}")
    return run, cfg, state, s, filled


def run_model(run_dir: str | Path, *, step: int | None = None, log=print):
    """The run's trained model as edgepool runs it (LoRA adapters as the runtime's
    ``models.lora`` wraps them, not merged), on one device, in eval mode."""
    from edgepool.models import build_model

    run, cfg, state, _, _ = run_state(run_dir, step=step, log=log)
    model = build_model(cfg, seed=run.job.train.seed, tuning=Tuning.of(run.job.train))
    model.load_state_dict(state)
    return model.eval()


def export_run(run_dir: str | Path, out: str | Path, *, merge: bool = False, step: int | None = None, log=print):
    """Export the run in ``run_dir`` to the Hugging Face folder ``out``; returns
    (``models.export.Written``, the step exported, the names taken from the initial state)."""
    from edgepool.models.export import Lora, write_hf_folder

    run, cfg, state, s, filled = run_state(run_dir, step=step, log=log)
    lora = run.job.train.lora
    written = write_hf_folder(cfg, state, out, merge=merge, pretrained=run.job.model.pretrained,
                              lora=Lora(lora.rank, lora.alpha, lora.dropout) if lora is not None else None)
    return written, s, filled


__all__ = ["complete", "export_run", "pick_checkpoint", "read_model", "run_model", "run_state"]
