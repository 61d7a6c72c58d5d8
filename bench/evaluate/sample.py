"""Which documents of a zero-shot task are scored: a seeded random sample, stratified by the gold label.

lm-eval's ``--limit N`` takes the first N documents, which can be far from the task's label balance (the
first 40 BoolQ documents are 31 "yes"). A stratified sample keeps each label's share; it depends only on
the task's data, the size and the seed, so every cell of a suite answers the same documents.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Hashable
from typing import Any

import numpy as np

SAMPLE_VERSION = 1
METHOD = "stratified by gold label, proportional allocation (largest remainder), seeded numpy PCG64"


def gold_label(task: Any, doc: dict) -> Hashable | None:
    """The gold answer lm-eval scores a multiple-choice document against (an index or a string), or None."""
    try:
        gold = task.doc_to_text(doc) if getattr(task, "multiple_input", False) else task.doc_to_target(doc)
    except Exception:  # a task without a readable target is sampled without strata
        return None
    return gold if isinstance(gold, int | str) else None


def allocate(counts: dict[Hashable, int], n: int) -> dict[Hashable, int]:
    """Documents per label: proportional to ``counts``, rounded by largest remainder so they sum to ``n``."""
    total = sum(counts.values())
    exact = {k: n * c / total for k, c in counts.items()}
    out = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: (out[k] - exact[k], str(k)))[: n - sum(out.values())]:
        out[k] += 1
    return out


def stratified(labels: list[Hashable | None], n: int, seed: int) -> list[int]:
    """Sorted indices of a seeded sample of ``n`` of ``labels``, each label keeping its share (all when n >= len)."""
    if n >= len(labels):
        return list(range(len(labels)))
    by_label: dict[Hashable, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_label[label].append(i)
    rng = np.random.default_rng(seed)
    picked: list[int] = []
    for label, k in sorted(allocate({k: len(v) for k, v in by_label.items()}, n).items(), key=lambda kv: str(kv[0])):
        picked += rng.choice(by_label[label], size=k, replace=False).tolist()
    return sorted(picked)


def task_seed(seed: int, task: str) -> int:
    """A per-task seed, so adding a task never changes another task's sample."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{task}".encode()).digest()[:8], "little")


def draw(task_objects: dict[str, Any], n: int | None, seed: int) -> tuple[dict[str, list[int]], dict]:
    """Document ids per lm-eval task name, and the sample's definition for the record."""
    ids, described = {}, {}
    for name, task in sorted(task_objects.items()):
        docs = task.eval_docs
        labels = [gold_label(task, doc) for doc in docs]
        strata = None not in labels
        size = len(docs) if n is None else min(n, len(docs))
        ids[name] = stratified(labels if strata else [0] * len(labels), size, task_seed(seed, name))
        chosen = [labels[i] for i in ids[name]]
        described[name] = {
            "population": len(docs), "n": len(ids[name]), "stratified": strata,
            "labels": {str(k): chosen.count(k) for k in sorted(set(chosen), key=str)} if strata else None,
            "ids_sha256": hashlib.sha256(",".join(map(str, ids[name])).encode()).hexdigest()[:16],
        }
    return ids, {"version": SAMPLE_VERSION, "method": METHOD, "seed": seed, "per_task": n, "tasks": described}
