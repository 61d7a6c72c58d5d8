"""How sure the accuracies in the records are, and ``bench compare A B``: two methods or two records side by side.

lm-eval gives each task's standard error over its documents, sqrt(p(1 - p) / (n - 1)); the unweighted mean over
k tasks has SE = sqrt(sum SE_i^2) / k (shown as information). Verdicts are paired (``bench.stats``): both cells
answered the same documents, so B - A is judged by the SE of the per-document differences and McNemar's test on
the documents that flip, read from the records' side files. Perplexity, KL to the dense model and top-1 agreement
are paired over the perplexity windows both records scored (each record keeps every window's mean NLL, KL and
agreement): the SE of the per-window differences, judged against Student's t with (windows - 1) degrees of
freedom, since a suite has few windows (16 in ``quick``). Perplexity is judged on the mean NLL, its SE shown in
perplexity units (delta method). Latency and size have no SE here, only their spread over seeds.

``without`` leaves tasks out of both sides (their rows, mean_acc, its paired SE and the above-a-guess note), for a
verdict without a task that measures something else on a given model (BoolQ's yes-bias on a small one).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import stats
from bench.errors import UserError
from bench.evaluate import docs as docs_io
from bench.evaluate.efficiency import latency_doubt, other_hardware
from bench.evaluate.zeroshot import mean_accuracy
from bench.records import Record, latest, load_records, method_tag, read_record

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


def verdict(diff: float | None, se: float | None, higher_is_better: bool = True, crit: float = Z) -> str:
    """B - A within ``crit`` SEs of 0 is within noise; else which side is better."""
    if diff is None or se is None:
        return ""
    if abs(diff) <= crit * se:
        return "within noise"
    return "B better" if (diff > 0) == higher_is_better else "A better"


def label(r: Record) -> str:
    """A method run with overridden knobs is a method of its own, e.g. ``basis (group_size=3)``."""
    if not r.knob_overrides:
        return r.method
    return f"{r.method} ({', '.join(f'{k}={v}' for k, v in sorted(r.knob_overrides.items()))})"


def label_and_tag(r: Record) -> str:
    """The label, preceded by the short tag its record files carry when the two differ (a knob variant)."""
    return f"{method_tag(r)} = {label(r)}" if r.knob_overrides else label(r)


# --- compare ----------------------------------------------------------------------------------------------


@dataclass
class Metric:
    name: str
    value: Callable[[Record], float | None]
    paired: Callable[[dict, dict], stats.Paired | None] | None = None  # B - A from two cells' side files
    higher_is_better: bool = True
    digits: int = 3
    scale: float = 1.0
    windows: Callable[[Record], list | None] | None = None  # the metric window by window, paired over windows
    log_scale: bool = False  # ``windows`` holds the log of the metric (perplexity: mean NLL per window)
    hardware_bound: bool = False  # a speed: A and B are shown but not compared when they ran on other hardware


def window_values(r: Record, where: str, key: str) -> list[float] | None:
    """A record's per-window list ``metrics[where][key]`` (None for records written before windows were kept)."""
    values = (r.metrics.get(where) or {}).get(key)
    if not isinstance(values, list) or len(values) < 2 or not all(_number(v) is not None for v in values):
        return None
    return [float(v) for v in values]


def recorded_windows_sha(r: Record) -> str | None:
    """The hash of the perplexity windows ``r`` was scored on, where its closeness section records it."""
    return ((r.metrics.get("closeness") or {}).get("reference") or {}).get("windows_sha")


def paired_windows(metric: Metric, a: list[Record], b: list[Record]) -> tuple[stats.Paired, int] | None:
    """B - A of ``metric``'s per-window values pooled over the record pairs, with the fewest windows of a pair;
    None unless every pair scored the same windows (same count, same token hash where both record it)."""
    per_pair, fewest = [], None
    for x, y in zip(a, b, strict=True):
        wa, wb = metric.windows(x), metric.windows(y)
        if wa is None or wb is None or len(wa) != len(wb):
            return None
        sa, sb = recorded_windows_sha(x), recorded_windows_sha(y)
        if sa and sb and sa != sb:
            return None
        per_pair.append(stats.paired_diff(wa, wb))
        fewest = len(wa) if fewest is None else min(fewest, len(wa))
    return stats.over_seeds(per_pair), fewest


#: perplexity, paired over the windows on their mean NLL (the leaderboard's ppl marks use it too)
PERPLEXITY = Metric("perplexity", lambda r: _number(r.metrics.get("perplexity")), higher_is_better=False, digits=2,
                    log_scale=True, windows=lambda r: window_values(r, "perplexity_detail", "window_nll"))


