"""Leaderboards generated from the stored records only: Markdown, CSV, HTML with plots, a rich terminal table."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from bench import compare, curves, stats
from bench.calibration import reused_cost
from bench.compare import DENSE, label, main_acc, mean_acc_se
from bench.evaluate import docs as docs_io
from bench.evaluate.efficiency import LOAD_LIMIT, SPREAD_LIMIT, latency_doubt, other_hardware
from bench.records import Record, latest, load_records

TASK_SHORT = {"arc_easy": "ARC-e", "arc_challenge": "ARC-c", "piqa": "PIQA", "hellaswag": "HellaS",
              "winogrande": "WinoG", "boolq": "BoolQ", "openbookqa": "OBQA"}
#: a cell whose perplexity exceeds this multiple of the dense model's is marked collapsed, not ranked
COLLAPSE_FACTOR = 100.0
#: the reference row under the dense one: the accuracy a uniform guess expects on the same documents
CHANCE = "chance"
REFERENCE = "reference"  # its status: not a cell, never ranked


def flagged(status: str) -> bool:
    """Whether a row's status marks it in the tables (failed or collapsed; not ok, not the chance reference)."""
    return status not in ("ok", REFERENCE)


LABELS = {"mean_acc_se": "±", "seed_sd": "seed sd", "near_best": "≈best", "vs_best": "Δbest (paired)",
          "ppl_near_best": "ppl≈best", "ppl_vs_best": "Δppl best (paired)", "vs_chance": "Δchance (paired)",
          "kl": "KL", "kl_p99": "KL p99", "top1": "top-1 agr", "flip": "flip", "lost": "lost"}  # column headers in the tables


def frame(records: list[Record], docs: list[dict | None] | None = None) -> pd.DataFrame:
    """One row per record, with the dense row of the same model and suite as the accuracy reference.

    ``docs[i]`` holds record i's per-document outcomes (its side file, ``bench.evaluate.docs``): the ≈best marks
    and the flip rate are paired over those documents; without them a cell gets no mark.
    """
    docs = docs if docs is not None else [None] * len(records)
    dense, with_docs = {}, {}  # per model and suite: the last dense record; the first one with a side file
    for i, r in enumerate(records):
        if r.method == DENSE and r.status == "ok":
            dense[(r.model["name"], r.suite["name"])] = i
            if docs[i] is not None:
                with_docs.setdefault((r.model["name"], r.suite["name"]), i)
    rows = []
    for i, r in enumerate(records):
        m, b = r.metrics, r.budget
        ref_i = dense.get((r.model["name"], r.suite["name"]))
        ref = records[ref_i] if ref_i is not None else None
        mean_acc = m.get("mean_acc")
        ref_acc = ref.metrics.get("mean_acc") if ref else None
        close = m.get("closeness") or {}
        elsewhere = other_hardware(r.environment, ref.environment) if ref else None
        doubt = "; ".join(x for x in (latency_doubt(m.get("latency_detail")), elsewhere) if x) or None
        row = {
            "model": r.model["name"], "suite": r.suite["name"], "method": label(r), "seed": r.seed,
            "target": r.target_ratio, "achieved": b.get("achieved_ratio"), "linear_ratio": b.get("linear_ratio"),
            "budget": _budget_flag(r), "ppl": m.get("perplexity"), "kl": close.get("kl_mean"),
            "kl_p99": close.get("kl_p99"), "top1": close.get("top1_agreement"),
            **_flips(docs[ref_i] if ref_i is not None else None, docs[i], r.status == "ok"),
            "mean_acc": mean_acc,
            "mean_acc_se": mean_acc_se(m.get("tasks") or {}) if mean_acc is not None else None,
            "retained": mean_acc / ref_acc if mean_acc is not None and ref_acc else None,
            "params_M": (m.get("params") or b.get("params_compressed") or math.nan) / 1e6,
            "weights_MB": (m.get("weight_bytes") or math.nan) / 2**20,
            "ckpt_MB": (m.get("checkpoint_bytes") or math.nan) / 2**20,
            "peak_mem_MB": math.nan if elsewhere else (m.get("peak_memory_bytes") or math.nan) / 2**20,
            # device and host peaks of each phase (CSV only; records older than the split have the device peak)
            "compress_peak_device_MB": _mb(r.cost, "compress_peak_device_bytes", "compress_peak_memory_bytes"),
            "compress_peak_host_MB": _mb(r.cost, "compress_peak_host_bytes"),
            "eval_peak_device_MB": _mb(m, "eval_peak_device_bytes", "peak_memory_bytes"),
            "eval_peak_host_MB": _mb(m, "eval_peak_host_bytes"),
            "device_name": r.environment.get("hardware", {}).get("device_name"), "dtype": r.model.get("dtype"),
            # blocks kept in host memory: latency and evaluation memory include moving them (CSV only)
            "offloaded": bool((r.details.get("placement") or {}).get("offload")),
            "prefill_ms": None if doubt else m.get("prefill_ms"),
            "decode_tok_s": None if doubt else m.get("decode_tokens_per_s"),
            "latency_note": f"not compared: {doubt} (measured {m.get('prefill_ms'):.0f} ms prefill, "
                            f"{m.get('decode_tokens_per_s'):.2f} tokens/s)" if doubt else None,
            "compress_s": None if elsewhere else compress_seconds(r.cost), "train_tokens": r.cost.get("train_tokens"),
            "status": _status(r, ref),
            "_knobs": json.dumps(r.knob_overrides, sort_keys=True, default=str), "_row": i,
        }
        for task, res in (m.get("tasks") or {}).items():
            row[TASK_SHORT.get(task, task)] = main_acc(res)
        rows.append(row)
    rows += [c for i in with_docs.values() if (c := _chance_row(records[i], docs[i]))]
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df = _mark_noise(df, docs)
    df = _mark_ppl(df, records)
    df = _mark_chance(df, docs)
    df["_dense"] = df["method"].map({DENSE: 0, CHANCE: 1}).fillna(2)
    df = df.sort_values(["model", "suite", "_dense", "target", "mean_acc"], ascending=[True, True, True, True, False],
                        na_position="last")
    return df.drop(columns=["_dense", "_knobs", "_row"]).reset_index(drop=True)


