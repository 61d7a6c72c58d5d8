"""Figures of the leaderboard, drawn from the seed-averaged cells of ``report.cells``.

Each ``draw_*`` function fills one axes for one (model, suite); ``figure`` puts one axes per (model, suite)
side by side. The same figures become inline SVG in ``index.html`` and PNG files for papers. Error bars
span the min-max over seeds; a red ring marks a cell that missed its parameter budget.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Callable
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatter

from bench.leaderboard import CHANCE, COLUMNS, CSV_ONLY, DENSE, TASK_SHORT

Draw = Callable[[Axes, pd.DataFrame], None]
#: a legend with more entries than this goes under its axes in columns, and ``figure`` grows to hold it (the long
#: labels of runs with overridden knobs beside the axes squeezed them to nothing)
LEGEND_BESIDE = 8
LABEL_WIDTH = 46  # legend labels wrap at this many characters


def _ok(cells: pd.DataFrame) -> pd.DataFrame:
    return cells[cells["status"] == "ok"]


def colours(cells: pd.DataFrame) -> dict[str, int]:
    """A place per method (dense and chance aside), in order of first appearance: its colour is place % 10, its
    marker changes with each round of 10. ``figure`` and the HTML report compute it over every panel and pin it on
    each panel's cells (``attrs["colours"]``), so a method looks the same in every panel."""
    methods = [m for m in dict.fromkeys(cells["method"]) if m not in (DENSE, CHANCE)]
    return {m: i for i, m in enumerate(methods)}


MARKERS = "osD^v<>p"  # the 10 colours repeat past 10 methods: the marker tells the rounds apart


