"""Paired statistics: every comparison of two cells is made on the documents both answered.

Two cells of one model and suite score the same documents, so their errors are strongly correlated; the
difference of their accuracies has the standard error of the per-document differences d_i = b_i - a_i,
sd(d) / sqrt(n), far smaller than the unpaired sqrt(SE_A^2 + SE_B^2) when both models get the same documents
right. McNemar's exact test asks whether the documents that flip (right in one cell only) lean one way.
Seeds are a second level: the paired difference is computed per seed and its spread over seeds is added
to the within-seed SE.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z = 1.96  # two-sided 95 %


@dataclass(frozen=True)
class Paired:
    """B - A over paired observations: the mean difference, its SE, the count and the discordant pairs."""

    diff: float
    se: float
    n: int
    a_only: int = 0  # documents A gets right and B wrong
    b_only: int = 0  # documents B gets right and A wrong

    @property
    def p_mcnemar(self) -> float:
        return mcnemar(self.a_only, self.b_only)

    def within_noise(self, z: float = Z) -> bool:
        return abs(self.diff) <= z * self.se


def paired_diff(a: Sequence[float], b: Sequence[float]) -> Paired:
    """Mean of d_i = b_i - a_i and its standard error sd(d) / sqrt(n) (sample sd, n - 1)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired_diff needs two equally long sequences of at least 2, got {len(a)} and {len(b)}")
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    a_only = int(np.sum(d < 0)) if _binary(a, b) else 0
    b_only = int(np.sum(d > 0)) if _binary(a, b) else 0
    return Paired(float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))), len(d), a_only, b_only)


def _binary(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x in (0, 1) for x in (*a, *b))


def mcnemar(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar p-value: 2 P(X <= min) for X ~ Binomial(a_only + b_only, 1/2), at most 1."""
    n, k = a_only + b_only, min(a_only, b_only)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def bootstrap_ci(a: Sequence[float], b: Sequence[float], iters: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of mean(b - a) over documents resampled with replacement (pairs kept together)."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(iters, len(d)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def mean_over_tasks(per_task: Sequence[Paired]) -> Paired:
    """The paired difference of the unweighted mean over tasks: tasks have disjoint documents, so
    SE = sqrt(sum SE_t^2) / k."""
    k = len(per_task)
    return Paired(sum(p.diff for p in per_task) / k, math.sqrt(sum(p.se**2 for p in per_task)) / k,
                  sum(p.n for p in per_task), sum(p.a_only for p in per_task), sum(p.b_only for p in per_task))


def over_seeds(per_seed: Sequence[Paired]) -> Paired:
    """Seeds as a second level: the mean difference over seeds, with SE^2 = mean within-seed SE^2 (the same
    documents, so it does not shrink with seeds) + var over seeds / seeds (what the calibration seed moves)."""
    s = len(per_seed)
    within = sum(p.se**2 for p in per_seed) / s
    between = statistics.variance([p.diff for p in per_seed]) / s if s > 1 else 0.0
    return Paired(statistics.fmean(p.diff for p in per_seed), math.sqrt(within + between),
                  sum(p.n for p in per_seed), sum(p.a_only for p in per_seed), sum(p.b_only for p in per_seed))


def _aligned(a: dict, b: dict, field: str = "correct") -> tuple[list, list]:
    """The values of ``field`` for the doc ids both side-file tasks hold, in doc id order."""
    ia = dict(zip(a["doc_id"], a[field], strict=True))
    ib = dict(zip(b["doc_id"], b[field], strict=True))
    shared = sorted(set(ia) & set(ib))
    return [ia[i] for i in shared], [ib[i] for i in shared]


def paired_tasks(a: dict[str, dict], b: dict[str, dict]) -> dict[str, Paired]:
    """Per-task paired accuracy differences B - A from two cells' per-document outcomes (side files)."""
    out = {}
    for task in sorted(set(a) & set(b)):
        xa, xb = _aligned(a[task], b[task])
        if len(xa) >= 2:
            out[task] = paired_diff(xa, xb)
    return out


def paired_mean(a: dict[str, dict], b: dict[str, dict]) -> Paired | None:
    """Paired difference of the mean accuracy over the tasks both cells answered; None without shared docs."""
    tasks = paired_tasks(a, b)
    return mean_over_tasks(list(tasks.values())) if tasks else None


def chance(docs: dict[str, dict]) -> dict[str, float]:
    """Per task, the accuracy a uniform guess expects on the documents scored: the mean over them of 1 / number of
    choices (from each document's per-choice log-likelihoods)."""
    return {task: statistics.fmean(1 / len(ll) for ll in d["ll"]) for task, d in docs.items() if d.get("ll")}


def above_chance(docs: dict[str, dict]) -> Paired | None:
    """Mean accuracy minus what a uniform guess expects on the same documents, with its SE: per task the
    per-document differences correct_i - 1 / choices_i (``paired_diff`` against the guess), then the unweighted
    mean over tasks as ``mean_over_tasks``; None without per-choice log-likelihoods."""
    per_task = [paired_diff([1 / len(ll) for ll in d["ll"]], d["correct"])
                for d in docs.values() if d.get("ll") and len(d["ll"]) >= 2]
    return mean_over_tasks(per_task) if per_task else None


def above_chance_over_seeds(per_seed: Sequence[dict[str, dict] | None]) -> Paired | None:
    """``above_chance`` of each seed's side file, seeds as ``over_seeds``; None when a seed lacks one or its
    per-choice log-likelihoods."""
    found = [above_chance(d) if d is not None else None for d in per_seed]
    return None if not found or None in found else over_seeds(found)


def flip_rate(ref: dict[str, dict], other: dict[str, dict]) -> float | None:
    """Share of documents (all tasks pooled) whose correctness differs between two cells, either way."""
    split = flip_split(ref, other)
    return None if split is None else split[0] + split[1]


def flip_split(ref: dict[str, dict], other: dict[str, dict]) -> tuple[float, float] | None:
    """(lost, gained): shares of the documents both cells answered (all tasks pooled) that ``ref`` got right and
    ``other`` wrong, and the reverse. Their sum is the flip rate and gained - lost the pooled accuracy difference,
    so a cell can keep the reference's accuracy while losing many of its right answers, if it gains as many by
    chance; None without shared documents."""
    lost = gained = total = 0
    for task in set(ref) & set(other):
        xa, xb = _aligned(ref[task], other[task])
        lost += sum(bool(x) and not y for x, y in zip(xa, xb, strict=True))
        gained += sum(bool(y) and not x for x, y in zip(xa, xb, strict=True))
        total += len(xa)
    return (lost / total, gained / total) if total else None
