"""How big a model the demo pool can train: full fp32, recomputation, bf16, LoRA, all of them, and fsdp.

On the demo pool (four emulated devices with the demo's memory caps: laptop 1.2 GB, Orin
0.8 GB, two Nanos 0.6 GB; shared 70 Mbit/s; ``src/edgepool/examples/demo-pool.yaml``)
the benchmark grows a GPT (hidden 512, 8 heads, FFN 2048, byte vocabulary; more and more
blocks) and, for each setting, asks the planner for its plan and trains it for a few
steps in the testbed, where each device's memory cap is a real cgroup limit:

- *full fp32*: every parameter trains in fp32, every activation kept (the planner may
  not recompute, and no fsdp);
- *recomputation*: the planner may recompute activations where memory is short;
- *bf16*: autocast to bf16 (fp32 master weights), no recomputation;
- *LoRA*: rank-8 adapters on the attention's q and v, the rest frozen, fp32;
- *all together*: LoRA, bf16 and recomputation;
- *all + fsdp*: the same, the planner also free to shard stages with fsdp (the other
  settings leave fsdp out, so its share shows).

For every size it records the planner's verdict (a plan that fits its memory model, or
none) beside the measured one (the plan trained its steps, or a device ran out of
memory: the kernel's OOM kill at the cgroup cap, or the rank's own allocation error).
When the planner finds nothing, the lightest plan it can name is run anyway (a pipeline
over all four devices in proportion to their memory, recomputing when the setting
allows), so the prediction can be checked both ways. A setting stops at its first size
that fails to train. Writes ``docs/results/big-models.md`` with the machine. Needs root
(the testbed). Run: ``python benchmarks/big_models.py [--sizes 4,8,...] [--steps N]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "results" / "big-models.md"
POOL = ROOT / "src" / "edgepool" / "examples" / "demo-pool.yaml"
LORA = {"rank": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}
# (name, train settings, the planner may recompute, the planner may use fsdp)
SETTINGS = [
    ("full fp32", {}, False, False),
    ("recomputation", {}, True, False),
    ("bf16", {"precision": "bf16"}, False, False),
    ("LoRA", {"lora": LORA}, False, False),
    ("all together", {"lora": LORA, "precision": "bf16"}, True, False),
    ("all + fsdp", {"lora": LORA, "precision": "bf16"}, True, True),
]
SIZES = (4, 8, 16, 24, 32, 40, 48, 64, 80, 96, 128)
SPEEDS: list[str] = []  # the planner's speeds line of each prediction (``launch.speeds``)


def job_for(layers: int, train: dict, steps: int):
    from edgepool.specs.job import JobSpec
    from edgepool.testing import CORPUS

    return JobSpec.model_validate({
        "model": {"family": "gpt", "size": "small", "hidden": 512, "num_layers": layers, "num_heads": 8, "ffn": 2048},
        "data": {"path": str(CORPUS)},
        "train": {"global_batch": 4, "seq_len": 128, "steps": steps, "lr": 1e-3, "recover": False,
                  "replicate_every": 0, "timeout_s": 600, **train},
        "parallelism": "auto"})


def predict(pool, job, recompute: bool, fsdp: bool):
    """The planner's plan and its predicted step and peak memory, or (None, why)."""
    from edgepool.errors import InfeasibleError
    from edgepool.launch.speeds import run_profile
    from edgepool.planner import plan

    speeds = run_profile(pool, job, log=lambda m: None)  # as `train --parallelism auto` prices it
    SPEEDS.append(speeds.line)
    try:
        res = plan(pool, job, speeds.profile, recompute=recompute, without=() if fsdp else ("fsdp",))
    except InfeasibleError as exc:
        return None, str(exc).split(";")[0]
    return res, None


def lightest(pool, job, recompute: bool):
    """A pipeline over every device, layers in proportion to its memory (recomputing
    when allowed): what is run when the planner finds no plan."""
    from edgepool.specs.plan import Plan, StagePlan, split_counts

    devs = list(pool.devices)
    L = job.model.num_layers
    counts = split_counts(L, [d.memory_gb or 1.0 for d in devs])
    stages, start = [], 0
    for d, c in zip(devs, counts):
        if c:
            stages.append(StagePlan(layers=(start, start + c), devices=(d.name,), recompute=recompute))
            start += c
    return Plan(num_layers=L, stages=tuple(stages), num_microbatches=job.train.global_batch, schedule="1f1b")


def measure(pool, job, plan, placement, out: Path) -> dict:
    """Train ``plan`` for the job's steps in the testbed: its median step, or how it failed."""
    from edgepool.launch.local import RankFailed, launch_local
    from edgepool.launch.prepare import prepare_run

    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(plan.dumps())
    run = prepare_run(pool, job, out_dir=out / "run", plan_path=str(out / "plan.json"), log=lambda m: None)
    t0 = time.perf_counter()
    try:
        summary = launch_local(run, placement=placement, deadline_s=1800)
    except RankFailed as exc:
        oom = "out of memory" in exc.reason or "memory" in _tail(exc.log)
        return {"ok": False, "why": exc.reason if oom or not _tail(exc.log) else f"{exc.reason}: {_tail(exc.log)}",
                "oom": oom, "device": exc.device, "wall_s": time.perf_counter() - t0}
    peaks = {d: s.peak_memory_bytes for d, s in summary.devices.items()}
    return {"ok": True, "step_s": summary.step_time_s, "peaks": peaks, "wall_s": time.perf_counter() - t0}


