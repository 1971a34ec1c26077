"""A Gantt chart (PNG) of one simulated step: one row per device, one bar per op.

Compute ops are coloured by kind (forward, backward, embed/head, optimizer); group
collectives (tp/sp per-block communication and gradient syncs) are hatched; everything
else is idle. matplotlib is imported only here, with the non-interactive Agg backend.
"""

from __future__ import annotations

from pathlib import Path

from edgepool.sim.engine import SimResult

COLORS = {"fwd": "#4C72B0", "bwd": "#DD8452", "embed": "#55A868", "head": "#C44E52", "embed_bwd": "#55A868",
          "optim": "#8172B3", "comm": "#BBBBBB"}


def draw_gantt(result: SimResult, path: str | Path, *, title: str | None = None, order: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    devices = order or list(result.devices)
    fig, ax = plt.subplots(figsize=(12, 0.55 * len(devices) + 1.6))
    for row, dev in enumerate(devices):
        for sg in result.segments:
            if sg.device != dev:
                continue
            base = sg.label.split("[")[0]
            if sg.kind == "comm":
                ax.broken_barh([(sg.start_s, sg.end_s - sg.start_s)], (row - 0.35, 0.7), facecolors=COLORS["comm"],
                               hatch="//", edgecolor="#888888", linewidth=0.2)
            else:
                ax.broken_barh([(sg.start_s, sg.end_s - sg.start_s)], (row - 0.35, 0.7),
                               facecolors=COLORS.get(base, "#999999"), edgecolor="white", linewidth=0.3)
    ax.set_yticks(range(len(devices)))
    ax.set_yticklabels(devices)
    ax.invert_yaxis()
    ax.set_xlabel("time (s)")
    ax.set_xlim(0, result.step_time_s * 1.01)
    ax.set_title(title or f"plan {result.plan_id}: simulated step {result.step_time_s:.3g} s, "
                          f"{result.energy_j:.3g} J (modelled)")
    handles = [Patch(facecolor=COLORS[k], label=k) for k in ("fwd", "bwd", "embed", "head", "optim")]
    handles.append(Patch(facecolor=COLORS["comm"], hatch="//", label="group collective"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=6, fontsize=8, frameon=False)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
