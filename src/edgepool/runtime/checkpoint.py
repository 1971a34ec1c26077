"""Checkpoints: atomic per-rank files, a manifest of checksums, refusal of bad ones.

Layout: ``DIR/checkpoints/step-000010/rank-0.safetensors ... manifest.json``. Every file is
written to a temporary name, fsynced and renamed, and the manifest (step, the run's
identity, one SHA-256 per rank file) is written last, the same way, by rank 0 after every
rank has written. So a checkpoint without a manifest is partial, and one whose files do
not match the manifest is corrupt; both are refused with a one-line reason and the
newest good one is used instead. Anything else in ``checkpoints/`` (a ``step-latest``
folder, a stray file) is skipped with a warning.

The identity (``RunSpec.identity``: seed, model, batch, sequence, optimizer) says which
run wrote a checkpoint. ``survey`` (no torch, no collective: the launcher runs it
before any process starts) sorts a folder's checkpoints into this run's and other
runs', naming what differs, so a resume under another seed or model is refused on the
console instead of starting over. The plan is not part of it: the manifest holds the
plan that wrote the checkpoint, and ``runtime.reshard`` cuts its pieces anew for the
plan that resumes it (a device fewer or more, layers moved between stages, tp and
fsdp shards split anew); each rank reads only the slices it needs, checking the
checksum of every file it reads.

A rank file is safetensors (format 2): the rank's tensors by full-model parameter name,
``model/<name>`` and ``optim/<name>/<key>`` (``Engine.pieces``; tp and fsdp shards as
their local slices, with their shard spec in the header), and its RNG state, with the
step, plan_id and the optimizer's non-tensor state as JSON in the safetensors header.
Nothing is unpickled: a file can only hand back tensors and JSON. Format-1 checkpoints
(optimizer state by index, before resharding) are refused with a reason.
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


FORMAT = 2  # rank files hold state by parameter name (``Engine.pieces``); 1 held optimizer state by index


def _encode(engine, step: int, rank: int) -> bytes:
    import torch
    from safetensors.torch import save

    tensors, scalars = engine.pieces()
    tensors["rng"] = torch.get_rng_state()
    meta = {"format": FORMAT, "step": step, "plan_id": engine.plan.plan_id, "rank": rank,
            "shard_spec": {k: list(v) for k, v in engine.shard_spec.items()}, "optim_scalars": scalars}
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
        manifest = {"format": FORMAT, "step": step, "plan_id": engine.plan.plan_id,
                    "plan": engine.plan.model_dump(mode="json", exclude={"estimate"}), "run": identity,
                    "world_size": len(digests), "files": dict(digests)}
        atomic_write_bytes(d / "manifest.json", json.dumps(manifest, indent=2).encode())
    comm.barrier("waiting for the checkpoint manifest")
    return d


def written_plan(manifest: dict):
    """The plan a checkpoint was written under (its manifest), or None (an older edgepool's)."""
    from edgepool.specs.plan import Plan

    if manifest.get("format") != FORMAT or not isinstance(manifest.get("plan"), dict):
        return None
    try:
        return Plan.model_validate(manifest["plan"])
    except ValueError:
        return None


def routes(d: Path, plan, shapes, shape):
    """How checkpoint ``d`` (written under any plan) fills the ranks of ``plan``: (its
    manifest, a ``runtime.reshard.Reshard`` whose holders are the rank files' names), or
    a reason it cannot."""
    from edgepool.runtime.reshard import reshard

    if not (d / "manifest.json").is_file():
        return "no manifest (partial write)"
    manifest = read_manifest(d)
    if manifest is None:
        return "manifest unreadable"
    old = written_plan(manifest)
    if old is None:
        return "written by an older edgepool (checkpoint format 1, which cannot be resharded); start over with --fresh"
    if manifest.get("world_size") != old.world_size or len(manifest.get("files") or {}) != old.world_size:
        return "the manifest's files do not match its plan"
    r = reshard(old, plan, {rank_file(i): [i] for i in range(old.world_size)}, shapes=shapes, shape=shape,
                prefer=lambda j, h: h == rank_file(j))
    if r.missing:
        return f"it does not hold {r.missing[0][1]} (needed by rank {r.missing[0][0]})"
    return manifest, r


def check(d: Path, manifest: dict, identity: dict, files: list[str]) -> str | None:
    """Why checkpoint folder ``d`` (with ``manifest``) cannot be used by a rank that reads
    ``files`` of it, or None if it can."""
    why = differences(manifest.get("run"), identity)
    if why is not None:
        return f"{why} (resume with the same job)"
    for name in files:
        want = (manifest.get("files") or {}).get(name)
        f = d / name
        if want is None:
            return f"the manifest has no entry for {name}"
        if not f.is_file():
            return f"{f.name} is missing"
        if sha256_file(f) != want:
            return f"{f.name} does not match its checksum (corrupt)"
        why = _safetensors_problem(f)
        if why is not None:
            return why
    return None


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


def find_resumable(root: Path, rank: int, identity: dict, comm, *, plan, shapes, shape, log=print):
    """Collective: the newest step every rank can load under ``plan``, and how (its
    ``Reshard``: the same plan or another, a device more or fewer), or None.

    Rank 0 logs every refusal, whichever rank found it."""
    steps, _ = step_folders(root)
    found, mine = {}, {}
    for step in steps:
        d = step_dir(root, step)
        got = routes(d, plan, shapes, shape)
        if isinstance(got, str):
            mine[str(step)] = got
            continue
        manifest, found[step] = got
        mine[str(step)] = check(d, manifest, identity, sorted({m.holder for m in found[step].moves[rank]}))
    everyone = comm.gather_json(mine, "comparing checkpoints")
    for step in steps:
        reasons = [e.get(str(step), "missing on another rank") for e in everyone]
        why = next((w for w in reasons if w is not None), None)
        if why is None:
            return step, found[step]
        if rank == 0:
            log(f"checkpoint {step_dir(root, step).name} refused: {why}")
    return None


class RankFile:
    """A rank file as a ``runtime.reshard.Source``: slices read from disk, nothing else."""

    def __init__(self, handle):
        self.f = handle
        self.meta = json.loads(handle.metadata()["edgepool"])

    def keys(self) -> list[str]:
        return [k for k in self.f.keys() if k != "rng"]

    def get(self, key: str, src):
        piece = self.f.get_slice(key)
        if len(piece.get_shape()) != len(src):
            return self.f.get_tensor(key)
        return piece[tuple(slice(a, b) for a, b in src)]


def load(root: Path, step: int, engine, rank: int, moves, shapes) -> None:
    """Restore ``engine`` from checkpoint ``step`` along ``moves`` (``find_resumable``):
    the slices it needs of whichever rank files hold them (tensors and JSON only)."""
    from contextlib import ExitStack

    import torch
    from safetensors import safe_open

    from edgepool.runtime.reshard import assemble

    d = step_dir(root, step)
    files: dict[str, RankFile] = {}
    with ExitStack() as stack:
        def source(holder, old_rank):
            if holder not in files:
                files[holder] = RankFile(stack.enter_context(safe_open(str(d / holder), framework="pt")))
            return files[holder]

        tensors = assemble(rank, moves, shapes, source)
        own = files.get(rank_file(rank)) or source(rank_file(0), 0)
        scalars = {n: v for f in files.values() for n, v in f.meta.get("optim_scalars", {}).items()}
        rng = own.f.get_tensor("rng")
    engine.load_pieces(tensors, scalars)
    torch.set_rng_state(rng)
