"""Checkpoints: atomic per-rank files, a manifest of checksums, refusal of bad ones.

Layout: ``DIR/checkpoints/step-000010/rank-0.safetensors ... manifest.json``. Every file is
written to a temporary name, fsynced and renamed, and the manifest (step, plan_id, one
SHA-256 per rank file) is written last, the same way, by rank 0 after every rank has
written. So a checkpoint without a manifest is partial, and one whose files do not
match the manifest is corrupt; both are refused with a one-line reason and the newest
good one is used instead.

A rank file is safetensors: the rank's tensors in full-model names (``model/<name>``;
TP and FSDP shards, with their shard spec in the header, so ``engine.stitch`` can
rebuild full tensors for another plan later), its optimizer state
(``optim/<param index>/<key>``, DTensor state as its local shard) and its RNG state,
with everything else (step, plan_id, the optimizer's param groups and scalars) as JSON
in the safetensors header. Nothing is unpickled: a file can only hand back tensors and
JSON. Resuming needs the same plan (checked by plan_id).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from edgepool.errors import EdgepoolError


class CheckpointError(EdgepoolError):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank}.safetensors"


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2 state), else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def _encode(engine, step: int, rank: int) -> bytes:
    from safetensors.torch import save

    tensors = {f"model/{k}": v.contiguous() for k, v in engine.local_state().items()}
    optim = engine.optim.state_dict()
    scalars: dict[str, dict] = {}
    sharded: list[str] = []
    for idx, state in optim["state"].items():
        for key, val in state.items():
            if isinstance(val, torch.Tensor):
                name = f"optim/{idx}/{key}"
                if hasattr(val, "to_local"):
                    sharded.append(name)
                tensors[name] = _local(val).detach().clone().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = val
    tensors["rng"] = torch.get_rng_state()
    meta = {"step": step, "plan_id": engine.plan.plan_id, "rank": rank,
            "shard_spec": {k: list(v) for k, v in engine.shard_spec.items()},
            "param_groups": optim["param_groups"], "optim_scalars": scalars, "optim_sharded": sharded}
    return save(tensors, metadata={"edgepool": json.dumps(meta)})


def save(root: Path, step: int, engine, rank: int) -> Path:
    """Collective: every rank writes its file, then rank 0 writes the manifest."""
    d = step_dir(root, step)
    d.mkdir(parents=True, exist_ok=True)
    data = _encode(engine, step, rank)
    path = d / rank_file(rank)
    atomic_write_bytes(path, data)
    digest = hashlib.sha256(data).hexdigest()
    digests: list = [None] * dist.get_world_size()
    dist.all_gather_object(digests, (path.name, digest))
    if rank == 0:
        manifest = {"step": step, "plan_id": engine.plan.plan_id, "world_size": len(digests), "files": dict(digests)}
        atomic_write_bytes(d / "manifest.json", json.dumps(manifest, indent=2).encode())
    dist.barrier()
    return d


def check(d: Path, rank: int, plan_id: str) -> str | None:
    """Why checkpoint folder ``d`` cannot be used by ``rank``, or None if it can."""
    man = d / "manifest.json"
    if not man.is_file():
        return "no manifest (partial write)"
    try:
        manifest = json.loads(man.read_text())
        want = manifest["files"][rank_file(rank)]
    except (json.JSONDecodeError, KeyError, TypeError):
        return "manifest unreadable or has no entry for this rank"
    if manifest.get("plan_id") != plan_id:
        return f"written by plan {manifest.get('plan_id')}, this run's plan is {plan_id} (resume with the same plan)"
    f = d / rank_file(rank)
    if not f.is_file():
        return f"{f.name} is missing"
    if sha256_file(f) != want:
        return f"{f.name} does not match its checksum (corrupt)"
    return None


def find_resumable(root: Path, rank: int, plan_id: str, log=print) -> int | None:
    """Collective: the newest step every rank can load, or None.

    Rank 0 logs every refusal, whichever rank found it."""
    steps = sorted((int(p.name.split("-")[1]) for p in root.glob("step-*") if p.is_dir()), reverse=True) if root.is_dir() else []
    mine = {step: check(step_dir(root, step), rank, plan_id) for step in steps}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    usable = []
    for step in steps:
        reasons = [r.get(step, "missing on another rank") for r in everyone]
        why = next((w for w in reasons if w is not None), None)
        if why is None:
            usable.append(step)
        elif rank == 0:
            log(f"checkpoint {step_dir(root, step).name} refused: {why}")
    return max(usable) if usable else None


def load(root: Path, step: int, engine, rank: int) -> None:
    """Restore ``engine`` from its rank's file of checkpoint ``step`` (tensors and JSON only)."""
    from safetensors import safe_open

    path = step_dir(root, step) / rank_file(rank)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["edgepool"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    engine.load_local_state({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
    params = [p for group in engine.optim.param_groups for p in group["params"]]
    sharded = set(meta["optim_sharded"])
    state: dict[int, dict] = {int(i): dict(v) for i, v in meta["optim_scalars"].items()}
    for name, t in tensors.items():
        if not name.startswith("optim/"):
            continue
        _, idx, key = name.split("/", 2)
        if name in sharded:  # back to a DTensor laid out like its (FSDP2-sharded) parameter
            from torch.distributed.tensor import DTensor

            p = params[int(idx)]
            t = DTensor.from_local(t, p.device_mesh, p.placements, run_check=False)
        state.setdefault(int(idx), {})[key] = t
    engine.optim.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng"])
