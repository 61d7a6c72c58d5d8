"""``bench throughput``: what evaluation pushes through the model against the raw batched forward, in one run.

Zero-shot runs through lm-eval with ``SharedContextLM`` (and, with ``--stock``, with stock HFLM too); its
tokens (real and padded) are counted in the model's forward. The perplexity pass runs the suite's windows with
the closeness tracker, as every cell does. Then the same model runs full batches of random tokens for the raw
tokens/s. The ratio says how close evaluation comes to the hardware's speed. Each pass runs with freed host
memory kept for reuse, as a cell's evaluation does (:mod:`bench.hostheap`); ``--heap-compare`` runs the
SharedContextLM and perplexity passes a second time with the C library's default, right after, for the ratio.
"""

from __future__ import annotations

import functools
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from bench import hostheap
from bench.evaluate import closeness, zeroshot
from bench.evaluate.perplexity import perplexity


@dataclass
class Counter:
    """Wraps a model's forward: tokens it saw (attention mask sum), padded tokens, calls and seconds."""

    tokens: int = 0
    padded: int = 0
    calls: int = 0
    seconds: float = 0.0

    def wrap(self, model: torch.nn.Module):
        original = model.forward

        @functools.wraps(original)  # keeps the signature, which kv_cache_kwarg reads
        def forward(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            t0 = time.perf_counter()
            out = original(*args, **kwargs)
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            self.padded += ids.numel()
            self.tokens += real_tokens(mask, ids)
            return out

        model.forward = forward
        return original


def real_tokens(mask, ids: torch.Tensor) -> int:
    """Real (not padding) tokens of a forward: the 2-D mask's sum, or for a packed 4-D additive mask
    (``packing.attention_mask``, a dict of them per layer kind) the tokens that see another token or are seen by
    one; a pad sees only itself and is seen by none (a one-token document would count as padding)."""
    if mask is None:
        return ids.numel()
    if isinstance(mask, dict):
        mask = next(iter(mask.values()))
    if mask.dim() == 2:
        return int(mask[:, -ids.shape[1]:].sum())
    sees = mask[:, 0] == 0
    return int(((sees.sum(-1) > 1) | (sees.sum(-2) > 1)).sum())


def raw_forward(model: torch.nn.Module, vocab: int, batch: int, seq_len: int, repeats: int) -> float:
    """Tokens/s of full [batch, seq_len] forwards of random tokens, after one warm-up."""
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(next(model.parameters()).device)
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(input_ids=ids, use_cache=False)
        return repeats * ids.numel() / (time.perf_counter() - t0)


def timed(model: torch.nn.Module, run) -> dict:
    """Wall time of ``run()`` with the model's forwards counted (``Counter``), and the tokens/s that makes."""
    counter = Counter()
    original = counter.wrap(model)
    t0 = time.perf_counter()
    try:
        run()
    finally:
        model.forward = original
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "forward_s": counter.seconds, "tokens": counter.tokens, "padded_tokens": counter.padded,
            "forwards": counter.calls, "eval_tokens_per_s": counter.tokens / wall}


def measure(model, tokenizer, tasks: list[str], limit: int, stock: bool, windows: torch.Tensor | None = None,
            ppl_batch: int = 4, batch: int = 8, seq_len: int = 256, repeats: int = 3,
            heap_compare: bool = False) -> dict:
    """Zero-shot wall time and tokens for each backend, the perplexity pass (with the closeness tracker, as a
    cell runs it, ``ppl_batch`` windows a forward) over ``windows``, and the raw forward tokens/s measured before
    and after (their mean, so that a machine whose load changes during the run is not compared at one moment)."""
    zeroshot.prepare(tasks, limit)  # task loading and the document sample are paid once per process, not timed
    reference = None if windows is None else closeness.dense_reference(model, windows, ppl_batch, None, "throughput")
    raw_before = raw_forward(model, len(tokenizer), batch, seq_len, repeats)
    out = {}
    heaps = [("", hostheap.reuse_freed_pages)] + ([(SYSTEM, nullcontext)] if heap_compare else [])

    def under(name: str, run, which=heaps) -> None:
        for suffix, heap in which:
            with heap():
                out[name + suffix] = timed(model, run)

    for name, use_stock in ([("stock HFLM", True)] if stock else []) + [("SharedContextLM", False)]:
        under(name, lambda s=use_stock: zeroshot.zero_shot(model, tokenizer, tasks, limit, stock_lm=s),
              heaps[:1] if use_stock else heaps)
    if reference is not None:
        under("perplexity + closeness",
              lambda: perplexity(model, windows, batch_size=ppl_batch, observe=closeness.Tracker(reference)))
    out["host_heap"] = hostheap.policy()
    raw_after = raw_forward(model, len(tokenizer), batch, seq_len, repeats)
    out["raw_tokens_per_s"] = (raw_before + raw_after) / 2
    out["raw_spread"] = (raw_before, raw_after)
    return out


SYSTEM = " (system heap)"


def report(fig: dict) -> str:
    lines = [f"host heap: {fig['host_heap']}"] if "host_heap" in fig else []
    raw = fig["raw_tokens_per_s"]
    stock = fig.get("stock HFLM")
    for name, f in fig.items():
        if name in ("raw_tokens_per_s", "raw_spread", "host_heap"):
            continue
        lines.append(f"{name}: {f['wall_s']:.1f} s ({f['forward_s']:.1f} s in forward), {f['forwards']} forwards, {f['tokens']:,} tokens "
                     f"({f['padded_tokens']:,} with padding, {100 * f['tokens'] / max(f['padded_tokens'], 1):.0f} % "
                     f"useful); evaluation {f['eval_tokens_per_s']:.0f} tokens/s = "
                     f"{100 * f['eval_tokens_per_s'] / raw:.0f} % of raw")
        if stock is not None and name == "SharedContextLM":
            lines.append(f"  the same scores as stock HFLM in {f['wall_s'] / stock['wall_s']:.2f}x its time "
                         f"({f['tokens'] / stock['tokens']:.2f}x its tokens)")
        if name + SYSTEM in fig:
            lines.append(f"  freed pages reused: {f['wall_s'] / fig[name + SYSTEM]['wall_s']:.2f}x the time with "
                         "the system heap (below)")
    before, after = fig["raw_spread"]
    lines.append(f"raw batched forward: {raw:.0f} tokens/s (before {before:.0f}, after {after:.0f})")
    return "\n".join(lines)
