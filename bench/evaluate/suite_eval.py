"""One evaluation for every model: perplexity, zero-shot accuracy, memory and latency."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from bench import data, hostheap
from bench.budget import count_bytes, count_params
from bench.evaluate import closeness
from bench.evaluate.efficiency import PeakMemory, latency
from bench.evaluate.perplexity import perplexity
from bench.evaluate.zeroshot import mean_accuracy, zero_shot
from bench.suites import Suite


def suite_windows(tokenizer, adapter, suite: Suite) -> torch.Tensor:
    return data.perplexity_windows(tokenizer, suite.ppl_seq_len, suite.ppl_windows, add_bos=adapter.needs_bos)


def ppl_batch(suite: Suite) -> int:
    return max(1, suite.eval_batch_size // 2)


def dense_reference(model: nn.Module, tokenizer, adapter, suite: Suite, cache: Path | None,
                    model_key: str) -> closeness.Reference:
    """The dense model's next-token reference on the suite's perplexity windows (cached; see ``closeness``)."""
    return closeness.dense_reference(model, suite_windows(tokenizer, adapter, suite), ppl_batch(suite), cache, model_key)


def evaluate(model: nn.Module, tokenizer, adapter, suite: Suite, progress=None, seed: int = 1234,
             reference: closeness.Reference | None = None, dense: bool = False) -> dict:
    """All metrics of one model under ``suite``; ``progress(label)`` is told which step runs. With the dense
    model's ``reference``, also its closeness to the dense model (KL, top-1 agreement) on the same forward.
    For the ``dense`` model itself, a reference computed in this process already holds its perplexity and
    closeness from that same forward: they are taken from it instead of running the windows again."""
    step = progress or (lambda label: None)
    device = next(model.parameters()).device
    out: dict = {"params": count_params(model), "weight_bytes": count_bytes(model)}
    with PeakMemory(device) as mem, hostheap.reuse_freed_pages():
        step("perplexity")
        windows = suite_windows(tokenizer, adapter, suite)
        usable = reference is not None and reference.windows_sha == closeness.windows_sha(windows)
        if usable and dense and reference.dense_eval is not None:
            ppl = reference.dense_eval["perplexity"] | {"pass": "shared with the dense reference's forward"}
            out["closeness"] = reference.dense_eval["closeness"]
        else:
            tracker = closeness.Tracker(reference) if usable else None
            ppl = perplexity(model, windows, batch_size=ppl_batch(suite), observe=tracker)
            if tracker is not None:
                out["closeness"] = tracker.summary()
        out["perplexity"] = ppl["perplexity"]
        out["perplexity_detail"] = {k: v for k, v in ppl.items() if k != "perplexity"} | {
            "seq_len": suite.ppl_seq_len, "text": "packaged Wikipedia (exllamav2 wiki.utf8), test documents",
            "text_fingerprint": data.file_fingerprint(data.wiki_text_path())}
        if suite.tasks:
            step("zero-shot")
            zs = zero_shot(model, tokenizer, list(suite.tasks), suite.task_limit, batch_size=suite.eval_batch_size,
                           seed=seed)
            out["tasks"] = zs.pop("tasks")
            out["zero_shot_docs"] = {"tasks": zs.pop("docs")}  # moved to the side file by docs.write_beside
            out["mean_acc"] = mean_accuracy(out["tasks"])
            out["zero_shot_config"] = zs
    out["peak_memory_bytes"] = mem.peak_bytes
    out["peak_memory_source"] = mem.source
    out["eval_peak_device_bytes"], out["eval_peak_device_source"] = mem.device_peak_bytes, mem.device_source
    out["eval_peak_host_bytes"], out["eval_peak_host_source"] = mem.host_peak_bytes, mem.host_source
    step("latency")
    lat = latency(model, tokenizer, prompt_len=suite.latency_prompt, new_tokens=suite.latency_new_tokens,
                  repeats=suite.latency_repeats)
    out["prefill_ms"] = lat["prefill_ms"]
    out["decode_tokens_per_s"] = lat["decode_tokens_per_s"]
    out["latency_detail"] = {k: v for k, v in lat.items() if k not in ("prefill_ms", "decode_tokens_per_s")}
    return out


def is_finite_result(metrics: dict) -> bool:
    ppl = metrics.get("perplexity")
    return ppl is not None and math.isfinite(ppl)
