"""edgepool against plain PyTorch, the same work on this machine's local processes (a benchmark, not a test).

Each pair trains the same seeded GPT (``build_model``'s units) on the same data
(``Sampler``, same seed) with AdamW (no weight decay), with the engine's loss
normalisation on both sides (a sum over target tokens / the global batch's target count):

- ``single``: edgepool's engine on one rank against a plain loop (forward, cross-entropy,
  backward, AdamW step);
- ``dp``: edgepool dp over 2 ranks, equal shares, against ``DistributedDataParallel``
  over the whole model, each rank half the batch (DDP *averages* gradients, so each
  rank's loss is multiplied by the world size before its backward: the averaged gradient
  is then the full batch's, as edgepool's summed one);
- ``pp-gpipe`` / ``pp-1f1b``: edgepool 2 stages (layers [0, L/2) and [L/2, L)), M
  micro-batches, against ``torch.distributed.pipelining`` (``PipelineStage`` over a
  hand-split module + ``ScheduleGPipe`` / ``Schedule1F1B``, ``scale_grads=False`` since
  the loss is already divided by the global target count);
- ``fsdp``: edgepool fsdp over 2 ranks against FSDP2 ``fully_shard`` on every block and
  on the whole model as the root (FSDP2 averages: the loss is multiplied by the world
  size as for DDP).

Every run is a fresh process group (``run_distributed``: forked ranks, one torch thread
each, gloo). Runs are interleaved per pair (edgepool, torch, edgepool, torch, ...,
``--repeats`` rounds). The first step of a run is a warm-up and is not timed into the
statistics; a step's time is the slowest rank's (each rank waits at a barrier before the
step, then times it). Per run: the median step time; per side: the median of its runs'
medians and their spread (min-max). The step-1 losses of a pair (before any update) must
agree within ``LOSS_RTOL``.

    python benchmarks/vs_torch.py [--steps 4] [--repeats 3] [--hidden 512] [--layers 6] [--seq 128] \
        [--batch 16] [--microbatches 4] [--pairs single,dp,pp-gpipe,pp-1f1b,fsdp]

Writes docs/results/vs-torch.md (``--out`` for another folder), which gives the step times and the
benchmark's whole wall time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ("single", "dp", "pp-gpipe", "pp-1f1b", "fsdp")
TARGET = 0.05  # the target: edgepool within 5% of torch's step time
LOSS_RTOL = 1e-5  # step-1 losses: float-reduction order only (same weights, same data)


# -- shared set-up ----------------------------------------------------------------------
def _cfg(a):
    from edgepool.data import ByteTokenizer
    from edgepool.models.config import preset

    return preset("gpt", "small", vocab_size=ByteTokenizer.vocab_size, hidden=a.hidden, num_layers=a.layers,
                  num_heads=max(1, a.hidden // 64), ffn=4 * a.hidden, max_seq_len=max(512, a.seq))


def _sampler(a):
    from edgepool.data import ByteTokenizer, Sampler
    from edgepool.testing import CORPUS

    return Sampler(path=str(CORPUS), seq_len=a.seq, family="gpt", seed=a.seed, mask_token_id=ByteTokenizer.mask_token_id)


def _loss_sum(logits, labels):
    import torch.nn.functional as F

    from edgepool.data import IGNORE

    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")


def _timed(step, steps: int) -> tuple[list[float], list[float]]:
    """``steps + 1`` steps (the first a warm-up): each rank's step times and losses."""
    import torch.distributed as dist

    times, losses = [], []
    for s in range(steps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        loss = step(s)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    return times, losses


def _plan(pair: str, a):
    from edgepool.specs.plan import Plan, StagePlan

    L, cut = a.layers, a.layers // 2
    if pair == "single":
        return Plan(num_layers=L, stages=[StagePlan(layers=(0, L), devices=("a",))])
    if pair in ("dp", "fsdp"):
        return Plan(num_layers=L, stages=[StagePlan(layers=(0, L), devices=("a", "b"), mode=pair, shares=(1, 1))])
    schedule = pair.split("-", 1)[1]
    return Plan(num_layers=L, stages=[StagePlan(layers=(0, cut), devices=("a",)), StagePlan(layers=(cut, L), devices=("b",))],
                num_microbatches=a.microbatches, schedule=schedule)


# -- the two sides (each runs on every rank of a fresh process group) --------------------
def _edgepool(rank, world, pair, a):
    from edgepool.runtime.engine import Engine
    from edgepool.runtime.groups import StageGroups

    plan = _plan(pair, a)
    eng = Engine(plan, _cfg(a), rank=rank, sampler=_sampler(a), global_batch=a.batch, seq_len=a.seq,
                 groups=StageGroups.build(plan, rank, a.timeout), lr=a.lr, optimizer="adamw", seed=a.seed,
                 timeout_s=a.timeout)
    return _timed(lambda s: eng.step(s).loss, a.steps)


def _torch(rank, world, pair, a):
    import torch
    import torch.distributed as dist
    from torch import nn

    from edgepool.models.stage import StageModel, build_model

    cfg, sampler = _cfg(a), _sampler(a)
    num_targets = a.batch * sampler.targets_per_sample()  # the global batch's target tokens

    if pair.startswith("pp-"):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        cut, last = a.layers // 2, rank == world - 1
        # torch's natural split: embed + blocks[0:cut] | blocks[cut:L] + head (the same seeded units)
        part = StageModel(cfg, (0, cut) if rank == 0 else (cut, a.layers), embed=rank == 0, head=last, seed=a.seed)

        class Part(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x):
                if self.m.embed is not None:
                    x = self.m.embed(x)
                x = self.m.run_blocks(x)
                return self.m.head(x) if self.m.head is not None else x

        module = Part(part)
        stage = PipelineStage(module, rank, world, torch.device("cpu"))
        kind = {"pp-gpipe": ScheduleGPipe, "pp-1f1b": Schedule1F1B}[pair]
        sched = kind(stage, n_microbatches=a.microbatches, loss_fn=lambda out, y: _loss_sum(out, y) / num_targets,
                     scale_grads=False)
        opt = torch.optim.AdamW(module.parameters(), lr=a.lr, weight_decay=0.0)

        def step(s):
            module.train()
            ids, labels = sampler.batch(s, range(a.batch))
            loss = torch.zeros(())
            if rank == 0:
                sched.step(torch.from_numpy(ids))
            else:  # the last stage needs the labels: in torch's split they live on stage 1
                losses: list = []
                sched.step(target=torch.from_numpy(labels), losses=losses)
                loss = torch.stack([l.detach() for l in losses]).sum()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dist.all_reduce(loss)  # as the engine: every rank learns the step's loss
            return float(loss)

        return _timed(step, a.steps)

    model = build_model(cfg, a.seed)
    if pair == "dp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    elif pair == "fsdp":
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        mesh = DeviceMesh.from_group(dist.group.WORLD, "cpu")
        for block in model.blocks.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    rows = a.batch // world

    def step(s):
        model.train()
        ids, labels = sampler.batch(s, range(rank * rows, (rank + 1) * rows))
        loss = _loss_sum(model(torch.from_numpy(ids)), torch.from_numpy(labels)) / num_targets
        # DDP and FSDP2 average the gradients over the ranks: times the world size, the
        # average is the sum, i.e. the full batch's gradient (world 1: unchanged)
        (loss * world).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss)
        return float(loss)

    return _timed(step, a.steps)


