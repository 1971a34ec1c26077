"""Study outputs: study.json, study.md, a rich table, and PNG plots.

Plots: bars of step time, energy per step and peak memory per parallelism (failed runs
marked with their status), and the measured timeline of one step (from a run's
``trace.json``: every rank's ops, named as in ``sim.lower``).
"""

from __future__ import annotations

import json
from pathlib import Path

MB = 1e6


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _err(measured, predicted) -> str:
    if measured is None or predicted is None or not measured:
        return "-"
    return f"{100.0 * (predicted - measured) / measured:+.0f}%"


def table_rows(result: dict) -> list[list[str]]:
    rows = []
    for r in result["rows"]:
        peak = max((d["peak_memory_bytes"] for d in r["devices"].values()), default=None)
        busy = ", ".join(f"{n} {d['busy_pct']:.0f}%" for n, d in r["devices"].items())
        rows.append([
            r["name"], r["parallelism"] or "-", r["status"] if r["status"] != "ok" else "trained",
            _fmt(r["step_time_s"], ".3f"), _fmt(r["samples_per_s"], ".1f"),
            _fmt(r["energy_per_step_j"], ".2f"), _fmt(r["energy_per_sample_j"], ".3f"),
            _fmt(peak and peak / MB, ".0f"), busy or "-", _fmt(r["bytes_per_step"] and r["bytes_per_step"] / MB, ".2f"),
            _fmt(r["predicted_step_time_s"], ".3f"), _fmt(r["predicted_energy_j"], ".2f"),
            "-" if r.get("predicted_fits") is None else ("yes" if r["predicted_fits"] else "no"),
        ])
    return rows


HEADERS = ["run", "plan", "status", "step s", "samples/s", "J/step", "J/sample", "peak MB", "busy", "MB sent/step",
           "pred. step s", "pred. J", "pred. fits"]


def comparison(result: dict) -> str | None:
    """How the planner's choice compares with the best plain parallelism (measured)."""
    ok = {r["name"]: r for r in result["rows"] if r["status"] == "ok"}
    plain = [r for n, r in ok.items() if n != "planner"]
    if "planner" not in ok or not plain:
        return None
    best = min(plain, key=lambda r: r["step_time_s"])
    p = ok["planner"]
    ratio = best["step_time_s"] / p["step_time_s"]
    verdict = "faster" if ratio >= 1 else "slower"
    return (f"planner's choice ({p['parallelism']}, {p['plan_id']}) measured {p['step_time_s']:.3f} s/step vs the best "
            f"plain parallelism {best['name']} at {best['step_time_s']:.3f} s/step: {ratio:.2f}x ({verdict})")


def _g(v, scale: float = 1.0) -> str:
    return "-" if v is None else f"{v / scale:.3g}"


STATUS = {"ok": "ok", "out of memory": "OOM", "infeasible": "no plan", "timeout": "timeout"}


def print_table(result: dict, console) -> None:
    """A compact study table for a terminal (study.md has every column)."""
    from rich.table import Table

    t = Table(title=f"Study on pool {result['pool']} (energy: modelled)")
    for h in ("run", "status", "step s", "smp/s", "J/step", "peak MB", "MB/step", "pred s", "pred J"):
        t.add_column(h, justify="left" if h in ("run", "status") else "right")
    for r in result["rows"]:
        peak = max((d["peak_memory_bytes"] for d in r["devices"].values()), default=None)
        name = r["name"] if r["name"] == r["parallelism"] or not r["parallelism"] else f"{r['name']} ({r['parallelism']})"
        t.add_row(name, STATUS.get(r["status"], r["status"]), _g(r["step_time_s"]), _g(r["samples_per_s"]),
                  _g(r["energy_per_step_j"]), "-" if peak is None else f"{peak / 1e6:.0f}", _g(r["bytes_per_step"], 1e6),
                  _g(r["predicted_step_time_s"]), _g(r["predicted_energy_j"]))
    console.print(t)
    for r in result["rows"]:
        if r["status"] != "ok":
            console.print(f"  {r['name']}: {r['status']}: {r['cause']}")
    c = comparison(result)
    if c:
        console.print(c)


