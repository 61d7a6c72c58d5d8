"""Rich progress display for ``bench run``."""

from __future__ import annotations

import statistics
import time
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from bench.records import Record
from bench.runner import Cell, Events


def _num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


class RichEvents(Events):
    """One progress line over the grid: the cell and step in progress, cells ok / failed / left, time left.

    The estimate is the median time of the cells computed so far times the cells left (reused cells are free).
    """

    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[tally]}"), TimeElapsedColumn(),
                                 console=console, transient=True)
        self.task = None
        self.total = 0
        self.counts = {"ok": 0, "failed": 0, "reused": 0}
        self.durations: list[float] = []
        self.current: tuple | None = None
        self.started = time.perf_counter()
        self.active: int | None = None  # cells running elsewhere (Ray); None with the local executor
        self.slots = 1  # cells that run at once, for the estimate

    def tally(self) -> str:
        left = self.total - sum(self.counts.values())
        text = f"{self.counts['ok']} ok, {self.counts['failed']} failed, {self.counts['reused']} reused"
        text += f", {self.active} running, {left} left" if self.active is not None else f", {left} left"
        if self.durations and left:
            eta = statistics.median(self.durations) * left / max(1, min(self.slots, left))
            text += f", ~{int(eta // 60)}:{int(eta % 60):02d} left"
        return text

    def __enter__(self) -> RichEvents:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def start(self, total_cells: int) -> None:
        self.total = total_cells
        self.task = self.progress.add_task("starting", total=total_cells, tally=self.tally())

    def cell(self, cell: Cell, step: str) -> None:
        key = (cell.method, cell.ratio, cell.seed)
        if key != self.current:
            self.current, self.started = key, time.perf_counter()
        self.progress.update(self.task, description=f"{cell.method} @ {cell.ratio:.2f} seed {cell.seed}: {step}")

    def report(self, cell: Cell, text: str) -> None:
        """On a terminal the step line shows it; in a log (no terminal) each report is a line of its own."""
        self.cell(cell, text)
        if not self.console.is_terminal:
            self.console.print(f"  {cell.method} @ {cell.ratio:.2f} seed {cell.seed}: {text}", soft_wrap=True,
                               markup=False, highlight=False)

    def done(self, cell: Cell, rec: Record, path: Path, reused: bool) -> None:
        if reused:
            self.counts["reused"] += 1
        else:
            self.counts["ok" if rec.status == "ok" else "failed"] += 1
            if (cell.method, cell.ratio, cell.seed) == self.current:
                self.durations.append(time.perf_counter() - self.started)
            elif rec.started and rec.finished:  # computed elsewhere: its own timestamps
                self.durations.append(_seconds(rec.started, rec.finished))
        self.current = None
        self.progress.update(self.task, advance=1, tally=self.tally())
        m = rec.metrics
        if rec.status != "ok":
            self.console.print(f"[red]✗[/] {cell.method} @ {cell.ratio:.2f}: {rec.error}", soft_wrap=True)
            return
        achieved = rec.budget.get("achieved_ratio", 0.0)
        how = "reused" if reused else f"{path}"
        self.console.print(f"[green]✓[/] {cell.method} @ {cell.ratio:.2f} (achieved {100 * achieved:.1f}%): "
                           f"ppl {_num(m.get('perplexity'))}, mean acc {_num(m.get('mean_acc'), 3)}"
                           f" — {how}", soft_wrap=True)

    def info(self, text: str) -> None:
        self.console.print(text, soft_wrap=True)

    def running(self, steps: dict[str, str], slots: int) -> None:
        """Cells in progress on Ray workers and their steps."""
        self.active, self.slots = len(steps), slots
        shown = "; ".join(f"{label}: {step}" for label, step in sorted(steps.items())[:3])
        more = f" (+{len(steps) - 3})" if len(steps) > 3 else ""
        self.progress.update(self.task, description=(shown + more) or "waiting for workers", tally=self.tally())


def _seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
