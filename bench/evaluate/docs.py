"""Per-document zero-shot outcomes, kept in a compact side file beside each record.

Two cells of one model and suite answer the same documents (``bench.evaluate.sample``), so comparing them
document by document (``bench.stats``) removes the between-document noise that dominates accuracy
differences. The side file is gzip'd JSON with one array per field and task; it is written before the
record, so a complete record always has its side file.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

DOCS_SCHEMA = "slimbench.docs"
DOCS_VERSION = 2  # 2: doc_id is the index in the task's eval docs (1: in the sample)
SUFFIX = ".docs.json.gz"


def docs_path(record_json: Path) -> Path:
    """The side file of the record at ``record_json``: same folder and stem, another suffix."""
    return record_json.with_name(record_json.stem + SUFFIX)


def from_samples(samples: list[dict], main: str | None, task: Any, ids: list[int]) -> dict[str, list]:
    """Doc ids (the documents' indices in the task's eval docs: lm-eval numbers the sampled subset 0..k-1,
    ``ids`` maps them back), gold index, chosen choice (by the main metric), correctness and per-choice
    log-likelihoods."""
    rows = sorted(samples, key=lambda s: s["doc_id"])
    out: dict[str, list] = {"doc_id": [], "gold": [], "chosen": [], "correct": [], "ll": []}
    for s in rows:
        lls = [float(r[0]) for r in s["filtered_resps"]]
        scores = np.array(lls)
        if main == "acc_norm":
            scores = scores / np.array([float(len(c)) for c in task.doc_to_choice(s["doc"])])
        out["doc_id"].append(int(ids[s["doc_id"]]))
        out["gold"].append(s["target"] if isinstance(s["target"], int) else None)
        out["chosen"].append(int(np.argmax(scores)))
        out["correct"].append(int(s.get(main or "acc", 0.0) == 1.0))
        out["ll"].append([round(x, 5) for x in lls])
    return out


def write(path: Path, key: str, tasks: dict[str, dict]) -> dict:
    """Write the side file atomically; returns what the record says about it (name, digest, counts)."""
    payload = json.dumps({"schema": DOCS_SCHEMA, "schema_version": DOCS_VERSION, "record_key": key,
                          "tasks": tasks}, separators=(",", ":")).encode()
    blob = gzip.compress(payload, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"file": path.name, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob),
            "docs": {t: len(v["doc_id"]) for t, v in tasks.items()}}


def read(path: Path, key: str | None = None) -> dict[str, dict] | None:
    """The per-task arrays of a side file; None when it is missing, unreadable or belongs to another record."""
    try:
        data = json.loads(gzip.decompress(path.read_bytes()))
    except (OSError, ValueError, EOFError):
        return None
    if data.get("schema") != DOCS_SCHEMA or data.get("schema_version") != DOCS_VERSION:
        return None
    if key is not None and data.get("record_key") != key:
        return None
    return data["tasks"]


def write_beside(results_dir: str | os.PathLike, rec: Any) -> None:
    """Move ``rec.metrics['zero_shot_docs']['tasks']`` into the record's side file, leaving its summary."""
    from bench.records import record_path

    docs = (rec.metrics or {}).get("zero_shot_docs")
    if not docs or "tasks" not in docs:
        return
    summary = write(docs_path(record_path(results_dir, rec)), rec.key, docs.pop("tasks"))
    docs.update(summary)


def read_beside(results_dir: str | os.PathLike, rec: Any) -> dict[str, dict] | None:
    """The per-document outcomes of a record read back from its side file, or None."""
    from bench.records import record_path

    return read(docs_path(record_path(results_dir, rec)), rec.key)


def read_each(results_dir: str | os.PathLike, records: list[Any]) -> list[dict[str, dict] | None]:
    """``read_beside`` for each of ``records``, in order (what the tables pair their documents from)."""
    return [read_beside(results_dir, r) for r in records]