def write_markdown(result: dict, path: Path) -> None:
    m = result["machine"]
    lines = [
        f"# Study: pool `{result['pool']}`", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, torch {m.get('torch', '?')}; "
        f"{m['date']}.",
        f"Model: {result['model']['family']} with {result['model']['num_layers']} layers, hidden {result['model']['hidden']}, "
        f"{result['model']['num_params'] / 1e6:.1f} M parameters; global batch {result['global_batch']}, sequence "
        f"{result['seq_len']}, {result['steps']} steps (step time: {result.get('step_time_stat', 'median of the steps after the first')}; "
        f"energy and CPU time: their mean).",
        f"Testbed: {'; '.join(result['testbed']) or 'plain local processes'}.",
        f"Energy: {result['energy_note']}. Times are this host's; the testbed keeps the pool's speed ratios.",
        f"Predictions: {result.get('prediction_source', 'cost model')}.",
        f"Plain families ({', '.join(r['name'] for r in result['rows'] if r['name'] != 'planner')}) use every device "
        "with shares in proportion to speed (the paper's setting); `planner` is the planner's choice for step time.", "",
        "| " + " | ".join(HEADERS) + " |", "|" + " --- |" * len(HEADERS),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(result)]
    lines.append("")
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"- **{r['name']}**: {r['status']}: {r['cause']}")
    c = comparison(result)
    if c:
        lines += ["", c[0].upper() + c[1:] + "."]
    lines += ["", "Plots: `study-bars.png` (time, energy, memory), `study-timeline.png` (one measured step).", ""]
    path.write_text("\n".join(lines))


def plot_bars(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["name"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    series = [
        ("step time (s)", [r["step_time_s"] for r in rows]),
        ("energy per step (J, modelled)", [r["energy_per_step_j"] for r in rows]),
        ("peak memory, largest rank (MB)", [max((d["peak_memory_bytes"] for d in r["devices"].values()), default=None)
                                            and max(d["peak_memory_bytes"] for d in r["devices"].values()) / MB
                                            for r in rows]),
    ]
    for ax, (title, values) in zip(axes, series):
        heights = [v or 0 for v in values]
        colors = ["tab:green" if r["name"] == "planner" else "tab:blue" for r in rows]
        ax.bar(names, heights, color=colors)
        top = max(heights) if any(heights) else 1.0
        for i, (v, r) in enumerate(zip(values, rows)):
            if v is None:
                ax.text(i, top * 0.05, r["status"], rotation=90, ha="center", va="bottom", color="tab:red")
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"pool {result['pool']}: measured per parallelism (red: did not train)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COLORS = {"fwd": "tab:blue", "bwd": "tab:orange", "embed": "tab:cyan", "embed_bwd": "tab:cyan", "head": "tab:purple",
          "recv_act": "lightgray", "recv_grad": "lightgray", "send_act": "gray", "send_grad": "gray",
          "sync_grads": "tab:red", "optim": "tab:green"}


def plot_timeline(trace: dict, path: Path, title: str) -> None:
    """A Gantt chart of one measured step: one row per rank, one bar per op."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ranks = trace["ranks"]
    fig, ax = plt.subplots(figsize=(11, 0.6 * len(ranks) + 1.5))
    for i, r in enumerate(ranks):
        for op, t0, t1 in r["events"]:
            kind = op.split("[")[0]
            ax.broken_barh([(t0, max(t1 - t0, 1e-5))], (i - 0.4, 0.8), color=COLORS.get(kind, "black"))
    ax.set_yticks(range(len(ranks)), [f"rank {r['rank']} ({r['device']})" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("seconds into the step (measured)")
    ax.set_title(title, fontsize=10)
    used = sorted({op.split("[")[0] for r in ranks for op, _, _ in r["events"]})
    ax.legend(handles=[Patch(color=COLORS.get(k, "black"), label=k) for k in used], loc="upper center",
              bbox_to_anchor=(0.5, -0.4), ncol=min(6, len(used)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_study(result: dict, out_dir: Path) -> dict[str, Path]:
    out = {"json": out_dir / "study.json", "md": out_dir / "study.md", "bars": out_dir / "study-bars.png"}
    out["json"].write_text(json.dumps(result, indent=2))
    write_markdown(result, out["md"])
    plot_bars(result, out["bars"])
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    pick = next((r for r in ok if r["name"] == "planner"), ok[0] if ok else None)
    if pick is not None and (Path(pick["run_dir"]) / "trace.json").is_file():
        trace = json.loads((Path(pick["run_dir"]) / "trace.json").read_text())
        out["timeline"] = out_dir / "study-timeline.png"
        plot_timeline(trace, out["timeline"], f"{pick['name']}: plan {pick['plan_id']} ({pick['parallelism']}), "
                                              f"step {trace['step']}, measured")
    return out