@dataclass
class Row:
    """One metric of a comparison; A and B are means over the paired seeds."""

    metric: str
    a: float | None
    b: float | None
    diff: float | None
    se: float | None  # paired SE of B - A, where the metric has one and the side files are there
    seed_sd: float | None  # sd over seeds of B - A, where there are several seeds
    verdict: str
    digits: int = 3
    p_mcnemar: float | None = None  # exact McNemar p-value of the documents that flip
    windows: int | None = None  # paired over this many perplexity windows (per record pair)


def _metrics(a: list[Record], b: list[Record]) -> list[Metric]:
    tasks = [t for t in (a[0].metrics.get("tasks") or {}) if t in (b[0].metrics.get("tasks") or {})]

    def task(name: str) -> Metric:
        def of(r: Record) -> dict:
            return (r.metrics.get("tasks") or {}).get(name) or {}

        return Metric(f"{name} ({a[0].metrics['tasks'][name].get('main') or 'acc'})",
                      lambda r: _number(main_acc(of(r))), lambda x, y: stats.paired_tasks(x, y).get(name))

    def m(key: str) -> Callable[[Record], float | None]:
        return lambda r: _number(r.metrics.get(key))

    def timed(key: str) -> Callable[[Record], float | None]:  # a latency in doubt is not compared (the leaderboard's rule)
        return lambda r: None if latency_doubt(r.metrics.get("latency_detail")) else _number(r.metrics.get(key))

    return [*map(task, tasks),
            Metric("mean_acc", m("mean_acc"), stats.paired_mean),
            PERPLEXITY,
            Metric("KL to dense", lambda r: _number((r.metrics.get("closeness") or {}).get("kl_mean")),
                   higher_is_better=False, digits=4, windows=lambda r: window_values(r, "closeness", "window_kl")),
            Metric("top-1 agreement", lambda r: _number((r.metrics.get("closeness") or {}).get("top1_agreement")),
                   digits=4, windows=lambda r: window_values(r, "closeness", "window_top1")),
            Metric("achieved ratio (%)", lambda r: _number(r.budget.get("achieved_ratio")), digits=1, scale=100),
            Metric("params (M)", m("params"), higher_is_better=False, digits=2, scale=1e-6),
            Metric("prefill (ms)", timed("prefill_ms"), higher_is_better=False, digits=1, hardware_bound=True),
            Metric("decode (tokens/s)", timed("decode_tokens_per_s"), digits=1, hardware_bound=True)]


def _elsewhere(a: list[Record], b: list[Record]) -> str | None:
    """Why A's and B's speeds cannot be compared (a pair of records ran on different hardware), or None."""
    return next((why for x, y in zip(a, b, strict=True) if (why := other_hardware(y.environment, x.environment, "A"))),
                None)


def _paired(metric: Metric, docs_a: list[dict | None], docs_b: list[dict | None]) -> stats.Paired | None:
    """The metric's paired B - A pooled over the record pairs; None without side files for every pair."""
    if metric.paired is None or any(d is None for d in (*docs_a, *docs_b)):
        return None
    per_pair = [metric.paired(x, y) for x, y in zip(docs_a, docs_b, strict=True)]
    return None if any(p is None for p in per_pair) else stats.over_seeds(per_pair)


def rows(a: list[Record], b: list[Record], docs_a: list[dict | None] | None = None,
         docs_b: list[dict | None] | None = None) -> list[Row]:
    """Metric by metric, A against B over paired records (``a[i]`` and ``b[i]`` share a ratio and seed);
    ``docs_a[i]`` holds ``a[i]``'s per-document outcomes, which the accuracy verdicts are paired over."""
    docs_a, docs_b = docs_a or [None] * len(a), docs_b or [None] * len(b)
    out, elsewhere = [], _elsewhere(a, b)
    for metric in _metrics(a, b):
        av, bv = [metric.value(r) for r in a], [metric.value(r) for r in b]
        if any(v is None for v in av + bv) or (metric.hardware_bound and elsewhere):
            known = [v for v in av if v is not None], [v for v in bv if v is not None]
            mean = [metric.scale * statistics.fmean(k) if k else None for k in known]
            out.append(Row(metric.name, *mean, None, None, None, "", metric.digits))
            continue
        diffs = [metric.scale * (y - x) for x, y in zip(av, bv, strict=True)]
        diff = statistics.fmean(diffs)
        mean_a, mean_b = metric.scale * statistics.fmean(av), metric.scale * statistics.fmean(bv)
        seed_sd = statistics.stdev(diffs) if len(diffs) > 1 else None
        if metric.windows is not None:
            out.append(_window_row(metric, a, b, mean_a, mean_b, diff, seed_sd))
            continue
        p = _paired(metric, docs_a, docs_b)
        out.append(Row(metric.name, mean_a, mean_b, diff, p.se if p else None, seed_sd,
                       verdict(diff, p.se if p else None, metric.higher_is_better), metric.digits,
                       p.p_mcnemar if p else None))
    return out