def _tail(log: Path) -> str:
    try:
        lines = [ln for ln in Path(log).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    err = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (err or lines or [""])[-1][:200]


def params_m(job) -> float:
    from edgepool.models.config import job_model_config

    cfg = job_model_config(job)
    h, f, L, V = cfg.hidden, cfg.ffn, cfg.num_layers, cfg.vocab_size
    return (L * (4 * h * h + 2 * h * f + 9 * h + f) + 2 * V * h + cfg.max_seq_len * h) / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="block counts to try, in order")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--settings", default="", help="only these settings (comma-separated names)")
    args = ap.parse_args()
    from edgepool.launch.local import pool_placement
    from edgepool.machine import machine_line
    from edgepool.specs import load_pool
    from edgepool.testbed import is_available

    ok = is_available()
    if not ok:
        print(f"testbed unavailable: {ok.reason}")
        return 1
    sizes = [int(s) for s in args.sizes.split(",")]
    wanted = [s for s in SETTINGS if not args.settings or s[0] in args.settings.split(",")]
    pool = load_pool(POOL)
    tmp = Path(tempfile.mkdtemp(prefix="edgepool-big-"))
    rows, started = [], time.time()
    with pool_placement(pool, log=lambda m: None) as placement:
        for name, train, recompute, fsdp in wanted:
            for layers in sizes:
                job = job_for(layers, train, args.steps)
                res, why = predict(pool, job, recompute, fsdp)
                plan = res.plan if res is not None else lightest(pool, job, recompute)
                m = measure(pool, job, plan, placement, tmp / f"{name.replace(' ', '-')}-{layers}")
                row = {"setting": name, "layers": layers, "params_m": params_m(job), "fits_predicted": res is not None,
                       "why_not": why, "plan": f"{plan.parallelism} {plan.plan_id}", "stages": len(plan.stages),
                       "recompute": [i for i, st in enumerate(plan.stages) if st.recompute],
                       "predicted_step_s": res.plan.estimate.step_time_s if res is not None else None,
                       "predicted_peak_gb": (max(d.memory_bytes for d in res.cost.devices.values()) / 1e9
                                             if res is not None else None), **m}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "peaks"}), flush=True)
                if not m["ok"]:
                    break
    write(rows, machine_line(), time.time() - started, args)
    return 0


def write(rows: list[dict], machine: str, took: float, args) -> None:
    lines = [
        "# How big a model the demo pool trains", "",
        f"Written by `benchmarks/big_models.py`; {machine}; {took / 60:.0f} min in all; {args.steps} steps a run.", "",
        "Pool: the demo's four emulated devices (laptop 1.2 GB, Orin Nano 0.8 GB, two Jetson Nanos 0.6 GB for "
        "training: real cgroup memory caps; CPU caps scaled to this host; shared 70 Mbit/s). Model: GPT, hidden 512, "
        "8 heads, FFN 2048, byte vocabulary, the block count grown; global batch 4, sequence 128, AdamW; no recovery "
        "backups. *Predicted*: the planner's plan fits its memory model; *measured*: that plan (or, when the planner "
        "finds none, a pipeline over all four devices in proportion to their memory) trained its steps in the "
        "testbed, or a device ran out of memory. The planner prices the testbed's speeds as `train --parallelism "
        f"auto` does (`launch.speeds`): {SPEEDS[-1] if SPEEDS else '-'}. Its profile is measured on this host "
        "without the testbed's caps; the measured peaks are each rank's own resident high-water mark (VmHWM), while the caps "
        "are cgroup limits.", "",
        "| setting | blocks | params (M) | predicted fit | plan | recomputing stages | predicted step (s) | "
        "predicted peak (GB) | measured | measured step (s) | measured peak (GB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = max(r["peaks"].values()) / 1e9 if r.get("peaks") else None
        got = "trains" if r["ok"] else (f"out of memory on {r['device']}" if r.get("oom") else f"failed on {r['device']}")
        lines.append(f"| {r['setting']} | {r['layers']} | {r['params_m']:.0f} | "
                     f"{'yes' if r['fits_predicted'] else 'no'} | {r['plan']} | "
                     f"{', '.join(map(str, r['recompute'])) or '-'} | {_f(r['predicted_step_s'])} | "
                     f"{_f(r['predicted_peak_gb'])} | {got} | {_f(r.get('step_s'))} | {_f(peak)} |")
    lines += ["", "## Largest model that trains, per setting", "",
              "| setting | largest that trains (blocks, M params) | its step (s) | next size | planner's largest fit |",
              "|---|---|---|---|---|"]
    for name in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == name]
        good = [r for r in mine if r["ok"]]
        bad = next((r for r in mine if not r["ok"]), None)
        pred = [r for r in mine if r["fits_predicted"]]
        best = good[-1] if good else None
        nxt = "not reached (the largest size tried trains)" if bad is None else \
            f"{bad['layers']} blocks: {'out of memory on ' + bad['device'] if bad.get('oom') else bad['why']}"
        largest = f"{best['layers']} ({best['params_m']:.0f} M)" if best else "none"
        lines.append(f"| {name} | {largest} | "
                     f"{_f(best['step_s']) if best else '-'} | {nxt} | "
                     f"{pred[-1]['layers'] if pred else 'none'} blocks{' (of those tried)' if pred else ''} |")
    lines += ["", "Failures and their reasons (the rank's exit cause, and the last error line of its log):", ""]
    lines += [f"- {r['setting']}, {r['layers']} blocks: {r['why']}" for r in rows if not r["ok"]]
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


def _f(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


if __name__ == "__main__":
    raise SystemExit(main())
