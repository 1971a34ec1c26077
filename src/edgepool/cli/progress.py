"""A rich progress bar for training: step, loss and samples/s."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total_steps: int, plan, *, console: Console | None = None, enabled: bool = True):
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} samples/s"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console or Console(stderr=True), disable=not enabled,
        )
        self.task = self.progress.add_task(f"{plan.parallelism} {plan.plan_id}", total=total_steps, loss="-", rate="-")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, rec) -> None:
        """Show one ``specs.metrics.StepRecord``."""
        self.progress.update(self.task, completed=rec.step + 1, loss=f"{rec.loss:.4f}", rate=f"{rec.samples_per_s:.1f}")

    def event(self, ev: dict) -> None:
        """Show a ``launch.recover`` event (a device lost, or taken in) above the bar, and the new plan on it."""
        self.progress.update(self.task, description=f"{ev['parallelism']} {ev['plan_id']}")
        took = (f"taken in in {ev['join_s']:.1f} s" if "join_s" in ev else f"recovered in {ev['recovery_s']:.1f} s")
        self.progress.console.print(
            f"event: {ev['event']} {ev['device']}: went on from step {ev['from_step']} under plan {ev['plan_id']} "
            f"({ev['parallelism']} over {', '.join(ev['devices'])}), {took}")