def t_critical(df: int) -> float:
    """Two-sided 95 % critical value of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(1 - (1 - 0.95) / 2, df))


@dataclass(frozen=True)
class WindowTest:
    se: float  # SE of B - A in the metric's units
    verdict: str  # ``verdict``'s words, judged against Student's t with windows - 1 degrees of freedom
    windows: int


def window_test(metric: Metric, a: list[Record], b: list[Record], mean_a: float, mean_b: float) -> WindowTest | None:
    """B - A of a metric paired over the perplexity windows (``a[i]`` and ``b[i]`` a pair of records, their
    seeds pooled as a second level); None unless every pair scored the same windows. A log-scale metric
    (perplexity) is judged on the per-window mean NLL and its SE shown in the metric's units by the delta method:
    SE(ppl_B - ppl_A) ~ sqrt(ppl_A ppl_B) SE(nll_B - nll_A)."""
    found = paired_windows(metric, a, b)
    if found is None:
        return None
    p, n = found
    test = p.diff if metric.log_scale else metric.scale * p.diff
    se = metric.scale * p.se
    shown = math.sqrt(max(mean_a, 0.0) * max(mean_b, 0.0)) * se if metric.log_scale else se
    return WindowTest(shown, verdict(test, se, metric.higher_is_better, t_critical(n - 1)), n)


def _window_row(metric: Metric, a: list[Record], b: list[Record], mean_a: float, mean_b: float, diff: float,
                seed_sd: float | None) -> Row:
    found = window_test(metric, a, b, mean_a, mean_b)
    if found is None:
        return Row(metric.name, mean_a, mean_b, diff, None, seed_sd, "", metric.digits)
    return Row(metric.name, mean_a, mean_b, diff, found.se, seed_sd, found.verdict, metric.digits,
               windows=found.windows)


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
    return (f"{n} documents per task. SE(B-A) is paired over the documents both answered (seeds pooled as a second"
            f" level); verdict: |B-A| <= {Z} SE is within noise; McNemar p: exact test on the documents that flip.")


def _chance_note(docs_a: list[dict | None], docs_b: list[dict | None]) -> str:
    """How far each side's mean accuracy is above a uniform guess on the same documents
    (``stats.above_chance_over_seeds``); empty unless every record's side file has per-choice log-likelihoods."""
    sides = []
    for name, found in (("A", docs_a), ("B", docs_b)):
        p = stats.above_chance_over_seeds(found)
        if p is None:
            return ""
        sides.append(f"{name} {p.diff:+.3f} ± {p.se:.3f}{' (cannot be told from guessing)' if p.within_noise() else ''}")
    return f"Mean accuracy above a uniform guess on the same documents (1 / choices): {', '.join(sides)}."


def _windows_note(rows_: list[Row]) -> str:
    paired = [r for r in rows_ if r.windows]
    if not paired:
        return ("Perplexity, KL and top-1 agreement have no SE: a record has no per-window figures (written before "
                "they were kept; `bench run ... --rescore` adds them from the cell's checkpoint).")
    n = min(r.windows for r in paired)
    return (f"Perplexity, KL and top-1 agreement: SE paired over the {n} perplexity windows, within noise when |B-A| <="
            f" t({n - 1}) = {t_critical(n - 1):.2f} SE (perplexity judged on the mean NLL). Size and speed have no SE.")


def leave_out(records: list[Record], docs: list[dict | None], without: list[str]) -> tuple[list[Record], list]:
    """``records`` and their side files' ``docs`` with the tasks ``without`` removed and mean_acc recomputed over
    the rest (the records on disk are not touched)."""
    out = []
    for r in records:
        kept = {t: v for t, v in (r.metrics.get("tasks") or {}).items() if t not in without}
        metrics = {**r.metrics, "tasks": kept, "mean_acc": mean_accuracy(kept) if kept else None}
        out.append(dataclasses.replace(r, metrics=metrics))
    return out, [None if d is None else {t: v for t, v in d.items() if t not in without} for d in docs]


def _check_without(records: list[Record], without: list[str]) -> None:
    have = sorted({t for r in records for t in (r.metrics.get("tasks") or {})})
    unknown = [t for t in without if t not in have]
    if unknown:
        raise UserError(f"--without {','.join(unknown)}: no such task in these records; they have "
                        f"{', '.join(have) or 'no zero-shot tasks'}")
    if not set(have) - set(without):
        raise UserError(f"--without {','.join(without)} leaves no task to compare; name fewer tasks")