def _chance_row(dense: Record, docs: dict[str, dict]) -> dict | None:
    """The row of what a uniform guess expects on the documents the dense record scored (every cell of a model
    and suite scores the same ones): per task and their mean, and that mean's share of the dense accuracy; None
    when the side file has no per-choice log-likelihoods."""
    per_task = stats.chance(docs)
    if not per_task:
        return None
    mean = float(np.mean(list(per_task.values())))
    ref = dense.metrics.get("mean_acc")
    return {"model": dense.model["name"], "suite": dense.suite["name"], "method": CHANCE, "seed": dense.seed,
            "target": 0.0, "budget": "-", "mean_acc": mean, "retained": mean / ref if ref else None,
            "status": REFERENCE, "_knobs": "{}", "_row": -1,
            **{TASK_SHORT.get(task, task): value for task, value in per_task.items()}}


def compress_seconds(cost: dict) -> float | None:
    """The cell's compression seconds with the statistics it reused counted at what computing them cost, so the
    figure does not depend on which cell of a run computed them; None when a reused statistic's cost is unknown
    (records from before it was kept) or the record has no compression cost (the dense model)."""
    own = cost.get("compress_seconds")
    reused = reused_cost(cost.get("statistics") or [])
    return None if own is None or reused is None else own + reused


def _mb(part: dict, *keys: str) -> float:
    """The first of ``keys`` that ``part`` holds, bytes in MiB; NaN when it holds none."""
    found = next((part[k] for k in keys if part.get(k) is not None), None)
    return found / 2**20 if found is not None else math.nan


def _flips(ref: dict | None, mine: dict | None, ok: bool) -> dict[str, float | None]:
    """The flip rate against the dense record's documents and the part of it that lost the dense right answers."""
    split = stats.flip_split(ref, mine) if ok and ref is not None and mine is not None else None
    return {"flip": None if split is None else split[0] + split[1], "lost": None if split is None else split[0]}


def _status(r: Record, ref: Record | None) -> str:
    """ok, failed with the reason, or collapsed: finite but useless perplexity (the record itself stays ok)."""
    if r.status != "ok":
        return f"failed: {r.error}"
    ppl, ref_ppl = r.metrics.get("perplexity"), ref.metrics.get("perplexity") if ref else None
    if ppl is not None and ref_ppl and ppl > COLLAPSE_FACTOR * ref_ppl:
        return f"collapsed: ppl {ppl / ref_ppl:,.0f}x dense"
    return "ok"


