"""Throughput of each parallelism on 2 to 4 local processes (a benchmark, not a test).

Runs `edgepool train` (the real launcher, one process per device) for every mode on
pools of 2, 3 and 4 local devices with a small GPT, and writes the measured step
time, samples/s, bytes sent and peak memory to docs/results/runtime-modes.md (and
.json), with the machine it ran on. All devices share this machine's cores, so the
numbers compare modes on this host; they are not edge-device speeds.

    python benchmarks/runtime_modes.py [--steps 8] [--size tiny]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

from edgepool.errors import EdgepoolError
from edgepool.launch.local import launch_local
from edgepool.launch.prepare import prepare_run, proportional_plan
from edgepool.specs import load_job, load_pool
from edgepool.specs.metrics import STEP_TIME_STAT
from edgepool.machine import machine_info, machine_line
from edgepool.testing import CORPUS

ROOT = Path(__file__).resolve().parents[1]
MODES = {2: ["single", "dp", "sp", "tp", "fsdp", "pp"], 3: ["dp", "sp", "tp", "fsdp", "pp", "hybrid"],
         4: ["dp", "sp", "tp", "fsdp", "pp", "hybrid"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", default="small")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        job = tmp / "job.yaml"
        job.write_text(yaml.safe_dump({
            "model": {"family": "gpt", "size": args.size, "num_layers": 4},
            "data": {"path": str(CORPUS)},
            "train": {"global_batch": 8, "seq_len": 64, "steps": args.steps, "lr": 1e-3},
            "parallelism": {"mode": "dp", "num_microbatches": 2, "schedule": "1f1b"},
        }))
        for n, modes in MODES.items():
            pool = tmp / f"pool{n}.yaml"
            pool.write_text(yaml.safe_dump({"name": f"local{n}", "devices": [
                {"name": f"d{i}", "kind": "host-cpu", "host": "local", "compute_scale": 1.0} for i in range(n)]}))
            for mode in modes:
                out = tmp / f"{n}-{mode}"
                try:
                    # The plain family over all n devices (--parallelism would let the
                    # planner leave devices out).
                    plan_file = tmp / f"plan-{n}-{mode}.json"
                    plan_file.write_text(proportional_plan(load_pool(pool), load_job(job), 4, mode).dumps())
                    spec = prepare_run(pool, job, out_dir=out, plan_path=str(plan_file))
                    s = launch_local(spec)
                    rows.append({"devices": n, "mode": mode, "plan_id": s.plan_id, "status": "ok",
                                 "step_time_s": s.step_time_s, "samples_per_s": s.samples_per_s,
                                 "bytes_sent_per_step": sum(d.bytes_sent for d in s.devices.values()) / s.steps,
                                 "peak_memory_mb": max(d.peak_memory_bytes for d in s.devices.values()) / 1e6,
                                 "final_loss": s.final_loss})
                except EdgepoolError as exc:
                    rows.append({"devices": n, "mode": mode, "status": f"failed: {exc}"})
                print(rows[-1], flush=True)
    info = machine_info()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtime-modes.json").write_text(json.dumps({"machine": info, "steps": args.steps, "size": args.size,
                                                         "rows": rows}, indent=2))
    lines = [
        "# Runtime throughput per parallelism (measured)", "",
        f"Machine: {machine_line(info)}.", "",
        f"GPT `{args.size}` with 4 layers, global batch 8, sequence 64, 2 micro-batches (1F1B) for pipelines, "
        f"{args.steps} steps; step time: {STEP_TIME_STAT}. Every device is a local process on this "
        "machine, so all modes share its cores: this compares the modes' overheads here, not edge-device speeds. "
        "Each mode uses every device with equal shares (all devices are alike). Another session's work may have "
        "shared the machine; compare rows within this table only.",
        "Written by `benchmarks/runtime_modes.py`.", "",
        "| devices | mode | plan | step time (s) | samples/s | bytes sent / step | peak RSS per rank (MB) | final loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['devices']} | {r['mode']} | - | {r['status']} | | | | |")
            continue
        lines.append(f"| {r['devices']} | {r['mode']} | {r['plan_id']} | {r['step_time_s']:.3f} | "
                     f"{r['samples_per_s']:.1f} | {r['bytes_sent_per_step'] / 1e6:.2f} MB | {r['peak_memory_mb']:.0f} | "
                     f"{r['final_loss']:.4f} |")
    (out / "runtime-modes.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'runtime-modes.md'}")


if __name__ == "__main__":
    main()