def _comparison(title: str, a: list[Record], b: list[Record], docs_a: list[dict | None],
                docs_b: list[dict | None], without: list[str] | None = None) -> Comparison:
    if without:
        _check_without(a + b, without)
        (a, docs_a), (b, docs_b) = leave_out(a, docs_a, without), leave_out(b, docs_b, without)
    notes = [_docs_note(a + b), _chance_note(docs_a, docs_b)]
    if without:
        notes.append(f"Left out by --without: {', '.join(without)} (mean_acc is over the other tasks).")
    if any(d is None for d in (*docs_a, *docs_b)):
        notes.append("a record has no per-document side file (.docs.json.gz): no paired SE or verdict for accuracy")
    ta, tb = set(a[0].metrics.get("tasks") or {}), set(b[0].metrics.get("tasks") or {})
    if ta != tb:
        notes.append(f"different tasks ({', '.join(sorted(ta ^ tb))} in one only): mean_acc averages different tasks")
    found = rows(a, b, docs_a, docs_b)
    notes.append(_windows_note(found))
    if elsewhere := _elsewhere(a, b):
        notes.append(f"Prefill and decode not compared: B {elsewhere}.")
    return Comparison(title, found, [n for n in notes if n])


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


def compare_files(a: str, b: str, without: list[str] | None = None) -> list[Comparison]:
    ra, rb = _load_file(a), _load_file(b)
    da, db = (docs_io.read(docs_io.docs_path(Path(p)), r.key) for p, r in ((a, ra), (b, rb)))
    return [_comparison(f"A = {_describe(ra)}  vs  B = {_describe(rb)}", [ra], [rb], [da], [db], without)]


def compare_methods(results_dir: str, a: str, b: str, model: str | None = None, suite: str | None = None,
                    ratios: list[float] | None = None, without: list[str] | None = None) -> list[Comparison]:
    """One comparison per ratio both methods have in one (model, suite), over the seeds both have there. The
    dense model (ratio 0) is paired with every ratio of the other method."""
    if not Path(results_dir).is_dir():
        raise UserError(f"no results folder {results_dir!r}; run `bench run` first or pass --results-dir")
    records, _ = load_records(results_dir)
    records, _ = latest(records)
    records = [r for r in records if (model is None or r.model["name"] == model)
               and (suite is None or r.suite["name"] == suite)]
    where = "".join(f" {flag} {v}" for flag, v in (("--model", model), ("--suite", suite)) if v)
    by = {}
    for name in (a, b):
        mine = [r for r in records if name in (label(r), method_tag(r))]
        if not mine:
            names = sorted({label_and_tag(r) for r in records})
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
        title = (f"A = {_named(a, by[a])}, B = {_named(b, by[b])} — {m}, suite {s}, ratio {100 * target:.1f}%, "
                 f"seed{'s' * (len(keys) > 1)} {seeds}")
        ra, rb = [cells[a][k] for k in keys], [cells[b][k] for k in keys]
        out.append(_comparison(title, ra, rb, docs_io.read_each(results_dir, ra), docs_io.read_each(results_dir, rb),
                               without))
    return out


def _named(name: str, records: list[Record]) -> str:
    """The name as given, with the full label when it was given as its record files' short tag."""
    return name if name == label(records[0]) else label_and_tag(records[0])


def _fmt(value: float | None, digits: int, sign: bool = False) -> str:
    return "-" if value is None else f"{value:{'+' if sign else ''}.{digits}f}"


def table(c: Comparison):
    """A rich table of one comparison; the seed-sd column appears only when several seeds are paired."""
    from rich.table import Table

    seeds = any(r.seed_sd is not None for r in c.rows)
    t = Table(title=c.title, caption=" ".join(c.notes) or None, caption_justify="left")
    for col in ("metric", "A", "B", "B-A", "SE(B-A)", *(["seed sd(B-A)"] * seeds), "McNemar p", "verdict"):
        t.add_column(col, justify="left" if col in ("metric", "verdict") else "right")
    for r in c.rows:
        style = {"A better": "red", "B better": "green"}.get(r.verdict)
        t.add_row(r.metric, _fmt(r.a, r.digits), _fmt(r.b, r.digits), _fmt(r.diff, r.digits, sign=True),
                  _fmt(r.se, 3), *([_fmt(r.seed_sd, r.digits)] * seeds), _fmt(r.p_mcnemar, 3), r.verdict, style=style)
    return t


def compare(a: str, b: str, results_dir: str = "results", model: str | None = None, suite: str | None = None,
            ratios: list[float] | None = None, without: list[str] | None = None) -> list[Comparison]:
    """Two record files (both paths to .json files) or two method names looked up in ``results_dir``; ``without``:
    tasks left out of both (see the module's docstring)."""
    files = [x.endswith(".json") or Path(x).is_file() for x in (a, b)]
    if all(files):
        return compare_files(a, b, without)
    if any(files):
        raise UserError(f"give two method names or two record files, not one of each ({a!r}, {b!r})")
    return compare_methods(results_dir, a, b, model, suite, ratios, without)