def seed_pairs(a: pd.DataFrame, b: pd.DataFrame) -> list[tuple[int, int]]:
    """The record indices (``_row``) of cells A and B paired seed by seed, or every pair when they share no seed."""
    seeds = sorted(set(a["seed"]) & set(b["seed"]))
    return [(a[a["seed"] == s]["_row"].iloc[0], b[b["seed"] == s]["_row"].iloc[0]) for s in seeds] or \
        [(i, j) for i in a["_row"] for j in b["_row"]]


def paired_vs(a: pd.DataFrame, b: pd.DataFrame, docs: list[dict | None]) -> stats.Paired | None:
    """Mean accuracy of cell B minus cell A, paired over documents for each seed both have (every pair of seeds
    when they share none), seeds pooled as a second level; None when a side file is missing."""
    per_seed = []
    for i, j in seed_pairs(a, b):
        p = stats.paired_mean(docs[i], docs[j]) if docs[i] is not None and docs[j] is not None else None
        if p is None:
            return None
        per_seed.append(p)
    return stats.over_seeds(per_seed)


#: the columns that make one cell (a method with its knobs at one ratio); a cell's seeds are its rows
CELL = ["model", "suite", "method", "_knobs", "target"]
Mark = tuple[str | None, str | None]  # "best", "≈", "" or None; and the difference to the best with its SE


def _against_best(ok: pd.DataFrame, value: str, lowest: bool,
                  test: Callable[[pd.DataFrame, pd.DataFrame, float, float], Mark]) -> dict[tuple, Mark]:
    """At each (model, suite, target), "best" for the compressed cell whose ``value`` (seeds averaged) is the
    lowest (``lowest``) or the highest, and for every other cell what ``test(best's rows, its rows, best's mean,
    its mean)`` says; keyed by the cell's ``CELL`` values."""
    g = ok[ok["method"] != DENSE].groupby(CELL, sort=False)
    rows_of = {k: part for k, part in g}
    means = g[value].mean().rename("mean").reset_index()
    marks = {}
    for _, group in means.groupby(["model", "suite", "target"]):
        best = group.loc[group["mean"].idxmin() if lowest else group["mean"].idxmax()]
        for i, c in group.iterrows():
            key = tuple(c[CELL])
            marks[key] = ("best", None) if i == best.name else \
                test(rows_of[tuple(best[CELL])], rows_of[key], best["mean"], c["mean"])
    return marks


def _put(df: pd.DataFrame, rows: pd.Index, marks: dict[tuple, Mark], mark_col: str, vs_col: str) -> None:
    """Every row of ``rows`` carries its cell's mark (None where the cell has none)."""
    for idx in rows:
        df.at[idx, mark_col], df.at[idx, vs_col] = marks.get(tuple(df.loc[idx, CELL]), (None, None))


def _mark_noise(df: pd.DataFrame, docs: list[dict | None]) -> pd.DataFrame:
    """Adds ``seed_sd`` (sd of mean_acc over a cell's seeds, where it has several), ``near_best`` and
    ``vs_best``: at each (model, suite, target), "best" for the cell (seeds averaged) with the highest mean
    accuracy, "≈" for every cell whose paired difference to it is within noise, "" for the rest; None for the
    dense model, failed cells and cells without per-document outcomes. ``vs_best`` is that paired difference."""
    df = df.assign(mean_acc_se=pd.to_numeric(df["mean_acc_se"]))
    at = df.columns.get_loc("mean_acc_se") + 1
    df.insert(at, "seed_sd", np.nan)
    df.insert(at + 1, "near_best", None)
    df.insert(at + 2, "vs_best", None)
    ok = df[(df["status"] == "ok") & df["mean_acc"].notna()]
    if ok.empty:
        return df

    def test(best: pd.DataFrame, cell: pd.DataFrame, *_) -> Mark:
        p = paired_vs(best, cell, docs)
        return (None, None) if p is None else ("≈" if p.within_noise() else "", f"{p.diff:+.3f}±{p.se:.3f}")

    sd = ok.groupby(CELL, sort=False)["mean_acc"].std().rename("sd").reset_index()
    df["seed_sd"] = pd.to_numeric(df[CELL].merge(sd, on=CELL, how="left").set_index(df.index)["sd"])
    _put(df, ok.index, _against_best(ok, "mean_acc", lowest=False, test=test), "near_best", "vs_best")
    return df


