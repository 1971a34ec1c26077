"""Checkpoints: atomic per-rank files, a manifest of checksums, refusal of bad ones.

Layout: ``DIR/checkpoints/step-000010/rank-0.pt ... manifest.json``. Every file is
written to a temporary name, fsynced and renamed, and the manifest (step, plan_id, one
SHA-256 per rank file) is written last, the same way, by rank 0 after every rank has
written. So a checkpoint without a manifest is partial, and one whose files do not
match the manifest is corrupt; both are refused with a one-line reason and the newest
good one is used instead.

A rank file holds the rank's tensors in full-model names (TP shards with their shard
spec, so ``engine.stitch`` can rebuild full tensors for another plan later), its
optimizer state and its RNG state. Resuming needs the same plan (checked by plan_id).
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


def save(root: Path, step: int, engine, rank: int) -> Path:
    """Collective: every rank writes its file, then rank 0 writes the manifest."""
    d = step_dir(root, step)
    d.mkdir(parents=True, exist_ok=True)
    payload = {
        "step": step,
        "plan_id": engine.plan.plan_id,
        "rank": rank,
        "model": engine.local_state(),
        "shard_spec": engine.shard_spec,
        "optim": engine.optim.state_dict(),
        "rng": torch.get_rng_state(),
    }
    import io

    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    path = d / f"rank-{rank}.pt"
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
        want = manifest["files"][f"rank-{rank}.pt"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return "manifest unreadable or has no entry for this rank"
    if manifest.get("plan_id") != plan_id:
        return f"written by plan {manifest.get('plan_id')}, this run's plan is {plan_id} (resume with the same plan)"
    f = d / f"rank-{rank}.pt"
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
    payload = torch.load(step_dir(root, step) / f"rank-{rank}.pt", weights_only=False)
    engine.load_local_state(payload["model"])
    engine.optim.load_state_dict(payload["optim"])
    torch.set_rng_state(payload["rng"])
