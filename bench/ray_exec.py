"""``--executor ray``: every cell of a grid is one Ray task, on a local Ray instance or an existing cluster.

Each task runs the ordinary runner on one cell (``RunConfig.only``), so keys, reuse, claims, the statistics
cache and atomic record writes are exactly those of the local executor: the results and cache folders must be
on storage every node sees. The dense cell runs first, then the method cells in parallel. A cell that fails
for its own reasons is recorded failed by the runner and returns normally (never retried); a worker that dies
mid-cell is retried by Ray up to ``max_retries`` times and its claim, whose process is gone, is taken over.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.errors import UserError
from bench.records import Record, now, record_path
from bench.runner import DENSE, Cell, Events, RunConfig, plan

INSTALL = "pip install 'slimbench[ray]'"
#: environment variables the driver passes to every worker (offline hub, quiet progress bars, the cache)
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM", "TQDM_DISABLE", "SLIMBENCH_CACHE")
#: seconds between looks at the cluster while cells run
POLL = 0.5


@dataclass
class Resources:
    """What each cell asks Ray for; ``gpus=None`` means one GPU when the cluster has any, else none."""

    cpus: float = 1.0
    gpus: float | None = None
    memory_gb: float | None = None
    max_retries: int = 2


def require_ray():
    """The ``ray`` module, or a one-line UserError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--executor ray needs Ray, which is not installed; install it with {INSTALL}") from None
    return ray


def _absolute(cfg: RunConfig) -> RunConfig:
    """Paths made absolute, since workers need not share the driver's working folder."""
    from bench.models import cache_dir

    model = str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model
    return dataclasses.replace(cfg, model=model, results_dir=str(Path(cfg.results_dir).resolve()),
                               cache=str(cache_dir(cfg.cache).resolve()))


def _label(cell: Cell) -> str:
    return f"{cell.method} @ {cell.ratio:.2f} seed {cell.seed}"


class _WorkerEvents(Events):
    """Inside a task: send the cell's steps and messages to the driver's board, remember whether it was reused."""

    def __init__(self, board: Any) -> None:
        self.board, self.reused = board, False

    def cell(self, cell: Cell, step: str) -> None:
        self.board.step.remote(_label(cell), step)

    def done(self, cell: Cell, rec: Record, path: Path, reused: bool) -> None:
        self.reused = reused

    def info(self, text: str) -> None:
        self.board.note.remote(text)


def run_cell(cfg: RunConfig, cell: Cell, methods: dict[str, type], board: Any) -> tuple[Record, bool]:
    """One cell through the ordinary runner (the body of each Ray task): its record and whether it was reused."""
    from bench import registry
    from bench.runner import run

    for cls in methods.values():  # methods the driver knows (plugins included) are known here too
        registry.register(cls)
    events = _WorkerEvents(board)
    board.step.remote(_label(cell), "loading the model")
    [rec] = run(dataclasses.replace(cfg, only=[(cell.method, cell.ratio, cell.seed)]), events)
    return rec, events.reused


class Board:
    """A small actor the workers report to: each running cell's step, and messages for the driver to print."""

    def __init__(self) -> None:
        self.steps: dict[str, str] = {}
        self.notes: list[str] = []

    def step(self, label: str, text: str) -> None:
        self.steps[label] = text

    def note(self, text: str) -> None:
        self.notes.append(text)

    def read(self) -> tuple[dict[str, str], list[str]]:
        notes, self.notes = self.notes, []
        return dict(self.steps), notes

    def forget(self, label: str) -> None:
        self.steps.pop(label, None)


def _connect(ray, address: str | None) -> None:
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise UserError(f"--address {address}: cannot join the Ray cluster ({err}); start one with `ray start "
                        "--head` or give the head's address, e.g. --address ray://head:10001") from None


def _options(ray, res: Resources) -> dict:
    """Ray task options from the per-cell resources; one GPU per cell by default when the cluster has GPUs."""
    gpus = res.gpus if res.gpus is not None else (1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0)
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    opts = {"num_cpus": res.cpus, "num_gpus": gpus, "max_retries": res.max_retries, "retry_exceptions": False,
            "runtime_env": {"env_vars": env}}
    if res.memory_gb:
        opts["memory"] = int(res.memory_gb * 2**30)
    return opts


def _slots(ray, opts: dict) -> int:
    """How many cells the cluster can run at once (for the time estimate)."""
    total = ray.cluster_resources()
    fits = [total.get("CPU", 0) / opts["num_cpus"] if opts["num_cpus"] else float("inf")]
    if opts["num_gpus"]:
        fits.append(total.get("GPU", 0) / opts["num_gpus"])
    return max(1, int(min(fits)))


def _lost(cfg: RunConfig, cell: Cell, err: Exception) -> Record:
    """A failed record for a cell whose task itself failed (its worker died more often than retries allow)."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return Record(model={"name": cfg.model, "spec": cfg.model}, method=cell.method, knobs={}, knob_overrides={},
                  target_ratio=cell.ratio, seed=cell.seed, suite=cfg.suite.to_dict(), status="failed",
                  error=f"Ray task failed ({type(err).__name__}: {reason}); run the same command again to retry it",
                  started=now(), finished=now())


def run(cfg: RunConfig, events: Events | None = None, address: str | None = None,
        resources: Resources | None = None) -> list[Record]:
    """Run every cell of ``cfg`` as a Ray task (dense first); returns the records in plan order."""
    from bench.registry import get_method

    ray = require_ray()
    events = events or Events()
    resources = resources or Resources()
    cfg = _absolute(cfg)
    methods = {m: get_method(m) for m in cfg.methods}  # unknown names fail here, before Ray starts
    _connect(ray, address)
    opts = _options(ray, resources)
    task = ray.remote(run_cell).options(**opts)
    board = ray.remote(Board).options(num_cpus=0).remote()
    cells = plan(cfg)
    events.start(len(cells))
    dense = [c for c in cells if c.method == DENSE]
    rest = [c for c in cells if c.method != DENSE]
    done: dict[int, Record] = {}
    outstanding: dict[Any, tuple[int, Cell]] = {}
    seen: set[str] = set()  # messages already printed (every worker announces the model)
    try:
        for wave in (dense, rest):
            for cell in wave:
                outstanding[task.remote(cfg, cell, methods, board)] = (cells.index(cell), cell)
            _drain(ray, cfg, outstanding, board, events, done, seen, _slots(ray, opts))
    except BaseException:
        for ref in outstanding:
            ray.cancel(ref, force=True)
        raise
    finally:
        ray.kill(board)
    return [done[i] for i in range(len(cells))]


def _drain(ray, cfg: RunConfig, outstanding: dict, board, events: Events, done: dict[int, Record], seen: set[str],
           slots: int) -> None:
    """Wait for every outstanding task, feeding the display as results and steps arrive."""
    while outstanding:
        ready, _ = ray.wait(list(outstanding), num_returns=1, timeout=POLL)
        for ref in ready:
            index, cell = outstanding.pop(ref)
            try:
                rec, reused = ray.get(ref)
            except (ray.exceptions.RayError, UserError) as err:
                rec, reused = _lost(cfg, cell, err), False
            board.forget.remote(_label(cell))
            done[index] = rec
            events.done(cell, rec, record_path(cfg.results_dir, rec), reused)
        steps, notes = ray.get(board.read.remote())
        for text in notes:
            if text not in seen:
                seen.add(text)
                events.info(text)
        events.running({k: v for k, v in steps.items() if k in {_label(c) for _, c in outstanding.values()}}, slots)
