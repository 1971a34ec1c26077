"""Checkpoints: atomic per-rank files, a manifest of checksums, refusal of bad ones.

Layout: ``DIR/checkpoints/step-000010/rank-0.safetensors ... manifest.json``. Every file is
written to a temporary name, fsynced and renamed, and the manifest (step, the run's
identity, one SHA-256 per rank file) is written last, the same way, by rank 0 after every
rank has written. So a checkpoint without a manifest is partial, and one whose files do
not match the manifest is corrupt; both are refused with a one-line reason and the
newest good one is used instead. Anything else in ``checkpoints/`` (a ``step-latest``
folder, a stray file) is skipped with a warning.

The identity (``RunSpec.identity``: plan, seed, model, batch, sequence, optimizer) says
which run wrote a checkpoint. ``survey`` (no torch, no collective: the launcher runs it
before any process starts) sorts a folder's checkpoints into this run's and other
runs', naming what differs, so a resume under another plan or seed is refused on the
console instead of starting over.

A rank file is safetensors: the rank's tensors in full-model names (``model/<name>``;
TP and FSDP shards, with their shard spec in the header, so ``engine.stitch`` can
rebuild full tensors for another plan later), its optimizer state
(``optim/<param index>/<key>``, DTensor state as its local shard) and its RNG state,
with everything else (step, plan_id, the optimizer's param groups and scalars) as JSON
in the safetensors header. Nothing is unpickled: a file can only hand back tensors and
JSON. Resuming needs the same identity.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from edgepool.errors import EdgepoolError

STEP_DIR = re.compile(r"^step-(\d{6,})$")


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


def step_folders(root: Path) -> tuple[list[int], list[str]]:
    """(steps of the ``step-NNNNNN`` folders under ``root``, newest first; names of
    anything else there, which is skipped)."""
    if not root.is_dir():
        return [], []
    steps, stray = [], []
    for p in sorted(root.iterdir()):
        m = STEP_DIR.match(p.name)
        if m and p.is_dir():
            steps.append(int(m.group(1)))
        elif not p.name.startswith("."):
            stray.append(p.name)
    return sorted(steps, reverse=True), stray


def read_manifest(d: Path) -> dict | None:
    try:
        manifest = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def differences(written: object, ours: dict) -> str | None:
    """What about the run that wrote a checkpoint differs from ours, or None."""
    if not isinstance(written, dict):
        return "it has no run identity (an older edgepool wrote it)"
    diff = [f"{k} {written.get(k)!r} (this run: {v!r})" for k, v in ours.items() if written.get(k) != v]
    return "written with " + ", ".join(diff) if diff else None


@dataclass
class Survey:
    """What ``checkpoints/`` holds, seen from the launcher."""

    usable: list[int] = field(default_factory=list)  # complete checkpoints of this run, newest first
    foreign: list[tuple[int, str]] = field(default_factory=list)  # (step, what differs) of other runs'
    skipped: list[str] = field(default_factory=list)  # warnings: stray or partial entries

    @property
    def newest(self) -> int | None:
        return max(self.usable + [s for s, _ in self.foreign], default=None)


def survey(root: Path, identity: dict) -> Survey:
    """Sort the checkpoints under ``root`` by whose they are (manifests only; the
    ranks check every file's checksum when they load)."""
    steps, stray = step_folders(root)
    out = Survey(skipped=[f"{root / name} is not a checkpoint folder; skipped" for name in stray])
    for step in steps:
        d = step_dir(root, step)
        manifest = read_manifest(d)
        if manifest is None:
            out.skipped.append(f"{d} has no readable manifest (a partial write); skipped")
            continue
        why = differences(manifest.get("run"), identity)
        if why is None:
            out.usable.append(step)
        else:
            out.foreign.append((step, why))
    return out


def _local(t):
    """A DTensor's local shard (FSDP2 state), else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def _encode(engine, step: int, rank: int) -> bytes:
    import torch
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


def save(root: Path, step: int, engine, rank: int, identity: dict, comm) -> Path:
    """Collective: every rank writes its file, then rank 0 writes the manifest.
    ``comm`` is the run's ``runtime.health.Comm`` (guarded object collectives)."""
    d = step_dir(root, step)
    d.mkdir(parents=True, exist_ok=True)
    data = _encode(engine, step, rank)
    path = d / rank_file(rank)
    atomic_write_bytes(path, data)
    digest = hashlib.sha256(data).hexdigest()
    digests = comm.gather_json([path.name, digest], "gathering checkpoint checksums")
    if rank == 0:
        manifest = {"step": step, "plan_id": engine.plan.plan_id, "run": identity, "world_size": len(digests),
                    "files": dict(digests)}
        atomic_write_bytes(d / "manifest.json", json.dumps(manifest, indent=2).encode())
    comm.barrier("waiting for the checkpoint manifest")
    return d


def check(d: Path, rank: int, identity: dict) -> str | None:
    """Why checkpoint folder ``d`` cannot be used by ``rank``, or None if it can."""
    if not (d / "manifest.json").is_file():
        return "no manifest (partial write)"
    manifest = read_manifest(d)
    try:
        want = manifest["files"][rank_file(rank)]  # type: ignore[index]
    except (KeyError, TypeError):
        return "manifest unreadable or has no entry for this rank"
    why = differences(manifest.get("run"), identity)
    if why is not None:
        return f"{why} (resume with the same job and plan)"
    f = d / rank_file(rank)
    if not f.is_file():
        return f"{f.name} is missing"
    if sha256_file(f) != want:
        return f"{f.name} does not match its checksum (corrupt)"
    return _safetensors_problem(f)


MAX_HEADER = 100 << 20  # safetensors' own cap on a header


def _safetensors_problem(f: Path) -> str | None:
    """Why ``f`` is not a safetensors file edgepool wrote (a pickle, say), from its
    header alone: 8 bytes of length, then that much JSON with edgepool's metadata."""
    try:
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(MAX_HEADER, f.stat().st_size - 8):
                return f"{f.name} is not a safetensors file (a planted pickle or another format); refused unread"
            header = json.loads(fh.read(n))
    except (OSError, ValueError):
        return f"{f.name} is not a safetensors file (its header is not JSON); refused unread"
    if not isinstance(header, dict) or "edgepool" not in (header.get("__metadata__") or {}):
        return f"{f.name} is a safetensors file edgepool did not write (no edgepool metadata)"
    return None


def find_resumable(root: Path, rank: int, identity: dict, comm, log=print) -> int | None:
    """Collective: the newest step every rank can load, or None.

    Rank 0 logs every refusal, whichever rank found it."""
    steps, _ = step_folders(root)
    mine = {str(step): check(step_dir(root, step), rank, identity) for step in steps}
    everyone = comm.gather_json(mine, "comparing checkpoints")
    usable = []
    for step in steps:
        reasons = [r.get(str(step), "missing on another rank") for r in everyone]
        why = next((w for w in reasons if w is not None), None)
        if why is None:
            usable.append(step)
        elif rank == 0:
            log(f"checkpoint {step_dir(root, step).name} refused: {why}")
    return max(usable) if usable else None


def load(root: Path, step: int, engine, rank: int) -> None:
    """Restore ``engine`` from its rank's file of checkpoint ``step`` (tensors and JSON only)."""
    import torch
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
