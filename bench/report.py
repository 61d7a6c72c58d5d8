"""``leaderboard/index.html``: the leaderboard as one self-contained page (inline CSS, JS and SVG).

It opens from the file system with no server and no network. A section per (model, suite): a table of
every cell averaged over its seeds (min-max under the mean), sortable by clicking a header or with
``#sort=ppl`` / ``#sort=-ppl`` in the URL, the dense row always on top; accuracy cells coloured by the
share of the dense model's accuracy they keep, with the SE of mean accuracy and the methods within noise of the
best marked; failed cells with their error; budget misses flagged.
Then the figures of ``bench.plots`` as inline SVG.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from html import escape
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg

from bench import curves, plots
from bench.compare import pooled_se
from bench.leaderboard import (
    CHANCE,
    COLLAPSE_FACTOR,
    COLUMNS,
    DENSE,
    LABELS,
    TASK_SHORT,
    _fmt,
    flagged,
    frame,
    noise_legend,
)
from bench.records import Record

KEYS = ["model", "suite", "method", "target"]
#: one per cell, the same on each seed's row
MARKS = ["near_best", "vs_best", "ppl_near_best", "ppl_vs_best", "vs_chance"]
PINNED = {DENSE: 0, CHANCE: 1}  # rows kept on top of a section, in this order
TEXT = ["model", "suite", "method", "seed", "budget", "status", *MARKS]
FLOOR = 0.6  # a share of the dense accuracy at or below this is full red; 1.0 and above full green
FIGURES = [("accuracy", plots.draw_accuracy, (6.4, 4.2)), ("perplexity", plots.draw_perplexity, (6.4, 4.2)),
           ("kl", plots.draw_kl, (6.4, 4.2)), ("top1", plots.draw_top1, (6.4, 4.2)),
           ("speed", plots.draw_speed, (6.4, 4.2)), ("tasks", plots.draw_tasks, (9.6, 4.2))]


def cells(df: pd.DataFrame) -> pd.DataFrame:
    """One row per ok (model, suite, method, target): the mean over seeds of every metric, with ``<col>_min``,
    ``<col>_max``, ``seeds`` and ``n`` (the SE of mean accuracy pooled as ``compare.pooled_se`` does); each failed
    seed as a row of its own, and the chance row as it is. Dense first, then chance, then by target."""
    num = [c for c in df.columns if c not in TEXT and c != "target"]
    df = df.assign(**{c: pd.to_numeric(df[c], errors="coerce") for c in num})
    ok = df[df["status"] == "ok"]
    g = ok.groupby(KEYS, sort=False)
    # the mean of equal values can round an ulp past them (0.1 three times averages to 0.10000000000000002), and a
    # plot's error bar from mean to min or max then comes out negative, which matplotlib refuses: kept in [min, max]
    low, high = g[num].min(), g[num].max()
    # copied into one block, so the columns added below do not fragment it (pandas warned once per column)
    out = pd.concat([g[num].mean().clip(low, high), low.add_suffix("_min"), high.add_suffix("_max")], axis=1).copy()
    out["seeds"] = g["seed"].agg(lambda s: ",".join(map(str, sorted(s))))
    out["n"] = g.size()
    out["mean_acc_se"] = g["mean_acc_se"].agg(lambda s: pooled_se(s.tolist()))
    for col in MARKS:
        out[col] = g[col].first()
    out["budget"] = g["budget"].agg(lambda s: next((f for f in s if str(f).startswith("MISSED")), s.iloc[0]))
    out["status"] = "ok"
    failed = df[df["status"] != "ok"].assign(seeds=lambda d: d["seed"].astype(str), n=1).drop(columns="seed")
    rows = pd.concat([x for x in (out.reset_index(), failed) if len(x)], ignore_index=True)
    rows["_rest"] = rows["method"].map(PINNED).fillna(len(PINNED))
    dense = rows["method"] == DENSE
    rows.loc[dense, "achieved"] = rows.loc[dense, "achieved"].fillna(0.0)
    rows = rows.sort_values(["model", "suite", "_rest", "target", "mean_acc"],
                            ascending=[True, True, True, True, False], na_position="last")
    return rows.drop(columns="_rest").reset_index(drop=True)


def _columns(rows: pd.DataFrame) -> list[str]:
    """The leaderboard's columns with ``seeds`` for ``seed`` and the tasks actually present; empty ones dropped."""
    fixed = ["seeds" if c == "seed" else c for c in COLUMNS if c not in (*TASK_SHORT.values(), "seed_sd")]
    at = fixed.index("retained") + 1
    cols = [*fixed[:at], *plots.task_columns(rows), *fixed[at:]]
    return [c for c in cols if c in ("method", "seeds", "budget", "status") or c in rows and rows[c].notna().any()]


NO_RANGE = ("mean_acc_se",)  # the seeds' min-max is shown under the mean, except for these
NEAR_RANK = {"best": 0, "≈": 1, "": 2}  # ≈best sorts best first, then within noise, then clearly worse


