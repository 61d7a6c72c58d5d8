"""What training buys: the training curves records carry, as a table and a figure of the leaderboard.

A method that trains may record the model as it stands at chosen token counts: ``details["curve"]``, a list of
points ``{"tokens", "seconds", "kl_heldout", "ppl"}`` (held-out KL to the dense model and perplexity, both on the
method's own held-out windows, training seconds so far), with ``details["curve_dense_ppl"]`` the dense model's
perplexity on those windows. Each curve is one run's trajectory: a point early in a long run is measured while the
run's schedule (DeltaLLM's progressive module replacement) is still ramping, so it is not what that budget alone
would give; the last point is the run's result. Beside each curve: the record's final figures on the suite's
perplexity windows and, as the figure to beat, the best other method there (lowest perplexity, not collapsed)
at the same model, suite, ratio and seed.
"""

from __future__ import annotations

import math

import pandas as pd
from matplotlib.axes import Axes

from bench.compare import DENSE
from bench.records import Record


def _base(label: str) -> str:
    """``delta (train_tokens=...)`` -> ``delta``: the method a leaderboard label belongs to."""
    return label.split(" (", 1)[0]


def runs(records: list[Record], board: pd.DataFrame) -> list[dict]:
    """One entry per ok record with a curve: its identity, training facts, points and the rival to beat.

    ``board`` is ``leaderboard.frame(records)`` (one row per record, labels and statuses as the tables show them).
    """
    out = []
    for r in records:
        points = r.details.get("curve") if r.status == "ok" else None
        if not points:
            continue
        same = board[(board["model"] == r.model["name"]) & (board["suite"] == r.suite["name"])
                     & (board["target"] == r.target_ratio) & (board["seed"] == r.seed)]
        others = same[(same["status"] == "ok") & (same["method"] != DENSE)
                      & (same["method"].map(_base) != r.method) & same["ppl"].notna()]
        rival = others.loc[others["ppl"].idxmin()] if len(others) else None
        train, data = r.details.get("train") or {}, r.details.get("train_data") or {}
        close = r.metrics.get("closeness") or {}
        out.append({
            "model": r.model["name"], "suite": r.suite["name"], "method": r.method, "target": r.target_ratio,
            "seed": r.seed, "device": r.environment.get("hardware", {}).get("device_name")
            or r.environment.get("hardware", {}).get("device"),
            "autocast": train.get("autocast"), "tokens": r.cost.get("train_tokens"),
            "tokens_per_s": train.get("tokens_per_second"), "train_data": data.get("train_data"),
            "passes": data.get("passes"), "corpus": data.get("corpus"), "corpus_tokens": data.get("corpus_tokens"),
            "documents": data.get("documents"), "lr": train.get("lr"),
            "lr_schedule": (train.get("lr_schedule") or {}).get("shape", "constant"),  # older records: constant
            "dense_ppl": r.details.get("curve_dense_ppl"),
            "heldout_windows": (r.details.get("kl_windows") or {}).get("heldout"),
            "points": points, "ppl": r.metrics.get("perplexity"), "kl": close.get("kl_mean"),
            "rival": None if rival is None else {"method": rival["method"], "ppl": rival["ppl"], "kl": rival["kl"]},
        })
    return sorted(out, key=lambda c: (c["model"], c["suite"], c["method"], c["target"], c["seed"], c["tokens"] or 0,
                                      c["corpus"] or "", c["lr_schedule"], c["lr"] or 0))


