"""Per-window figures for records written before they were kept, read back from each cell's checkpoint.

``bench compare`` pairs perplexity, KL and top-1 agreement over the perplexity windows; records written before the
evaluator kept every window's figures have only the means. ``bench run ... --rescore`` reloads the checkpoint of
such a reused cell, scores the same windows against the same dense reference, and adds the per-window lists only
when the means it finds equal the record's (``REL_TOL``): a checkpoint that no longer reproduces its record is
reported and left alone. Nothing else in the record changes; ``details.rescored`` says when and by which code.
"""

from __future__ import annotations

import math
from pathlib import Path

from bench import blockwise, checkpoint
from bench.adapters import get_adapter
from bench.compare import recorded_windows_sha
from bench.errors import UserError
from bench.evaluate import closeness
from bench.evaluate.perplexity import perplexity
from bench.evaluate.suite_eval import ppl_batch, suite_windows
from bench.records import Record, git_commit, now
from bench.suites import Suite

#: the per-window lists, by the metrics section that holds them
FIELDS = (("perplexity_detail", "window_nll"), ("closeness", "window_kl"), ("closeness", "window_top1"))
#: how close the checkpoint's means must come to the record's (float32 sums in another order differ at ~1e-7)
REL_TOL = 1e-4


def needs(rec: Record) -> bool:
    """A complete record that lacks a per-window figure it could have (no KL lists without a KL)."""
    return rec.status == "ok" and any(key not in (rec.metrics.get(where) or {}) for where, key in FIELDS
                                      if where != "closeness" or "kl_mean" in (rec.metrics.get("closeness") or {}))


def _close(new: float, old, what: str) -> str | None:
    if not isinstance(old, int | float) or not math.isclose(new, old, rel_tol=REL_TOL, abs_tol=1e-9):
        return f"{what} {new:.6g} against the record's {old}"
    return None


def rescore(rec: Record, reference: closeness.Reference, suite: Suite, placement) -> dict:
    """Add the per-window figures to ``rec`` (in memory) from its checkpoint; returns what was checked. Raises
    UserError, leaving ``rec`` untouched, when there is no usable checkpoint or it does not reproduce the record."""
    folder = Path(rec.checkpoint) if rec.checkpoint else None
    if folder is None or not folder.is_dir():
        raise UserError(f"no checkpoint of this cell is kept ({rec.checkpoint or 'the run used --no-save'}); "
                        "recompute it with --force")
    meta = checkpoint.read_meta(folder)
    if meta.get("record_key") != rec.key:
        raise UserError(f"{folder} holds another cell (key {meta.get('record_key')}, the record's {rec.key}); "
                        "recompute it with --force")
    model, tokenizer = checkpoint.load(folder, device="cpu" if placement.offload else str(placement.device))
    adapter = get_adapter(model)
    windows = suite_windows(tokenizer, adapter, suite)
    sha = closeness.windows_sha(windows)
    recorded = recorded_windows_sha(rec)
    if sha != reference.windows_sha or (recorded and recorded != sha):
        raise UserError(f"the suite's perplexity windows ({sha}) are not the ones the record was scored on "
                        f"({recorded}); recompute it with --force")
    tracker = closeness.Tracker(reference)
    with blockwise.streaming(model, adapter, placement):
        ppl = perplexity(model, windows, batch_size=ppl_batch(suite), observe=tracker)
    close = tracker.summary()
    old_close = rec.metrics.get("closeness") or {}
    has_close = "kl_mean" in old_close  # records from before closeness was measured: perplexity only
    wrong = [w for w in (_close(ppl["perplexity"], rec.metrics.get("perplexity"), "perplexity"),
                         *((_close(close["kl_mean"], old_close.get("kl_mean"), "KL"),
                            _close(close["top1_agreement"], old_close.get("top1_agreement"), "top-1 agreement"))
                           if has_close else ())) if w]
    if wrong:
        raise UserError(f"its checkpoint does not reproduce the record ({'; '.join(wrong)}); nothing added; "
                        "recompute it with --force")
    rec.metrics.setdefault("perplexity_detail", {})["window_nll"] = ppl["window_nll"]
    if has_close:
        rec.metrics["closeness"] = old_close | {"window_kl": close["window_kl"], "window_top1": close["window_top1"]}
    checked = {"at": now(), "git_commit": git_commit(), "checkpoint": str(folder),
               "fields": [f"{where}.{key}" for where, key in FIELDS if has_close or where != "closeness"],
               "perplexity": ppl["perplexity"], "kl_mean": close["kl_mean"],
               "top1_agreement": close["top1_agreement"], "device": str(placement.device)}
    rec.details["rescored"] = checked
    return checked
