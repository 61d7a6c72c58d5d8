"""How sure the accuracies in the records are, and ``bench compare A B``: two methods or two records side by side.

lm-eval gives each task's standard error over its documents, sqrt(p(1 - p) / (n - 1)). The unweighted mean over
k tasks, scored on disjoint documents, has SE = sqrt(sum SE_i^2) / k. Two results are within noise when
|B - A| <= 1.96 * sqrt(SE_A^2 + SE_B^2); every method sees the same documents, so this unpaired test is
conservative. Perplexity records hold only the total NLL and token count, so perplexity has no SE here;
latency and size have none either, only their spread over seeds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.errors import UserError
from bench.records import Record, latest, load_records, read_record

Z = 1.96  # two-sided 95 %
DENSE = "dense"


def _number(value) -> float | None:
    """``value`` as a float, or None when it is missing or not finite (NaN from pandas, 'N/A' from lm-eval)."""
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def main_acc(task: dict) -> float | None:
    """The task's headline accuracy: acc_norm where lm-eval reports it, else acc; None for a task without one."""
    main = task.get("main", "acc")
    return task.get(main) if main else None


def main_se(task: dict) -> float | None:
    """The standard error lm-eval reports for the headline accuracy; None when absent or not finite."""
    main = task.get("main", "acc")
    return _number(task.get(f"{main}_stderr")) if main else None


def mean_acc_se(tasks: dict[str, dict]) -> float | None:
    """SE of the unweighted mean of the tasks' headline accuracies: sqrt(sum SE_i^2) / k, over the tasks that
    report an accuracy (those ``mean_acc`` averages); None if any of them lacks its SE."""
    ses = [main_se(t) for t in tasks.values() if t.get("main") is not None]
    if not ses or any(se is None for se in ses):
        return None
    return math.sqrt(sum(se * se for se in ses)) / len(ses)


def pooled_se(ses: list[float | None]) -> float | None:
    """The SE of a cell averaged over seeds: the root mean square of its seeds' SEs. Every seed is scored on
    the same documents, so their sampling errors do not average out."""
    ses = [_number(se) for se in ses]
    if not ses or any(se is None for se in ses):
        return None
    return math.sqrt(sum(se * se for se in ses) / len(ses))


def combined_se(se_a: float | None, se_b: float | None) -> float | None:
    """SE of B - A for independent A and B; None unless both SEs are finite numbers."""
    se_a, se_b = _number(se_a), _number(se_b)
    return None if se_a is None or se_b is None else math.hypot(se_a, se_b)


def within_noise(a: float, se_a: float | None, b: float, se_b: float | None) -> bool | None:
    """|b - a| <= 1.96 * sqrt(se_a^2 + se_b^2); None when either SE is unknown."""
    se = combined_se(se_a, se_b)
    return None if se is None else abs(b - a) <= Z * se


def verdict(diff: float | None, se: float | None, higher_is_better: bool = True) -> str:
    if diff is None or se is None:
        return ""
    if abs(diff) <= Z * se:
        return "within noise"
    return "B better" if (diff > 0) == higher_is_better else "A better"


def label(r: Record) -> str:
    """A method run with overridden knobs is a method of its own, e.g. ``basis (group_size=3)``."""
    if not r.knob_overrides:
        return r.method
    return f"{r.method} ({', '.join(f'{k}={v}' for k, v in sorted(r.knob_overrides.items()))})"


# --- compare ----------------------------------------------------------------------------------------------


@dataclass
class Metric:
    name: str
    value: Callable[[Record], float | None]
    se: Callable[[Record], float | None] | None = None  # None: no SE for this metric
    higher_is_better: bool = True
    digits: int = 3
    scale: float = 1.0


@dataclass
class Row:
    """One metric of a comparison; A and B are means over the paired seeds."""

    metric: str
    a: float | None
    b: float | None
    diff: float | None
    se: float | None  # SE of B - A, where the metric has one
    seed_sd: float | None  # sd over seeds of B - A, where there are several seeds
    verdict: str
    digits: int = 3