def _mark_ppl(df: pd.DataFrame, records: list[Record]) -> pd.DataFrame:
    """Adds ``ppl_near_best`` and ``ppl_vs_best`` after ``ppl``: at each (model, suite, target), "best" for the
    ok cell (seeds averaged) with the lowest perplexity, "≈" for every cell whose perplexity is within noise of it
    paired over the perplexity windows (``compare.window_test``: mean NLL per window, Student's t), "" for the
    rest; None for the dense model, collapsed or failed cells and cells without per-window figures. Only a cell's
    seeds with per-window figures are paired (all seeds score the same windows; older records lack the figures).
    ``ppl_vs_best`` is the cell's perplexity minus the best one's (all seeds) with the paired SE."""
    at = df.columns.get_loc("ppl") + 1
    df.insert(at, "ppl_near_best", None)
    df.insert(at + 1, "ppl_vs_best", None)
    ok = df[(df["status"] == "ok") & pd.to_numeric(df["ppl"]).notna()]
    if ok.empty:
        return df

    def windowed(rows: pd.DataFrame) -> pd.DataFrame:
        return rows[[compare.PERPLEXITY.windows(records[i]) is not None for i in rows["_row"]]]

    def test(best: pd.DataFrame, cell: pd.DataFrame, best_mean: float, mean: float) -> Mark:
        pairs = seed_pairs(windowed(best), windowed(cell))
        found = compare.window_test(compare.PERPLEXITY, [records[x] for x, _ in pairs],
                                    [records[y] for _, y in pairs], best_mean, mean) if pairs else None
        return (None, None) if found is None else (
            "≈" if found.verdict == "within noise" else "", f"{mean - best_mean:+.2f}±{found.se:.2f}")

    marks = _against_best(ok.assign(ppl=pd.to_numeric(ok["ppl"])), "ppl", lowest=True, test=test)
    _put(df, ok.index, marks, "ppl_near_best", "ppl_vs_best")
    return df


def _mark_chance(df: pd.DataFrame, docs: list[dict | None]) -> pd.DataFrame:
    """Adds ``vs_chance`` after ``retained``: each cell's mean accuracy minus what a uniform guess expects on the
    same documents, with its SE (``stats.above_chance_over_seeds``), prefixed "≈" where it is
    within noise of the guess; None without per-document outcomes. Collapsed cells get it too: it says whether
    their answers are guesses."""
    df.insert(df.columns.get_loc("retained") + 1, "vs_chance", None)
    scored = df[df["_row"].ge(0) & df["mean_acc"].notna() & ~df["status"].astype(str).str.startswith("failed")]
    for _, cell in scored.groupby(CELL, sort=False):
        p = stats.above_chance_over_seeds([docs[i] for i in cell["_row"]])
        if p is None:
            continue
        mark = f"{'≈ ' if p.within_noise() else ''}{p.diff:+.3f}±{p.se:.3f}"
        for idx in cell.index:
            df.at[idx, "vs_chance"] = mark
    return df