def _shade(share: float) -> str:
    """Red at or below ``FLOOR`` of the dense accuracy, through yellow, to green at 100 % and above."""
    if share is None or not math.isfinite(share):
        return ""
    hue = 120 * min(1.0, max(0.0, (share - FLOOR) / (1 - FLOOR)))
    return f' style="background:hsl({hue:.0f},70%,82%)"'


def _td(row: pd.Series, col: str, dense: pd.Series | None, tasks: list[str]) -> str:
    value = row[col]
    if col in ("method", "budget", "status", "seeds", *MARKS):
        cls = {"method": "text", "budget": "flag" if str(value).startswith("MISSED") else "",
               "status": "err text" if flagged(value) else ""}.get(col, "")
        value = _fmt(value, col) if col in MARKS else value
        key = row["n"] if col == "seeds" else NEAR_RANK.get(row[col], "") if col.endswith("near_best") else value
        return f'<td data-v="{escape(str(key))}" class="{cls}">{escape(str(value))}</td>'
    if value is None or not math.isfinite(value):
        return '<td data-v="">-</td>'
    text = escape(_fmt(value, col))
    lo, hi = row.get(f"{col}_min"), row.get(f"{col}_max")
    if row["n"] > 1 and col not in NO_RANGE and lo is not None and math.isfinite(lo) and lo != hi:
        text += f"<small>{escape(_fmt(lo, col))}–{escape(_fmt(hi, col))}</small>"
    style = ""
    if col in ("mean_acc", "retained"):
        style = _shade(row["retained"])
    elif col in tasks and dense is not None and dense[col]:
        style = _shade(value / dense[col])
    return f'<td data-v="{float(value)!r}"{style}>{text}</td>'


def _tr(row: pd.Series, cols: list[str], dense: pd.Series | None, tasks: list[str]) -> str:
    cls = "failed" if flagged(row["status"]) else "missed" if str(row["budget"]).startswith("MISSED") else ""
    return f'<tr class="{cls}">' + "".join(_td(row, c, dense, tasks) for c in cols) + "</tr>\n"


def _section(title: str, rows: pd.DataFrame, index: int) -> str:
    cols, tasks = _columns(rows), plots.task_columns(rows)
    ok_dense = rows[(rows["method"] == DENSE) & (rows["status"] == "ok")]
    dense = ok_dense.iloc[0] if len(ok_dense) else None
    pinned = rows["method"].isin(list(PINNED))
    body = ["".join(_tr(r, cols, dense, tasks) for _, r in part.iterrows()) for part in (rows[pinned], rows[~pinned])]
    head = "".join(f'<th data-key="{escape(c)}">{escape(LABELS.get(c, c))}</th>' for c in cols)
    figures = "".join(plots.svg(plots.figure(draw, [(title, rows)], size), salt=f"{index}-{name}")
                      for name, draw, size in FIGURES)
    status = rows["status"].astype(str)
    n_ok = int(rows.loc[status == "ok", "n"].sum())
    n_collapsed, n_failed = int(status.str.startswith("collapsed").sum()), int(status.str.startswith("failed").sum())
    counts = f"{n_ok} ok cells, {n_collapsed} collapsed (ran; perplexity over {COLLAPSE_FACTOR:g}x dense), {n_failed} failed."
    return (f'<section><h2>{escape(title)}</h2><p class="note">{escape(counts)}</p>\n'
            f'<div class="wrap"><table class="board"><thead><tr>{head}</tr></thead>\n'
            f'<tbody class="pinned">{body[0]}</tbody>\n<tbody>{body[1]}</tbody></table></div>\n'
            f'<div class="plots">{figures}</div></section>\n')


def write(records: list[Record], out_dir: str | Path, problems: Iterable[str] = (),
          docs: list[dict | None] | None = None) -> list[Path]:
    """Write ``index.html`` and the PNG figures beside it from ``records``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = frame(records, docs)  # a run with overridden knobs is a row of its own, e.g. ``basis (group_size=3)``
    groups = []
    if not df.empty:
        groups = [(f"{model} — suite {suite}", g.reset_index(drop=True))
                  for (model, suite), g in cells(df).groupby(["model", "suite"], sort=True)]
    if groups:  # one colour per method on every section's plots
        shared = plots.colours(pd.concat([rows for _, rows in groups]))
        for _, rows in groups:
            rows.attrs["colours"] = shared
    body = "".join(_section(title, rows, i) for i, (title, rows) in enumerate(groups)) or "<p>No records yet.</p>"
    trained = curves.runs(records, df) if not df.empty else []
    body += _training(trained)
    problems = list(problems)
    if problems:
        items = "".join(f"<li>{escape(p)}</li>" for p in problems)
        body += f"<details><summary>{len(problems)} files skipped</summary><ul>{items}</ul></details>"
    path = out / "index.html"
    path.write_text(PAGE.format(css=CSS, body=body, js=JS, legend=escape(noise_legend(records))), encoding="utf-8")
    return [path, *(plots.write_pngs(groups, out) if groups else []), *_training_png(trained, out)]


TRAINING_PNG = "training_curve.png"


def _training(trained: list[dict]) -> str:
    """The "What training buys" section: a figure of every curve, then each run's points and verdict."""
    if not trained:
        return ""
    figure = plots.svg(_curve_figure(trained), salt="training")
    runs = "".join(f"<h3>{escape(c['model'])} — suite {escape(c['suite'])} — {escape(curves.title(c))}</h3>"
                   f"{_plain_table(curves.table(c))}<p class=\"note\">{escape(curves.verdict(c))}</p>" for c in trained)
    return (f'<section><h2>What training buys</h2><p class="note">{escape(curves.INTRO)}</p>'
            f'<div class="plots">{figure}</div>{runs}</section>\n')