def _metrics(a: list[Record], b: list[Record]) -> list[Metric]:
    tasks = [t for t in (a[0].metrics.get("tasks") or {}) if t in (b[0].metrics.get("tasks") or {})]

    def task(name: str) -> Metric:
        def of(r: Record) -> dict:
            return (r.metrics.get("tasks") or {}).get(name) or {}

        return Metric(f"{name} ({a[0].metrics['tasks'][name].get('main') or 'acc'})",
                      lambda r: _number(main_acc(of(r))), lambda r: main_se(of(r)))

    def m(key: str) -> Callable[[Record], float | None]:
        return lambda r: _number(r.metrics.get(key))

    return [*map(task, tasks),
            Metric("mean_acc", m("mean_acc"), lambda r: mean_acc_se(r.metrics.get("tasks") or {})),
            Metric("perplexity", m("perplexity"), higher_is_better=False, digits=2),
            Metric("achieved ratio (%)", lambda r: _number(r.budget.get("achieved_ratio")), digits=1, scale=100),
            Metric("params (M)", m("params"), higher_is_better=False, digits=2, scale=1e-6),
            Metric("prefill (ms)", m("prefill_ms"), higher_is_better=False, digits=1),
            Metric("decode (tokens/s)", m("decode_tokens_per_s"), digits=1)]


def rows(a: list[Record], b: list[Record]) -> list[Row]:
    """Metric by metric, A against B over paired records (``a[i]`` and ``b[i]`` share a ratio and seed)."""
    out = []
    for metric in _metrics(a, b):
        av, bv = [metric.value(r) for r in a], [metric.value(r) for r in b]
        if any(v is None for v in av + bv):
            known = [v for v in av if v is not None], [v for v in bv if v is not None]
            mean = [metric.scale * statistics.fmean(k) if k else None for k in known]
            out.append(Row(metric.name, *mean, None, None, None, "", metric.digits))
            continue
        diffs = [metric.scale * (y - x) for x, y in zip(av, bv, strict=True)]
        se = combined_se(pooled_se([metric.se(r) for r in a]), pooled_se([metric.se(r) for r in b])) \
            if metric.se else None
        diff = statistics.fmean(diffs)
        out.append(Row(metric.name, metric.scale * statistics.fmean(av), metric.scale * statistics.fmean(bv), diff,
                       se, statistics.stdev(diffs) if len(diffs) > 1 else None,
                       verdict(diff, se, metric.higher_is_better), metric.digits))
    return out


@dataclass
class Comparison:
    title: str
    rows: list[Row]
    notes: list[str]


def _docs_note(records: list[Record]) -> str:
    docs = sorted({t.get("n") for r in records for t in (r.metrics.get("tasks") or {}).values() if t.get("n")})
    if not docs:
        return ""
    n = f"{docs[0]}" if len(docs) == 1 else f"{docs[0]}-{docs[-1]}"
    return (f"{n} documents per task: one task's SE is up to 0.5/sqrt(n-1) = {0.5 / math.sqrt(max(docs[0] - 1, 1)):.2f}."
            f" Verdict: |B-A| <= {Z} SE is within noise. Perplexity, size and speed have no SE.")


def _comparison(title: str, a: list[Record], b: list[Record]) -> Comparison:
    notes = [_docs_note(a + b)]
    ta, tb = set(a[0].metrics.get("tasks") or {}), set(b[0].metrics.get("tasks") or {})
    if ta != tb:
        notes.append(f"different tasks ({', '.join(sorted(ta ^ tb))} in one only): mean_acc averages different tasks")
    return Comparison(title, rows(a, b), [n for n in notes if n])


def _load_file(path: str) -> Record:
    try:
        rec = read_record(path)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable slimbench record ({err}); give a .json file from results/") from None
    if rec.status != "ok":
        raise UserError(f"{path}: that cell failed ({rec.error}); compare records with status ok")
    return rec


def _describe(r: Record) -> str:
    return f"{label(r)} @ {100 * r.target_ratio:.1f}% seed {r.seed} ({r.model['name']}, suite {r.suite['name']})"


def compare_files(a: str, b: str) -> list[Comparison]:
    ra, rb = _load_file(a), _load_file(b)
    return [_comparison(f"A = {_describe(ra)}  vs  B = {_describe(rb)}", [ra], [rb])]