def noise_legend(records: list[Record]) -> str:
    """What the ± column and the ≈best marker mean, and how many documents each suite scored per task."""
    per_suite = []
    for suite in sorted({r.suite["name"] for r in records}):
        docs = sorted({t["n"] for r in records if r.suite["name"] == suite and r.status == "ok"
                       for t in (r.metrics.get("tasks") or {}).values() if t.get("n")})
        ses = [se for r in records if r.suite["name"] == suite and r.method != DENSE and r.status == "ok"
               and (se := mean_acc_se(r.metrics.get("tasks") or {})) is not None]
        if docs:
            n = f"{docs[0]}" if len(docs) == 1 else f"{docs[0]}-{docs[-1]}"
            mean = f", mean_acc's about ±{float(np.median(ses)):.3f}" if ses else ""
            per_suite.append(f"suite {suite}: {n} documents per task (one task's SE up to "
                             f"±{0.5 / math.sqrt(max(docs[0] - 1, 1)):.2f}{mean})")
    docs_line = f" Documents: {'; '.join(per_suite)}." if per_suite else ""
    return (f"± = standard error of mean_acc over the sampled documents, sqrt(sum of the tasks' SE²) / number of "
            f"tasks, from lm-eval's per-task SE; seed sd = standard deviation of mean_acc over a cell's seeds. "
            f"≈best: at each target ratio, \"best\" is the method with the highest mean accuracy (seeds averaged) "
            f"and \"≈\" marks every method within noise of it by a paired test on the documents both answered: "
            f"|Δ| ≤ {stats.Z}·SE(Δ), SE(Δ) from the per-document differences (seeds paired seed by seed, their spread "
            f"added); Δbest is that difference with its SE; an empty mark is clearly worse. KL = mean KL divergence "
            f"of the next-token distribution from the dense model's on the perplexity windows (p99: its 99th "
            f"percentile over positions), top-1 agr = share of positions where both predict the same token, flip = "
            f"share of zero-shot documents whose correctness differs from the dense model's, lost = the part of them the "
            f"dense model answered right (flip - lost gained a right answer; with as many documents in every task, "
            f"mean_acc minus the dense model's = flip - 2·lost: a cell near a guess can keep the dense accuracy "
            f"while losing many of its right answers). ppl≈best: the same for "
            f"perplexity, \"best\" the lowest (seeds averaged), paired over the perplexity windows both cells scored "
            f"(mean NLL per window, |Δ| ≤ t(windows - 1)·SE(Δ), seeds paired as above); Δppl best is the difference "
            f"in perplexity with its SE (delta method); \"-\" for a record without per-window figures (`bench run ... "
            f"--rescore` adds them from its checkpoint). `bench compare A B` pairs KL and top-1 agr the same way. "
            f"prefill_ms and decode_tok_s read \"-\" where "
            f"the measurement is in doubt (its repeats more than {SPREAD_LIMIT:g}x apart, or a CPU host's load average "
            f"above {LOAD_LIMIT:g}x its cores), and they, peak_mem_MB and compress_s read \"-\" for a record measured "
            f"on other hardware than its section's dense record (a GPU run beside CPU runs): the CSV's latency_note "
            f"says why and what was measured, and its device peaks and device_name columns keep them. compress_s counts "
            f"the calibration statistics a cell used at what computing them cost, whether it computed them or reused "
            f"them from another cell or the cache; \"-\" where a reused statistic's cost was not recorded (records "
            f"from before it was kept: recompute with --no-cache). chance: the accuracy a uniform guess expects on "
            f"the same documents (1 / number of choices, per task and their mean); Δchance = mean_acc minus it, paired "
            f"over the documents with its SE (seeds as above), \"≈\" where |Δ| ≤ {stats.Z}·SE: those zero-shot answers "
            f"cannot be told from guessing.{docs_line}")


def _budget_flag(r: Record) -> str:
    b = r.budget
    if r.method == DENSE:
        return "-"
    if not b:
        return "n/a"
    if b.get("within_tolerance"):
        return "ok"
    return f"MISSED {100 * (b['achieved_ratio'] - b['target_ratio']):+.1f} pts"