def _style(cells: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """Colour and marker of each method these cells hold, from the pinned places when there are some."""
    own = colours(cells)
    place = cells.attrs.get("colours") or own
    return {m: (f"C{place[m] % 10}", MARKERS[place[m] // 10 % len(MARKERS)]) for m in own}


def _err(c: pd.DataFrame, col: str, scale: float = 1.0):
    """Asymmetric error bars from the mean to the min and max over seeds."""
    return [scale * (c[col] - c[f"{col}_min"]).fillna(0).to_numpy(),
            scale * (c[f"{col}_max"] - c[col]).fillna(0).to_numpy()]


def _missed(c: pd.DataFrame) -> pd.Series:
    return c["budget"].astype(str).str.startswith("MISSED")


def _by_method(ax: Axes, cells: pd.DataFrame, x: str, y: str, x_scale: float) -> None:
    """One line per method through its cells (sorted by x), the dense model as a star and a dashed line."""
    ok = _ok(cells)
    ok = ok[ok[x].notna() & ok[y].notna()]
    dense = ok[ok["method"] == DENSE]
    if not dense.empty:
        ax.axhline(dense[y].iloc[0], color="grey", ls="--", lw=1)
        ax.plot(x_scale * dense[x].iloc[0], dense[y].iloc[0], "*", color="black", ms=12, label=DENSE, zorder=4)
    for method, (colour, marker) in _style(cells).items():
        c = ok[ok["method"] == method].sort_values(x)
        if c.empty:
            continue
        ax.errorbar(x_scale * c[x], c[y], yerr=_err(c, y), xerr=_err(c, x, x_scale),
                    marker=marker, capsize=3, color=colour, label=method)
    missed = ok[_missed(ok)]
    handles = ax.get_legend_handles_labels()[0]
    if not missed.empty:
        ax.scatter(x_scale * missed[x], missed[y], s=160, facecolors="none", edgecolors="red", lw=1.5, zorder=5)
        handles.append(Line2D([], [], ls="", marker="o", ms=10, mfc="none", mec="red", label="missed budget"))
    if len(ok):
        _legend(ax, handles)
    ax.grid(alpha=0.3)


def _legend(ax: Axes, handles: list, ncols: int = 2) -> None:
    """Beside the data when short; under the axes in ``ncols`` columns, labels wrapped, when long."""
    labels = [textwrap.fill(h.get_label(), LABEL_WIDTH, break_on_hyphens=False) for h in handles]
    if len(handles) <= LEGEND_BESIDE:
        ax.legend(handles, labels, fontsize="small")
    else:
        ax.legend(handles, labels, fontsize="x-small", ncols=ncols, loc="upper center",
                  bbox_to_anchor=(0.5, -0.16))


def _legend_height(ax: Axes, renderer) -> float:
    """Inches a legend under ``ax`` needs, measured (0 for none or one beside the data)."""
    legend = ax.get_legend()
    if legend is None or len(legend.get_texts()) <= LEGEND_BESIDE:
        return 0.0
    return 0.6 + legend.get_window_extent(renderer).height / ax.figure.dpi


def _chance(cells: pd.DataFrame) -> pd.Series | None:
    """The chance row (what a uniform guess expects on the same documents), if the cells have one."""
    found = cells[cells["method"] == CHANCE]
    return found.iloc[0] if len(found) else None


def draw_accuracy(ax: Axes, cells: pd.DataFrame) -> None:
    chance = _chance(cells)
    if chance is not None and pd.notna(chance["mean_acc"]):
        ax.axhline(chance["mean_acc"], color="grey", ls=":", lw=1.2, label="chance (uniform guess)")
    _by_method(ax, cells, "achieved", "mean_acc", 100)
    ax.set_xlabel("achieved ratio (% of parameters removed)")
    ax.set_ylabel("mean zero-shot accuracy")


def draw_perplexity(ax: Axes, cells: pd.DataFrame) -> None:
    _by_method(ax, cells, "achieved", "ppl", 100)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    ax.set_xlabel("achieved ratio (% of parameters removed)")
    ax.set_ylabel("perplexity (log scale)")


def draw_kl(ax: Axes, cells: pd.DataFrame) -> None:
    """Mean KL to the dense model (log scale; the dense model's 0 is left out) against the achieved ratio."""
    _by_method(ax, cells[cells["method"] != DENSE], "achieved", "kl", 100)
    if "kl" in cells and (pd.to_numeric(cells["kl"]) > 0).any():
        ax.set_yscale("log")
    ax.set_xlabel("achieved ratio (% of parameters removed)")
    ax.set_ylabel("mean KL to the dense model (nats, log scale)")


def draw_top1(ax: Axes, cells: pd.DataFrame) -> None:
    _by_method(ax, cells, "achieved", "top1", 100)
    ax.set_xlabel("achieved ratio (% of parameters removed)")
    ax.set_ylabel("top-1 agreement with the dense model")


def draw_speed(ax: Axes, cells: pd.DataFrame) -> None:
    _by_method(ax, cells, "params_M", "decode_tok_s", 1)
    ax.set_xlabel("unique stored parameters (millions)")
    ax.set_ylabel("greedy decode tokens/s")


def draw_tasks(ax: Axes, cells: pd.DataFrame) -> None:
    """Grouped bars: for each task, one bar per (method, target) cell, the dense model first and black;
    a method's colour fades as its target ratio grows."""
    ok = _ok(cells)
    tasks = [t for t in task_columns(cells) if ok[t].notna().any()]
    if ok.empty or not tasks:
        return
    style = _style(cells)
    width = 0.8 / len(ok)
    for i, (_, row) in enumerate(ok.iterrows()):
        same = ok[ok["method"] == row["method"]]["target"].rank(method="dense")
        fade = 0.0 if len(same) < 2 else (same[row.name] - 1) / (same.max() - 1 or 1)
        dense = row["method"] == DENSE
        ax.bar([j - 0.4 + (i + 0.5) * width for j in range(len(tasks))], [row[t] for t in tasks], width,
               yerr=[[row[t] - row[f"{t}_min"] for t in tasks], [row[f"{t}_max"] - row[t] for t in tasks]]
               if row["n"] > 1 else None, capsize=1.5, color="black" if dense else style[row["method"]][0], alpha=1 - 0.55 * fade,
               label=DENSE if dense else f"{row['method']} @ {100 * row['target']:.0f}%")
    chance = _chance(cells)
    if chance is not None:
        ax.hlines([chance[t] for t in tasks], [j - 0.45 for j in range(len(tasks))],
                  [j + 0.45 for j in range(len(tasks))], colors="grey", linestyles=":", lw=1.2,
                  label="chance (uniform guess)")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("accuracy (acc_norm, else acc)")
    ax.grid(axis="y", alpha=0.3)
    _legend(ax, ax.get_legend_handles_labels()[0], ncols=3)


def task_columns(cells: pd.DataFrame) -> list[str]:
    """The per-task accuracy columns: every seed-averaged column that is not a fixed leaderboard or CSV column."""
    fixed = (set(COLUMNS) | set(CSV_ONLY)) - set(TASK_SHORT.values())
    return [c.removesuffix("_min") for c in cells.columns if c.endswith("_min") and c.removesuffix("_min") not in fixed]


def figure(draw: Draw, groups: list[tuple[str, pd.DataFrame]], size: tuple[float, float] = (6.4, 4.2)) -> Figure:
    """One axes per (title, cells) group, side by side, on an Agg canvas (its renderer measures the legends)."""
    fig = Figure(figsize=(size[0] * len(groups), size[1]), layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    frames = [cells for _, cells in groups if isinstance(cells, pd.DataFrame)]  # a draw may take no cells
    shared = colours(pd.concat(frames)) if frames else {}
    for ax, (title, cells) in zip(axes, groups, strict=True):
        if isinstance(cells, pd.DataFrame):
            cells = cells.copy()
            cells.attrs["colours"] = cells.attrs.get("colours") or shared
        draw(ax, cells)
        ax.set_title(title, fontsize="medium")
    renderer = FigureCanvasAgg(fig).get_renderer()
    extra = max(_legend_height(ax, renderer) for ax in axes)
    if extra:  # the layout places a legend under its axes a few pixels past the edge without a wider pad
        fig.set_size_inches(fig.get_figwidth(), size[1] + extra)
        fig.get_layout_engine().set(h_pad=0.12)
    return fig


def svg(fig: Figure, salt: str) -> str:
    """The figure as an ``<svg>`` element to inline in HTML: text as text, no XML prologue or metadata,
    no namespace URLs; ``salt`` keeps element ids unique among several figures on one page."""
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.savefig(buf, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    for ns in (' xmlns="http://www.w3.org/2000/svg"', ' xmlns:xlink="http://www.w3.org/1999/xlink"'):
        text = text.replace(ns, "", 1)
    return text


PNGS: dict[str, Draw] = {"accuracy_vs_ratio.png": draw_accuracy, "perplexity_vs_ratio.png": draw_perplexity,
                         "kl_vs_ratio.png": draw_kl, "speed_vs_size.png": draw_speed}


def write_pngs(groups: list[tuple[str, pd.DataFrame]], out_dir: Path, dpi: int = 150) -> list[Path]:
    """The figures of ``PNGS`` (all groups side by side) as PNG files in ``out_dir``, through Agg."""
    paths = []
    for name, draw in PNGS.items():
        fig = figure(draw, groups)  # on the Agg canvas ``figure`` measured its legends with
        fig.savefig(out_dir / name, dpi=dpi)
        paths.append(out_dir / name)
    return paths
