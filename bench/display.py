"""Rich progress display for ``bench run``."""

from __future__ import annotations

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
    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True)
        self.task = None

    def __enter__(self) -> RichEvents:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def start(self, total_cells: int) -> None:
        self.task = self.progress.add_task("starting", total=total_cells)

    def cell(self, cell: Cell, step: str) -> None:
        self.progress.update(self.task, description=f"{cell.method} @ {cell.ratio:.2f} seed {cell.seed}: {step}")

    def done(self, cell: Cell, rec: Record, path: Path, reused: bool) -> None:
        self.progress.advance(self.task)
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