def _fmt(value, col: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if col in ("target", "achieved", "linear_ratio"):
        return f"{100 * value:.1f}%"
    if col == "retained":
        return f"{100 * value:.1f}%"
    if col in ("mean_acc", "mean_acc_se", "seed_sd", "kl", "kl_p99", "top1", "flip", "lost") or col in TASK_SHORT.values():
        return f"{value:.3f}"
    if col == "ppl":
        return f"{value:.2f}" if value < 1e4 else f"{value:.3g}"
    if col == "train_tokens":
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


COLUMNS = ["method", "seed", "target", "achieved", "budget", "linear_ratio", "ppl", "ppl_near_best", "ppl_vs_best",
           "kl", "kl_p99", "top1", "flip", "lost",
           "mean_acc", "mean_acc_se", "seed_sd", "near_best", "vs_best", "retained", "vs_chance",
           *TASK_SHORT.values(), "params_M", "weights_MB", "ckpt_MB", "peak_mem_MB", "prefill_ms", "decode_tok_s",
           "compress_s", "train_tokens", "status"]


#: columns of the frame and the CSV that the Markdown and HTML tables leave out (and that are not tasks)
CSV_ONLY = ["model", "suite", "compress_peak_device_MB", "compress_peak_host_MB", "eval_peak_device_MB",
            "eval_peak_host_MB", "device_name", "dtype", "offloaded", "latency_note"]


def display_table(df: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in COLUMNS if c in df.columns]
    return pd.DataFrame({c: [_fmt(v, c) for v in df[c]] for c in cols})


def _numeric(texts: pd.Series) -> bool:
    """Whether every shown value of a formatted column but "-" reads as a number (right-aligned in Markdown)."""
    shown = [t for t in texts if t != "-"]
    try:
        return bool(shown) and all(math.isfinite(float(t)) for t in shown)
    except ValueError:
        return False


def markdown(df: pd.DataFrame, tolerance_note: str = "", legend: str = "") -> str:
    parts = ["# slimbench leaderboard", "",
             "Generated by `bench leaderboard` from the records under `results/`; do not edit by hand.",
             "ratio = share of whole-model unique stored parameters removed (embeddings included, shared tensors "
             "counted once), counted on the compressed model. `budget` flags cells whose achieved ratio misses "
             f"the target by more than the tolerance{tolerance_note}. `retained` = mean zero-shot accuracy / "
             "the dense model's. Accuracy per task is acc_norm where lm-eval reports it, else acc. `status` says "
             f"collapsed where perplexity exceeds {COLLAPSE_FACTOR:g}x the dense model's (the cell ran; it is not "
             "ranked).", "",
             *([legend, ""] if legend else [])]
    for (model, suite), group in df.groupby(["model", "suite"], sort=True):
        table = display_table(group if group["seed_sd"].notna().any() else group.drop(columns="seed_sd"))
        align = ["right" if _numeric(table[c]) else "left" for c in table.columns]
        table = table.rename(columns=LABELS)
        parts += [f"## {model} — suite `{suite}`", "", table.to_markdown(index=False, colalign=align), ""]
    return "\n".join(parts)


def write(results_dir: str | Path, out_dir: str | Path) -> tuple[pd.DataFrame, list[str], list[Path]]:
    """Regenerate the leaderboard files from every record; returns the frame, skipped files, written paths."""
    records, problems = load_records(results_dir)
    records, superseded = latest(records)
    if superseded:
        problems = [*problems, f"{superseded} older record(s) of the same cells superseded by newer ones "
                               "(kept on disk; the tables show the newest)"]
    docs = docs_io.read_each(results_dir, records)
    df = frame(records, docs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "leaderboard.md", out / "leaderboard.csv"]
    trained = curves.markdown(curves.runs(records, df)) if not df.empty else ""
    paths[0].write_text(markdown(df, legend=noise_legend(records)) + (f"\n{trained}" if trained else "")
                        if not df.empty else "# slimbench leaderboard\n\nNo records yet.\n")
    df.to_csv(paths[1], index=False)
    from bench import report  # matplotlib only when files are written

    paths += report.write(records, out, problems, docs)
    return df, problems, paths


TERMINAL_COLUMNS = ["method", "seed", "target", "achieved", "budget", "ppl", "ppl_near_best", "kl", "top1", "flip",
                    "mean_acc",
                    "near_best", "vs_best",
                    "retained", "params_M",
                    "ckpt_MB", "prefill_ms", "decode_tok_s", "compress_s", "status"]


def rich_table(df: pd.DataFrame, title: str = "slimbench"):
    """The main columns for a terminal; the Markdown and CSV files carry every column."""
    from rich.table import Table

    shown = display_table(df)
    shown = shown[[c for c in TERMINAL_COLUMNS if c in shown.columns]].rename(columns=LABELS)
    table = Table(title=title, show_lines=False)
    for col in shown.columns:
        table.add_column(col, justify="left" if col in ("method", "budget", "status") else "right",
                         overflow="fold", max_width=40 if col == "status" else None)
    for _, row in shown.iterrows():
        style = "red" if flagged(row.get("status", "ok")) else ("yellow" if str(row.get("budget")).startswith("MISSED")
                                                               else None)
        table.add_row(*[str(v) for v in row.values], style=style)
    return table
