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

from bench import checkpoint, data, structure
from bench.adapters import get_adapter
from bench.budget import DEFAULT_TOLERANCE, budget_report, count_block_matrix_params, count_params
from bench.calibration import Calibration
from bench.errors import UserError
from bench.evaluate import docs
from bench.evaluate.efficiency import PeakMemory, dir_size
from bench.evaluate.suite_eval import dense_reference, evaluate, is_finite_result
from bench.evaluate.zeroshot import resolve_tasks
from bench.models import cache_dir, load_model
from bench.records import Record, cell_key, environment, now, record_path, write_record
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


@dataclass
class Cell:
    method: str
    ratio: float
    seed: int


class Events:
    """What the runner tells its display; the CLI overrides these with rich output."""

    def start(self, total_cells: int) -> None: ...
    def cell(self, cell: Cell, step: str) -> None: ...
    def done(self, cell: Cell, rec: Record, path: Path, reused: bool) -> None: ...
    def info(self, text: str) -> None: ...


def plan(cfg: RunConfig) -> list[Cell]:
    cells = [Cell(DENSE, 0.0, cfg.seeds[0])]
    cells += [Cell(m, r, s) for s in cfg.seeds for r in cfg.ratios for m in cfg.methods]
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

    loaded = load_model(cfg.model, cfg.device, cfg.dtype, cfg.cache)
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

    model_key = cell_key({"model": model_info | {"path": None}, "weights": _weights_stamp(loaded.path),
                          "dtype": loaded.dtype, "device": base_parts["device"]})
    events.info(f"model {loaded.name}: {loaded.source}; weights from {loaded.path} ({loaded.dtype} on {loaded.device}, "
                f"{dense_params:,} parameters, {adapter.family} adapter)")
    cells = plan(cfg)
    events.start(len(cells))
    records = []
    calibrations: dict[int, Calibration] = {}
    model = loaded.model
    for cell in cells:
        inst = instances.get(cell.method)
        knobs = inst.knob_dict() if inst else {}
        overrides = cfg.knobs.get(cell.method, {})
        key = cell_key(base_parts | {"method": cell.method, "knobs": knobs, "ratio": cell.ratio, "seed": cell.seed})
        rec = Record(model=model_info, method=cell.method, knobs=knobs, knob_overrides=overrides,
                     target_ratio=cell.ratio, seed=cell.seed, suite=cfg.suite.to_dict(), key=key,
                     environment=env, started=now())
        existing = _existing(cfg, rec)
        if existing is not None:
            records.append(existing)
            events.done(cell, existing, record_path(cfg.results_dir, existing), reused=True)
            continue
        if (cell.method, cell.ratio) in refused:
            rec.status, rec.error = "failed", f"refused: {refused[(cell.method, cell.ratio)]}"
            rec.finished = now()
            records.append(rec)
            events.done(cell, rec, write_record(cfg.results_dir, rec), reused=False)
            continue
        if model is None:
            model = load_model(cfg.model, cfg.device, cfg.dtype, cfg.cache).model
        try:
            reference = dense_reference(model, loaded.tokenizer, adapter, cfg.suite,  # model is dense here
                                        None if cfg.no_cache else cache_dir(cfg.cache), model_key)
            if inst is not None:
                if cell.seed not in calibrations or cfg.no_cache:
                    events.cell(cell, "calibration data")
                    stats = None if cfg.no_cache else cache_dir(cfg.cache) / "stats"
                    calibrations[cell.seed] = _calibration(loaded.tokenizer, cfg.suite, cell.seed, stats, model_key)
                calib = calibrations[cell.seed]
                _compress(model, inst, calib, solutions[(cell.method, cell.ratio)], rec, cfg,
                          lambda step, c=cell: events.cell(c, step))
            cell_adapter = get_adapter(model)
            rec.budget = vars(budget_report(dense_params, dense_linear, cell_adapter, cell.ratio, cfg.tolerance,
                                            rec.solution.get("predicted_params")))
            rec.metrics = evaluate(model, loaded.tokenizer, cell_adapter, cfg.suite,
                                   progress=lambda step, c=cell: events.cell(c, step), seed=1234, reference=reference)
            if not is_finite_result(rec.metrics):
                rec.status, rec.error = "failed", f"perplexity is {rec.metrics.get('perplexity')}: the model collapsed"
            events.cell(cell, "saving")
            _save(model, loaded.tokenizer, rec, cfg)
        except UserError as err:
            rec.status, rec.error = "failed", str(err)
        except Exception as err:  # one failing cell must not stop the others
            rec.status, rec.error = "failed", f"{type(err).__name__}: {err}"
            rec.details["traceback"] = traceback.format_exc(limit=8)
        finally:
            model = None  # the next cell starts from a fresh dense model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        rec.finished = now()
        docs.write_beside(cfg.results_dir, rec)  # before the record: a complete record has its side file
        path = write_record(cfg.results_dir, rec)
        records.append(rec)
        events.done(cell, rec, path, reused=False)
    return records


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
    import json

    path = record_path(cfg.results_dir, rec)
    try:
        old = Record.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return old if old.key == rec.key and old.status == "ok" else None


def _calibration(tokenizer, suite: Suite, seed: int, stats_dir: Path | None, model_key: str) -> Calibration:
    tokens = data.calibration_batch(tokenizer, suite.calib_samples, suite.calib_seq_len, seed)
    return Calibration(tokens=tokens, seed=seed, batch_size=max(1, suite.eval_batch_size // 2),
                       source="packaged Wikipedia (exllamav2 wiki.utf8), calibration documents",
                       cache_dir=stats_dir, model_key=model_key)


def _weights_stamp(path: str | None) -> list:
    """Names, sizes and modification times of a model folder's weight files: changed weights, new key."""
    if not path or not Path(path).is_dir():
        return []
    files = sorted(p for p in Path(path).iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    return [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files]


def _compress(model, inst: Method, calib: Calibration, solution: Solution, rec: Record, cfg: RunConfig,
              step: Callable[[str], None]) -> None:
    step(f"compressing ({inst.name})")
    adapter = get_adapter(model)
    rec.solution = {"knobs": solution.knobs, "predicted_params": solution.predicted_params, "notes": solution.notes}
    device = next(model.parameters()).device
    calib.memo["log"] = []
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        info = inst.compress(model, adapter, calib, solution)
        seconds = time.perf_counter() - t0
    rec.cost = {"compress_seconds": seconds, "compress_peak_memory_bytes": mem.peak_bytes,
                "compress_peak_memory_source": mem.source, "train_tokens": info.train_tokens,
                "calibration_tokens": calib.n_tokens,
                "statistics": list(calib.memo.get("log", []))}  # computed, or reused from memory or disk
    rec.calibration = calib.describe()
    rec.details.update(info.details)
    rec.details["structure_ops"] = len(structure.structure_log(model))


def _save(model, tokenizer, rec: Record, cfg: RunConfig) -> None:
    folder = cache_dir(cfg.cache) / "checkpoints" / record_path("", rec).with_suffix("")
    checkpoint.save(model, tokenizer, folder, extra={"record_key": rec.key, "method": rec.method,
                                                      "target_ratio": rec.target_ratio})
    rec.metrics["checkpoint_bytes"] = (folder / checkpoint.WEIGHTS).stat().st_size
    rec.metrics["checkpoint_dir_bytes"] = dir_size(folder)
    rec.checkpoint = str(folder) if cfg.save_checkpoints else None
    if not cfg.save_checkpoints:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