def compare_methods(results_dir: str, a: str, b: str, model: str | None = None, suite: str | None = None,
                    ratios: list[float] | None = None) -> list[Comparison]:
    """One comparison per ratio both methods have in one (model, suite), over the seeds both have there. The
    dense model (ratio 0) is paired with every ratio of the other method."""
    if not Path(results_dir).is_dir():
        raise UserError(f"no results folder {results_dir!r}; run `bench run` first or pass --results-dir")
    records, _ = load_records(results_dir)
    records, _ = latest(records)
    records = [r for r in records if (model is None or r.model["name"] == model)
               and (suite is None or r.suite["name"] == suite)]
    where = "".join(f" {flag} {v}" for flag, v in (("--model", model), ("--suite", suite)) if v)
    names = sorted({label(r) for r in records})
    by = {}
    for name in (a, b):
        mine = [r for r in records if label(r) == name]
        if not mine:
            raise UserError(f"no records of method {name!r} in {results_dir}{where}; methods there: "
                            f"{', '.join(names) or 'none'} (or give two record files)")
        ok = [r for r in mine if r.status == "ok"]
        if not ok:
            raise UserError(f"every record of {name!r} in {results_dir}{where} failed; rerun it with `bench run`")
        by[name] = ok
    groups = sorted({(r.model["name"], r.suite["name"]) for r in by[a]} & {(r.model["name"], r.suite["name"])
                                                                          for r in by[b]})
    if not groups:
        raise UserError(f"{a} and {b} have no (model, suite) in common in {results_dir}{where}")
    if len(groups) > 1:
        raise UserError(f"{a} and {b} both have records for {', '.join('/'.join(g) for g in groups)}; "
                        f"pick one with --model and --suite")
    (m, s), = groups
    cells = {name: {(r.target_ratio, r.seed): r for r in by[name] if (r.model["name"], r.suite["name"]) == (m, s)}
             for name in (a, b)}
    for name, other in ((a, b), (b, a)):  # the dense record stands at every ratio of the other method
        if name != other and all(t == 0.0 for t, _ in cells[name]) and any(t != 0.0 for t, _ in cells[other]):
            dense = cells[name][min(cells[name])]
            cells[name] = {(t, seed): dense for t, seed in cells[other]}
    shared = sorted(set(cells[a]) & set(cells[b]))
    if ratios:
        shared = [k for k in shared if any(math.isclose(k[0], x, abs_tol=1e-9) for x in ratios)]
    if not shared:
        have = {name: sorted({f"{100 * t:.1f}%" for t, _ in cells[name]}) for name in (a, b)}
        asked = f" at --ratio {','.join(map(str, ratios))}" if ratios else ""
        raise UserError(f"{a} and {b} share no ratio and seed{asked} in {m}/{s}: {a} has {', '.join(have[a])}, "
                        f"{b} has {', '.join(have[b])}; run the missing cells with `bench run`")
    out = []
    for target in sorted({t for t, _ in shared}):
        keys = [k for k in shared if k[0] == target]
        seeds = ",".join(str(seed) for _, seed in keys)
        title = f"A = {a}, B = {b} — {m}, suite {s}, ratio {100 * target:.1f}%, seed{'s' * (len(keys) > 1)} {seeds}"
        out.append(_comparison(title, [cells[a][k] for k in keys], [cells[b][k] for k in keys]))
    return out


def _fmt(value: float | None, digits: int, sign: bool = False) -> str:
    return "-" if value is None else f"{value:{'+' if sign else ''}.{digits}f}"


def table(c: Comparison):
    """A rich table of one comparison; the seed-sd column appears only when several seeds are paired."""
    from rich.table import Table

    seeds = any(r.seed_sd is not None for r in c.rows)
    t = Table(title=c.title, caption=" ".join(c.notes) or None, caption_justify="left")
    for col in ("metric", "A", "B", "B-A", "SE(B-A)", *(["seed sd(B-A)"] * seeds), "verdict"):
        t.add_column(col, justify="left" if col in ("metric", "verdict") else "right")
    for r in c.rows:
        style = {"A better": "red", "B better": "green"}.get(r.verdict)
        t.add_row(r.metric, _fmt(r.a, r.digits), _fmt(r.b, r.digits), _fmt(r.diff, r.digits, sign=True),
                  _fmt(r.se, 3), *([_fmt(r.seed_sd, r.digits)] * seeds), r.verdict, style=style)
    return t


def compare(a: str, b: str, results_dir: str = "results", model: str | None = None, suite: str | None = None,
            ratios: list[float] | None = None) -> list[Comparison]:
    """Two record files (both paths to .json files) or two method names looked up in ``results_dir``."""
    files = [x.endswith(".json") or Path(x).is_file() for x in (a, b)]
    if all(files):
        return compare_files(a, b)
    if any(files):
        raise UserError(f"give two method names or two record files, not one of each ({a!r}, {b!r})")
    return compare_methods(results_dir, a, b, model, suite, ratios)