# -- driver -----------------------------------------------------------------------------
def _run(side, pair: str, a) -> dict:
    from edgepool.testing.dist import run_distributed

    world = 1 if pair == "single" else 2
    per_rank = run_distributed(side, world, pair, a, timeout_s=a.timeout)
    times = [max(r[0][s] for r in per_rank) for s in range(a.steps + 1)]  # the slowest rank per step
    losses = per_rank[-1][1]  # the same on every rank (all-reduced)
    return {"median": statistics.median(times[1:]), "times": times, "losses": losses}


def _verdict(ratio: float) -> str:
    if ratio <= 1.0:
        return f"faster ({(1 - ratio) * 100:.1f}% less time)"
    if ratio <= 1 + TARGET:
        return f"within 5% ({(ratio - 1) * 100:.1f}% slower)"
    return f"misses: {(ratio - 1) * 100:.1f}% slower, {(ratio - 1 - TARGET) * 100:.1f} points over the 5% target"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per run (plus one warm-up step)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (edgepool, torch) per pair")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="global batch (rows)")
    ap.add_argument("--microbatches", type=int, default=4, help="micro-batches of the pipeline pairs")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated subset of {','.join(PAIRS)}")
    ap.add_argument("--timeout", type=float, default=120.0, help="per-run collective timeout (s)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    a = ap.parse_args(argv)
    pairs = [p.strip() for p in a.pairs.split(",") if p.strip()]
    if bad := [p for p in pairs if p not in PAIRS]:
        ap.error(f"unknown pairs {bad}; known: {', '.join(PAIRS)}")
    if a.batch % 2 or a.batch % a.microbatches or a.layers < 2 or a.steps < 1:
        ap.error("--batch must be even and divisible by --microbatches, --layers >= 2, --steps >= 1")

    from edgepool.machine import machine_info, machine_line

    t_start = time.perf_counter()
    results = {}
    for pair in pairs:
        runs = {"edgepool": [], "torch": []}
        error = None
        for r in range(a.repeats):
            for name, side in (("edgepool", _edgepool), ("torch", _torch)):
                try:
                    runs[name].append(_run(side, pair, a))
                    print(f"{pair} round {r + 1} {name}: median {runs[name][-1]['median']:.4f} s, "
                          f"losses {[round(x, 5) for x in runs[name][-1]['losses']]}", flush=True)
                except Exception as exc:  # noqa: BLE001 - a failing side is reported in the file
                    error = f"{name} failed: {str(exc).strip().splitlines()[-1][:200]}"
                    print(f"{pair}: {error}\n{exc}", file=sys.stderr, flush=True)
                    break
            if error:
                break
        results[pair] = {"runs": runs, "error": error}

    info = machine_info()
    cut = a.layers // 2
    lines = [
        "# edgepool vs plain PyTorch (measured)", "",
        f"Machine: {machine_line(info)}.", "",
        f"Seed {a.seed}. GPT hidden {a.hidden}, {a.layers} layers, {max(1, a.hidden // 64)} heads, FFN {4 * a.hidden}, "
        f"byte vocabulary; sequence {a.seq}, global batch {a.batch}; AdamW lr {a.lr}, no weight decay; fp32; "
        f"pipelines: 2 stages, layers [0, {cut}) | [{cut}, {a.layers}), {a.microbatches} micro-batches. "
        f"Timed steps per run: {a.steps}, after one warm-up step; rounds per pair: {a.repeats}; runs interleaved "
        "(edgepool, torch, edgepool, torch, ...). Every run is a fresh gloo process group of forked local "
        "processes (1 rank for `single`, else 2), one torch thread each; a step's time is its slowest rank's, each "
        "rank starting the step after a barrier. Median: the median of a side's per-run medians; spread: the min-max "
        "of those per-run medians. Ratio: edgepool / torch (below 1: edgepool is faster). Both sides normalise the "
        "loss as the engine does (sum over target tokens / the global batch's target count) and see the same "
        f"samples; step-1 losses (before any update) must agree within a relative {LOSS_RTOL:g}.",
        "Written by `benchmarks/vs_torch.py`; another session's work may have shared the machine.", "",
        "| pair | edgepool median (s) | torch median (s) | ratio | edgepool spread (s) | torch spread (s) | "
        "step-1 loss edgepool | step-1 loss torch | step-1 diff | losses agree | within 5%? |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    torch_name = {"single": "plain loop", "dp": "DDP", "pp-gpipe": "pipelining ScheduleGPipe",
                  "pp-1f1b": "pipelining Schedule1F1B", "fsdp": "FSDP2 fully_shard"}
    for pair, res in results.items():
        e, t = res["runs"]["edgepool"], res["runs"]["torch"]
        label = f"{pair} vs {torch_name[pair]}"
        if res["error"] or not e or not t:
            lines.append(f"| {label} | - | - | - | - | - | - | - | - | - | not measured: {res['error']} |")
            continue
        em, tm = statistics.median(r["median"] for r in e), statistics.median(r["median"] for r in t)
        es = f"{min(r['median'] for r in e):.4f}-{max(r['median'] for r in e):.4f}"
        ts = f"{min(r['median'] for r in t):.4f}-{max(r['median'] for r in t):.4f}"
        le, lt = e[0]["losses"][0], t[0]["losses"][0]
        diff = abs(le - lt)
        later = max(abs(x - y) for x, y in zip(e[0]["losses"], t[0]["losses"]))
        agree = "yes" if diff <= LOSS_RTOL * abs(lt) else f"NO (> {LOSS_RTOL:g} rel.)"
        lines.append(f"| {label} | {em:.4f} | {tm:.4f} | {em / tm:.3f} | {es} | {ts} | {le:.6f} | {lt:.6f} | "
                     f"{diff:.1e} (max over steps {later:.1e}) | {agree} | {_verdict(em / tm)} |")
    lines += [
        "", "## Differences between the sides", "",
        f"- **pp**: edgepool puts the embed *and* the head on stage 0, its data owner (ids and labels never leave it): "
        f"stage 0 runs embed + blocks [0, {cut}) + head, stage 1 blocks [{cut}, {a.layers}), and the last stage's "
        "output returns to stage 0 for the head and loss. torch's pipelining splits it the natural way, embed + "
        f"blocks [0, {cut}) on stage 0 and blocks [{cut}, {a.layers}) + head + loss on stage 1, which needs the "
        "labels on stage 1. So edgepool's stage 0 does more compute and each micro-batch crosses the link twice "
        "each way; torch's stages are more even. The torch side is built by hand (a `PipelineStage` over each rank's "
        "part, shapes inferred at the first step), not traced with `pipeline()`, which would need a traceable model.",
        "- **dp**: edgepool sums gradients in its own buckets during the last backward (`runtime.overlap.GradSync`); "
        "DDP uses its default 25 MB buckets and averages (the loss is multiplied by 2 to sum).",
        "- **fsdp**: edgepool shards the embed, each block and the head as units and the blocks' container as root, "
        "every unit resharding after its forward, and reduce-scatters by summing; torch's side shards each block and "
        "the whole model as root (embed and head in the root, FSDP2's defaults: the root keeps its parameters "
        "after the forward) and averages (the loss is multiplied by 2).",
        "- **single**: the engine also all-reduces the step's loss (a no-op cost on one rank) and runs its op list; "
        "the plain loop is forward, loss, backward, AdamW.",
        "",
        f"Total wall time of the benchmark: {time.perf_counter() - t_start:.0f} s.",
    ]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vs-torch.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'vs-torch.md'}")


if __name__ == "__main__":
    main()