def _n(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:,.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"


def _tokens(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


#: the learning rate a run trains at unless told otherwise (DeltaLLM's default); other rates are named in titles
DEFAULT_LR = 1e-3


def _budget(c: dict) -> str:
    """``1M tokens``, ``1M tokens of mix-en`` for a run on a named corpus, and ``, lr 1e-3 cosine`` after it for a
    run whose learning rate was not the default's constant 1e-3 (so two schedules of one budget are told apart)."""
    text = f"{_tokens(c['tokens'])} tokens" + (f" of {c['corpus']}" if c.get("corpus") else "")
    shape, lr = c.get("lr_schedule") or "constant", c.get("lr")
    if shape != "constant" or (lr is not None and lr != DEFAULT_LR):
        text += f", lr {lr:g} {shape}" if lr is not None else f", lr {shape}"
    return text


def title(c: dict) -> str:
    return (f"{c['method']} at {100 * c['target']:.0f} %, seed {c['seed']}, {_budget(c)} "
            f"({c['device'] or 'unknown device'}, autocast {c['autocast'] or '-'})")


def _coverage(c: dict) -> str:
    """How much of its corpus a run read: ``, 9.5 % of one pass (no token seen twice)`` or ``, 5.4 passes``.

    From the tokens trained on and the corpus's size (its tokens plus one EOS per document, as packed); a record
    without the size gives the passes begun, a whole number.
    """
    tokens, size = c.get("tokens"), c.get("corpus_tokens")
    if tokens and size:
        share = tokens / (size + (c.get("documents") or 0))
        return f", {100 * share:.2g} % of one pass (no token seen twice)" if share <= 1 else f", {share:.1f} passes"
    passes = c.get("passes")
    return f", {passes} pass{'es' if passes != 1 else ''} begun" if passes else ""


def verdict(c: dict) -> str:
    """The run's final figures on the suite's windows against the best other method's."""
    mine = f"Final on the suite's perplexity windows: perplexity {_n(c['ppl'])}, KL {_n(c['kl'])}"
    data = f"trained on {c['train_data']}"
    if c.get("corpus"):
        data += f" {c['corpus']} ({_tokens(c.get('corpus_tokens'))} distinct tokens)"
    data += _coverage(c)
    speed = f", {_n(c['tokens_per_s'], 0)} tokens/s" if c.get("tokens_per_s") else ""
    if c["rival"] is None:
        return f"{mine}; {data}{speed}; no other method at this ratio and seed to compare with."
    r = c["rival"]
    ahead = c["ppl"] is not None and c["ppl"] < r["ppl"]
    return (f"{mine}; best other method here: {r['method']}, perplexity {_n(r['ppl'])}, KL {_n(r['kl'])} "
            f"({'behind it' if not ahead else 'ahead of it'}); {data}{speed}.")


def table(c: dict) -> pd.DataFrame:
    return pd.DataFrame({"tokens": [f"{p['tokens']:,}" for p in c["points"]],
                         "held-out KL": [_n(p.get("kl_heldout"), 3) for p in c["points"]],
                         "held-out ppl": [_n(p.get("ppl")) for p in c["points"]],
                         "training s": [_n(p.get("seconds"), 0) for p in c["points"]]})


INTRO = ("Runs that recorded a training curve: the model as it stood at each token count, measured on the "
         "method's held-out windows (KL to the dense model; perplexity, the dense model's given beside). A point "
         "early in a long run is measured while the run's schedule still ramps, so it is not what that budget "
         "alone would give; the last point is the run's result.")


def _heldout(c: dict) -> str:
    """What the table's held-out figures were measured on, and the dense model's perplexity there."""
    n = c.get("heldout_windows")
    where = f"{n} held-out calibration window{'s' if n != 1 else ''}" if n else "the held-out windows"
    dense = f", where the dense model's perplexity is {_n(c['dense_ppl'])}" if c.get("dense_ppl") else ""
    small = "; a small sample: compare runs by the suite's figures" if n and n < 8 else ""
    return f" The table's figures are on {where}{dense}{small}."


def markdown(curves: list[dict]) -> str:
    """The "What training buys" section of ``leaderboard.md``; empty when no record has a curve."""
    if not curves:
        return ""
    parts = ["## What training buys", "", INTRO, ""]
    for c in curves:
        points = table(c).to_markdown(index=False, disable_numparse=True, colalign=["right"] * 4)
        parts += [f"### {c['model']} — suite `{c['suite']}` — {title(c)}", "", points, "", f"{verdict(c)}{_heldout(c)}", ""]
    return "\n".join(parts)


def draw(ax: Axes, curves: list[dict]) -> None:
    """Held-out KL against training tokens (symlog, so the untrained point at 0 shows), one line per run."""
    for i, c in enumerate(curves):
        pts = [p for p in c["points"] if p.get("kl_heldout") is not None]
        ax.plot([p["tokens"] for p in pts], [p["kl_heldout"] for p in pts], marker="o", color=f"C{i % 10}",
                label=f"{c['method']} {100 * c['target']:.0f} % s{c['seed']}, {_budget(c)} "
                      f"({c['device'] or '?'})")  # two runs of one cell differ by their budget or corpus
    ax.set_xscale("symlog", linthresh=1e4)
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (symlog)")
    ax.set_ylabel("held-out KL to the dense model (nats, log)")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize="small")