def _curve_figure(trained: list[dict]):
    return plots.figure(lambda ax, _: curves.draw(ax, trained), [("held-out KL against training tokens", None)])


def _plain_table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{escape(str(c))}</th>" for c in df.columns)
    rows = "".join("<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in r) + "</tr>" for r in df.itertuples(index=False))
    return f'<div class="wrap"><table class="curve"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'


def _training_png(trained: list[dict], out: Path) -> list[Path]:
    """``training_curve.png`` when some record has a curve; a stale one from older records is removed."""
    path = out / TRAINING_PNG
    if not trained:
        path.unlink(missing_ok=True)
        return []
    fig = _curve_figure(trained)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=150)
    return [path]


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
.wrap{overflow-x:auto}
table.board,table.curve{border-collapse:collapse;font-variant-numeric:tabular-nums;margin:.5em 0 1.5em}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right;vertical-align:top;white-space:nowrap}
th{background:#f2f2f2;text-align:center} table.board th{cursor:pointer;user-select:none}
th[aria-sort=ascending]::after{content:" \\25B2"} th[aria-sort=descending]::after{content:" \\25BC"}
td.text{text-align:left;white-space:normal;min-width:12ch;max-width:34ch} td.err{color:#a00;white-space:normal;min-width:30ch;max-width:60ch}
td small{display:block;color:#666;font-size:80%}
tbody.pinned tr{font-weight:600} tbody.pinned tr:last-child td{border-bottom:2px solid #888}
tr.failed td{background:#fbe9e9} td.flag{background:#ffe9a8;color:#7a4d00;font-weight:600}
.plots{display:flex;flex-wrap:wrap;gap:1em} .plots svg{max-width:100%;height:auto}
.note{color:#555}
"""

JS = """
// Every table sorts by the column the URL fragment names (#sort=ppl ascending, #sort=-ppl descending);
// a header click sets the fragment. The dense row (first tbody) never moves; missing values sort last.
function cmp(x, y) {
  const a = Number(x), b = Number(y);
  return isNaN(a) || isNaN(b) ? x.localeCompare(y) : a - b;
}
function applySort() {
  const m = /sort=(-?)([^&]+)/.exec(location.hash);
  if (!m) return;
  const desc = m[1] === '-', key = decodeURIComponent(m[2]);
  for (const table of document.querySelectorAll('table.board')) {
    const ths = [...table.tHead.rows[0].cells];
    const col = ths.findIndex(th => th.dataset.key === key);
    if (col < 0) continue;
    const body = table.tBodies[1], v = r => r.cells[col].dataset.v;
    const rows = [...body.rows].sort((r, s) => {
      const x = v(r), y = v(s);
      if (x === '' || y === '') return (x === '') - (y === '');
      return desc ? cmp(y, x) : cmp(x, y);
    });
    body.append(...rows);
    ths.forEach(th => th.removeAttribute('aria-sort'));
    ths[col].setAttribute('aria-sort', desc ? 'descending' : 'ascending');
  }
}
document.addEventListener('click', e => {
  const th = e.target.closest('table.board th');
  if (!th) return;
  const asc = th.getAttribute('aria-sort') === 'ascending';
  location.hash = 'sort=' + (asc ? '-' : '') + encodeURIComponent(th.dataset.key);
});
window.addEventListener('hashchange', applySort);
applySort();
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>slimbench leaderboard</title><style>{css}</style></head>
<body><h1>slimbench leaderboard</h1>
<p class="note">Generated by <code>bench leaderboard</code> from the records under <code>results/</code>; do not
edit by hand. ratio = share of the whole model's unique stored parameters removed, counted on the compressed
model. Several seeds: the mean, with min&ndash;max beneath it and as error bars. Colour: the share of the dense
model's mean zero-shot accuracy kept (per task: of the dense model's accuracy on that task), red at 60&nbsp;% or
less, green at 100&nbsp;%. <b>MISSED</b>: the achieved ratio is further from the target than the tolerance (a
red ring in the plots). Click a column header to sort (again to reverse); the dense row stays on top.</p>
<p class="note">{legend}</p>
{body}
<script>{js}</script>
</body></html>
"""
