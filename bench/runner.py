"""``bench run``: compress one model with every requested method at each budget, evaluate, record.

The harness never names a method: it asks the registry for plugins and talks to them through
``solve`` and ``compress``. Bad input is refused before any work starts; a method that fails while
running is recorded as failed and the other cells go on.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import blockwise, checkpoint, data, hostheap, integrity, rescore, structure
from bench.adapters import get_adapter
from bench.budget import DEFAULT_TOLERANCE, budget_report, count_block_matrix_params, count_params
from bench.calibration import Calibration, reused_cost
from bench.claims import Claims
from bench.errors import UserError
from bench.evaluate import docs
from bench.evaluate.efficiency import PeakMemory, dir_size, weight_stats
from bench.evaluate.suite_eval import dense_reference, evaluate, is_finite_result
from bench.evaluate.zeroshot import resolve_tasks
from bench.models import cache_dir, load_model
from bench.placement import Placement, fits_or_refuse
from bench.records import Record, cell_key, environment, now, read_record, record_path, write_record
from bench.registry import Method, Solution, get_method
from bench.suites import Suite

DENSE = "dense"


@dataclass
class RunConfig:
    model: str
    methods: list[str]
    ratios: list[float]
    seeds: list[int]
    suite: Suite
    knobs: dict[str, dict] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "auto"
    cache: str | None = None
    results_dir: str = "results"
    save_checkpoints: bool = True
    tolerance: float = DEFAULT_TOLERANCE
    force: bool = False
    #: a method that refuses a ratio or the model (its solver raises) is recorded as failed and the run goes on;
    #: when False (methods named one by one) such a refusal is bad input and stops the run before any work
    record_refusals: bool = False
    #: recompute everything a cell needs: no reused records, no statistics shared between cells or read from disk
    #: (for measuring what the caches save, or distrusting them)
    no_cache: bool = False
    #: compute only these (method, ratio, seed) cells of the grid (the dense cell is ("dense", 0.0, first seed));
    #: None: every cell. An executor that spreads a grid over processes gives each one cell this way.
    only: list[tuple[str, float, int]] | None = None
    #: "auto": offload the blocks to host memory when the model does not fit the device budget; "on"; "off"
    offload: str = "auto"
    #: the device memory slimbench may use, in GiB (None: the device's own total; on CPU no limit)
    device_memory: float | None = None
    #: "blockwise" (statistics one block at a time) or "whole" (the whole-model reference path)
    engine: str = "blockwise"
    #: reused records without per-window perplexity/KL get them from their checkpoints (``bench.rescore``)
    rescore: bool = False


@dataclass
class Cell:
    method: str
    ratio: float
    seed: int


class Events:
    """What the runner tells its display; the CLI overrides these with rich output."""

    def start(self, total_cells: int) -> None: ...
    def cell(self, cell: Cell, step: str) -> None: ...

    def report(self, cell: Cell, text: str) -> None:
        """How far a long step has got (a method's own report, every few seconds): shown as the cell's step."""
        self.cell(cell, text)

    def done(self, cell: Cell, rec: Record, path: Path, reused: bool) -> None: ...
    def info(self, text: str) -> None: ...
    def running(self, steps: dict[str, str], slots: int) -> None: ...


def plan(cfg: RunConfig) -> list[Cell]:
    """The grid's cells, dense first (or the ones ``cfg.only`` names, in the same order)."""
    cells = [Cell(DENSE, 0.0, cfg.seeds[0])]
    cells += [Cell(m, r, s) for s in cfg.seeds for r in cfg.ratios for m in cfg.methods]
    if cfg.only is not None:
        wanted = {(m, float(r), int(s)) for m, r, s in cfg.only}
        cells = [c for c in cells if (c.method, c.ratio, c.seed) in wanted]
    return cells


def _instantiate(cfg: RunConfig) -> dict[str, Method]:
    """Create every method with its knobs; unknown methods or knobs raise UserError before any work."""
    unknown = set(cfg.knobs) - set(cfg.methods)
    if unknown:
        raise UserError(f"--set names method(s) {', '.join(sorted(unknown))} that are not in --methods")
    return {m: get_method(m)(**cfg.knobs.get(m, {})) for m in cfg.methods}


def _check_ratios(cfg: RunConfig) -> None:
    for r in cfg.ratios:
        if not 0.0 < r < 1.0:
            raise UserError(f"--ratio {r} is outside (0, 1): it is the share of the model's parameters removed, e.g. 0.12")


def run(cfg: RunConfig, events: Events | None = None) -> list[Record]:
    """Run every cell of ``cfg``; returns the records (failed ones included)."""
    events = events or Events()
    _check_ratios(cfg)
    instances = _instantiate(cfg)
    resolve_tasks(list(cfg.suite.tasks))
    wiki = data.wiki_text_path()  # refuse early when the text package is missing

    loaded, placement = place(cfg, methods=list(instances.values()))
    adapter = get_adapter(loaded.model)
    dense_params = count_params(loaded.model)
    dense_linear = count_block_matrix_params(adapter)
    solutions, refused = _solve_all(cfg, instances, adapter)
    env = environment(loaded.device)
    model_info = {"name": loaded.name, "spec": cfg.model, "source": loaded.source, "path": loaded.path,
                  "family": adapter.family, "dtype": loaded.dtype, "params": dense_params,
                  "blocks": adapter.num_blocks}
    base_parts = {"model": model_info | {"path": None}, "suite": cfg.suite.to_dict(), "dtype": loaded.dtype,
                  "device": loaded.device.split(":")[0], "text": data.file_fingerprint(wiki),
                  "slimbench": env["versions"]["slimbench"]}
    if cfg.engine != "blockwise":  # the reference path gives the same results within float tolerance, not bit for bit
        base_parts["engine"] = cfg.engine

    weights = integrity.weights_digest(loaded.path, cache_dir(cfg.cache))
    base_parts["weights"] = weights
    model_key = cell_key({"model": model_info | {"path": None}, "weights": weights,
                          "dtype": loaded.dtype, "device": base_parts["device"]})
    model_notices = integrity.drain()  # a repaired model cache concerns every cell of this run
    events.info(f"model {loaded.name}: {loaded.source}; weights from {loaded.path} ({loaded.dtype} on {loaded.device}, "
                f"{dense_params:,} parameters, {adapter.family} adapter)")
    cells = plan(cfg)
    events.start(len(cells))
    if placement.offload:
        events.info(f"offload: the model ({_gib(weight_bytes(loaded.model))}) stays in host memory, one block at a "
                    f"time on {placement.device} (budget {_gib(placement.budget_bytes)})")
    state = _State(loaded=loaded, calibrations={}, claims=Claims(), placement=placement)
    pending: list[tuple[Cell, Record]] = []
    for cell in cells:
        inst = instances.get(cell.method)
        knobs = inst.knob_dict() if inst else {}
        decisive = inst.result_knobs() if inst else {}  # operational knobs (a save interval) leave the key alone
        key = cell_key(base_parts | {"method": cell.method, "knobs": decisive, "ratio": cell.ratio, "seed": cell.seed})
        overrides = {k: v for k, v in cfg.knobs.get(cell.method, {}).items() if k in decisive}
        rec = Record(model=model_info, method=cell.method, knobs=knobs, knob_overrides=overrides,
                     target_ratio=cell.ratio, seed=cell.seed, suite=cfg.suite.to_dict(), key=key,
                     environment=env, started=now())
        if model_notices:
            rec.details["cache_repairs"] = list(model_notices)
        pending.append((cell, rec))
    order = [rec for _, rec in pending]
    records: dict[int, Record] = {}
    waited = 0.0
    while pending:  # cells another process holds are retried until its record appears or its claim lapses
        deferred = []
        for cell, rec in pending:
            done = _try_cell(cfg, cell, rec, state, instances, solutions, refused, model_key, events,
                             dense_params, dense_linear)
            if done is None:
                deferred.append((cell, rec))
            else:
                records[id(rec)] = done
        if deferred:
            if waited == 0.0:
                events.info(f"{len(deferred)} cell(s) are being computed by another process; waiting for them")
            time.sleep(WAIT_POLL)
            waited += WAIT_POLL
        pending = deferred
    return [records[id(rec)] for rec in order]


#: seconds between looks at a cell another process is computing
WAIT_POLL = 2.0


@dataclass
class _State:
    """What the cells of one run share: the loaded dense model (until a cell consumes it), calibrations, claims."""

    loaded: object
    calibrations: dict[int, Calibration]
    claims: Claims
    model: object = None
    used_loaded: bool = False
    placement: Placement | None = None


def _try_cell(cfg: RunConfig, cell: Cell, rec: Record, state: _State, instances, solutions, refused, model_key: str,
              events: Events, dense_params: int, dense_linear: int) -> Record | None:
    """Reuse, refuse or compute one cell; None when another live process is computing it."""
    existing = _existing(cfg, rec)
    if existing is not None and not (cfg.rescore and rescore.needs(existing)):
        events.done(cell, existing, record_path(cfg.results_dir, existing), reused=True)
        return existing
    path = record_path(cfg.results_dir, rec)
    if not state.claims.acquire(path):
        return None
    try:
        existing = _existing(cfg, rec)  # finished by another process between the look and the claim
        if existing is not None:
            if cfg.rescore and rescore.needs(existing):
                _rescore(cfg, cell, existing, state, model_key, events)
            events.done(cell, existing, path, reused=True)
            return existing
        scratch: list[Path] = []
        if (cell.method, cell.ratio) in refused:
            rec.status, rec.error = "failed", f"refused: {refused[(cell.method, cell.ratio)]}"
        else:
            scratch = _compute(cfg, cell, rec, state, instances.get(cell.method), solutions, model_key, events,
                               dense_params, dense_linear)
        rec.finished = now()
        try:
            docs.write_beside(cfg.results_dir, rec)  # before the record: a complete record has its side file
            path = write_record(cfg.results_dir, rec)
        except OSError as err:
            raise UserError(f"could not write the record of {cell.method} at {cell.ratio} to {path.parent} "
                            f"({err.strerror or err}); free space or fix permissions and run the same command "
                            "again (finished cells are kept)") from None
        if rec.metrics:  # evaluated and recorded: what the method kept for a rerun has served (kept when it failed)
            for f in scratch:
                Path(f).unlink(missing_ok=True)
    finally:
        state.claims.release(path)
    events.done(cell, rec, path, reused=False)
    return rec


def _rescore(cfg: RunConfig, cell: Cell, rec: Record, state: _State, model_key: str, events: Events) -> None:
    """Add the per-window figures to a reused record from its checkpoint and write it back; a checkpoint that is
    gone or no longer reproduces the record is reported and the record kept as it was."""
    events.cell(cell, "rescoring from its checkpoint")
    dense = state.loaded.model if state.loaded.model is not None else place(cfg, state.placement)[0].model
    adapter = get_adapter(dense)
    try:
        with blockwise.streaming(dense, adapter, state.placement):
            reference = dense_reference(dense, state.loaded.tokenizer, adapter, cfg.suite, cache_dir(cfg.cache),
                                        model_key)
        checked = rescore.rescore(rec, reference, cfg.suite, state.placement)
    except UserError as err:
        events.info(f"{cell.method} @ {cell.ratio:.2f} seed {cell.seed}: not rescored: {err}")
        return
    write_record(cfg.results_dir, rec)
    events.info(f"{cell.method} @ {cell.ratio:.2f} seed {cell.seed}: per-window figures added from its checkpoint "
                f"(perplexity {checked['perplexity']:.4f} reproduced)")


def _compute(cfg: RunConfig, cell: Cell, rec: Record, state: _State, inst: Method | None, solutions, model_key: str,
             events: Events, dense_params: int, dense_linear: int) -> list[Path]:
    """Compress (unless dense), evaluate and save one cell into ``rec``; a failure is recorded, never raised.
    Returns the files the method kept for a rerun (:attr:`CompressionInfo.scratch`), for the caller to remove once
    the record is written."""
    scratch: list[Path] = []
    if not state.used_loaded:
        model, state.used_loaded = state.loaded.model, True
    else:
        model = place(cfg, state.placement)[0].model
    placement = state.placement
    placement.peak = placement.resident = 0  # this cell's own figures
    try:
        with blockwise.streaming(model, get_adapter(model), placement):
            reference = dense_reference(model, state.loaded.tokenizer, get_adapter(model), cfg.suite,  # dense here
                                        None if cfg.no_cache else cache_dir(cfg.cache), model_key)
        if inst is not None:
            if cell.seed not in state.calibrations or cfg.no_cache:
                events.cell(cell, "calibration data")
                stats = None if cfg.no_cache else cache_dir(cfg.cache) / "stats"
                state.calibrations[cell.seed] = _calibration(state.loaded.tokenizer, cfg.suite, cell.seed, stats,
                                                             model_key)
            calib = state.calibrations[cell.seed]
            calib.placement = placement
            calib.report = lambda text, c=cell: events.report(c, f"compressing ({inst.name}): {text}")
            try:
                scratch = _compress(model, inst, calib, solutions[(cell.method, cell.ratio)], rec, cfg,
                          lambda step, c=cell: events.cell(c, step))
            finally:
                calib.report = None
        cell_adapter = get_adapter(model)
        rec.budget = vars(budget_report(dense_params, dense_linear, cell_adapter, cell.ratio, cfg.tolerance,
                                        rec.solution.get("predicted_params")))
        compress_peak = placement.peak
        placement.peak = 0
        with blockwise.streaming(model, cell_adapter, placement):
            rec.metrics = evaluate(model, state.loaded.tokenizer, cell_adapter, cfg.suite,
                                   progress=lambda step, c=cell: events.cell(c, step), seed=1234,
                                   reference=reference, dense=inst is None)
        rec.details["placement"] = {"device": str(placement.device), "offload": placement.offload,
                                    "engine": placement.engine, "budget_bytes": placement.budget_bytes,
                                    "placed_peak_compress_bytes": compress_peak if inst is not None else None,
                                    "placed_peak_eval_bytes": placement.peak}
        if not is_finite_result(rec.metrics):
            rec.status, rec.error = "failed", f"perplexity is {rec.metrics.get('perplexity')}: the model collapsed"
        events.cell(cell, "saving")
        _save(model, state.loaded.tokenizer, rec, cfg)
    except UserError as err:
        rec.status, rec.error = "failed", str(err)
    except Exception as err:  # one failing cell must not stop the others
        rec.status, rec.error = "failed", f"{type(err).__name__}: {err}"
        rec.details["traceback"] = traceback.format_exc(limit=8)
    finally:
        del model  # the next cell starts from a fresh dense model
        state.loaded.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    repairs = integrity.drain()
    if repairs:
        rec.details["cache_repairs"] = rec.details.get("cache_repairs", []) + repairs
    return scratch


def place(cfg: RunConfig, placement: Placement | None = None,
          methods: list[Method] | None = None) -> tuple[object, Placement]:
    """Load the dense model where it belongs: on the device when it fits the budget (and offload is not "on"),
    else in host memory with only the block at work on the device. Refuses (UserError) a device too small even
    for one block, its statistics and the largest workspace of ``methods``. ``placement``: the run's, decided at
    its first load."""
    if placement is not None:
        return load_model(cfg.model, str(placement.home), cfg.dtype, cfg.cache, dtype_for=cfg.device), placement
    loaded = load_model(cfg.model, "cpu" if cfg.offload != "off" else cfg.device, cfg.dtype, cfg.cache,
                        dtype_for=cfg.device)
    adapter = get_adapter(loaded.model)
    tokens = cfg.suite.calib_samples * cfg.suite.calib_seq_len
    workspace = max([m.device_workspace(adapter, tokens) for m in methods or []], default=0)
    placement = fits_or_refuse(loaded.model, adapter, cfg.device, cfg.offload, cfg.device_memory,
                               cfg.engine, cfg.suite.calib_samples, cfg.suite.calib_seq_len,
                               max(1, cfg.suite.eval_batch_size // 2), workspace=workspace)
    if placement.home != next(loaded.model.parameters()).device:
        loaded.model.to(placement.home)
    loaded.device = str(placement.device)
    return loaded, placement


def weight_bytes(model) -> int:
    return weight_stats(model)["weight_bytes"]


def _gib(n: int | None) -> str:
    return "none" if n is None else f"{n / 2**30:.2f} GiB"


def _solve_all(cfg: RunConfig, instances: dict[str, Method], adapter) -> tuple[dict, dict]:
    """Every (method, ratio) solution, and the refusals: {(method, ratio): message}."""
    solutions, refused = {}, {}
    for m, inst in instances.items():
        for r in cfg.ratios:
            try:
                solutions[(m, r)] = inst.solve(adapter, r)
            except UserError as err:
                refused[(m, r)] = str(err)
    if refused and not cfg.record_refusals:
        (m, r), msg = next(iter(refused.items()))
        more = f" (and {len(refused) - 1} more refusals)" if len(refused) > 1 else ""
        raise UserError(f"{msg}{more}; drop {m} or ratio {r}, or use --methods all to record refusals and go on")
    return solutions, refused


def _existing(cfg: RunConfig, rec: Record) -> Record | None:
    """A complete record of the same cell with the same key, unless --force."""
    if cfg.force or cfg.no_cache:
        return None
    path = record_path(cfg.results_dir, rec)
    try:
        old = read_record(path)
    except (OSError, ValueError):
        return None
    return old if old.key == rec.key and old.status == "ok" else None


def _calibration(tokenizer, suite: Suite, seed: int, stats_dir: Path | None, model_key: str) -> Calibration:
    tokens = data.calibration_batch(tokenizer, suite.calib_samples, suite.calib_seq_len, seed)
    return Calibration(tokens=tokens, seed=seed, batch_size=max(1, suite.eval_batch_size // 2),
                       source="packaged Wikipedia (exllamav2 wiki.utf8), calibration documents",
                       cache_dir=stats_dir, model_key=model_key, tokenizer=tokenizer)


def _compress(model, inst: Method, calib: Calibration, solution: Solution, rec: Record, cfg: RunConfig,
              step: Callable[[str], None]) -> list[Path]:
    step(f"compressing ({inst.name})")
    adapter = get_adapter(model)
    rec.solution = {"knobs": solution.knobs, "predicted_params": solution.predicted_params, "notes": solution.notes}
    device = calib.placement.device
    calib.memo["log"] = []
    with PeakMemory(device) as mem, hostheap.reuse_freed_pages():
        t0 = time.perf_counter()
        info = inst.compress(model, adapter, calib, solution)
        seconds = time.perf_counter() - t0
    rec.cost = {"compress_seconds": seconds, "compress_peak_memory_bytes": mem.peak_bytes,
                "compress_peak_memory_source": mem.source, "compress_peak_device_bytes": mem.device_peak_bytes,
                "compress_peak_device_source": mem.device_source, "compress_peak_host_bytes": mem.host_peak_bytes,
                "compress_peak_host_source": mem.host_source, "train_tokens": info.train_tokens,
                "train_seconds": info.train_seconds,
                "calibration_tokens": calib.n_tokens,
                "statistics": list(calib.memo.get("log", [])),  # computed, or reused from memory or disk
                # what computing the statistics this cell reused cost (None: one was stored before costs were kept)
                "statistics_reused_seconds": reused_cost(calib.memo.get("log", []))}
    rec.calibration = calib.describe()
    rec.details.update(info.details)
    # a ranking that needs the data (jointdrop's joint list) settles its counts in compress
    rec.solution = {"knobs": solution.knobs, "predicted_params": solution.predicted_params, "notes": solution.notes}
    rec.details["structure_ops"] = len(structure.structure_log(model))
    return info.scratch


def _save(model, tokenizer, rec: Record, cfg: RunConfig) -> None:
    """Save the cell's checkpoint in a folder unique to its key (with --no-save: a private folder, measured and
    removed, so it never replaces a checkpoint an earlier run kept)."""
    folder = cache_dir(cfg.cache) / "checkpoints" / record_path("", rec).with_suffix("")
    if not cfg.save_checkpoints:
        import os

        folder = folder.with_name(f".{folder.name}.measure-{os.getpid()}")
    checkpoint.save(model, tokenizer, folder, extra={"record_key": rec.key, "method": rec.method,
                                                      "target_ratio": rec.target_ratio})
    rec.metrics["checkpoint_bytes"] = (folder / checkpoint.WEIGHTS).stat().st_size
    rec.metrics["checkpoint_dir_bytes"] = dir_size(folder)
    rec.checkpoint = str(folder) if cfg.save_checkpoints else None
    if not cfg.save_checkpoints:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
