"""LaCo, Layer Collapse: merge runs of consecutive blocks into one (arXiv 2402.11187).

Merge of base block l with the next m blocks, for every weight and bias of the attention and MLP linears:
- ``merge=official`` (default): the official notebook's in-place update ``base += theta_{l+k} - base`` for
  k = 1..m leaves the base holding the LAST absorbed block's linears; it is what the published code measures.
- ``merge=paper``: the paper's RDSC formula theta_l* = theta_l + sum_{k=1..m} (theta_{l+k} - theta_l).
Norms (block norms and any QK-norm inside attention) stay the base's. The absorbed blocks are removed.

A merge stands when the similarity between the dense and the merged model's final hidden states is > T. "Final
hidden state" is the final norm's output (what Hugging Face returns as the last hidden state and the LM head
reads). ``similarity=sentence`` (official): one cosine per calibration window between the flattened
[tokens x hidden] states, averaged over windows; ``similarity=token``: the mean over tokens of per-token cosines.

Search as in the notebook: the first base is H - C (H the highest block index), a trial absorbs the next C - 1
blocks (fewer at the top), an accepted merge moves the base down I, a rejected one by 1, down to ``lowest_layer``.
Budget: the solver fixes n blocks to remove and the search stops once n are gone; a merge that would overshoot
absorbs fewer blocks, so exactly n go. The notebook makes one pass and takes what it gets. Here, if a pass stops
short of n, the threshold is lowered by at least ``relax_step`` and the search goes again; when a pass accepts
nothing, T drops just below its best rejected similarity, because the unchanged model would give the same
similarities again. So each pass either removes a block or guarantees the next one does: at most 2 n + 1 passes.
Every trial (accepted or not) with its similarity and T is recorded. With ``relax_step=0`` the search stops after
one pass, and the record shows the shortfall.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from bench import blockwise, structure
from bench.adapters.base import get_module
from bench.calibration import Calibration, hooks, model_device
from bench.errors import UserError
from bench.placement import of
from bench.registry import CompressionInfo, Method, Solution, register
from methods._layerdrop import block_budget, cosine_sum, skipping

MERGES = ("official", "paper")
SIMILARITIES = ("sentence", "token")


def merge_tensors(adapter, base: int, merged: list[int], how: str = "paper") -> dict[str, torch.Tensor]:
    """Merged values for every linear weight / bias of block ``base``'s attention and MLP, keyed by path in the block.

    ``how="paper"``: RDSC, summed in float64, then cast back to the parameter's dtype. ``how="official"``: the
    notebook's in-place update, whose result is the last absorbed block's tensor exactly.
    """
    blocks = adapter.blocks()
    out = {}
    for branch in (adapter.attn_path, adapter.mlp_path):
        for mod_path, module in get_module(blocks[base], branch).named_modules(prefix=branch):
            if not isinstance(module, nn.Linear):
                continue
            for pname, p in module.named_parameters(recurse=False):
                key = f"{mod_path}.{pname}"
                if how == "official":
                    out[key] = blocks[merged[-1]].get_parameter(key).detach().clone()
                    continue
                theta = p.detach().double()
                total = theta.clone()
                for k in merged:
                    total += blocks[k].get_parameter(key).detach().double() - theta
                out[key] = total.to(p.dtype)
    return out


def write_params(block: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copy ``values`` into the block's existing tensors (weights only; no structural change)."""
    with torch.no_grad():
        for key, value in values.items():
            block.get_parameter(key).copy_(value)


@torch.inference_mode()
def final_states(model: nn.Module, adapter, windows: torch.Tensor, batch_size: int,
                 resume: tuple[int, list[torch.Tensor]] | None = None) -> list[torch.Tensor]:
    """The model's last hidden state (output of the final norm, what the LM head reads) per batch, on CPU.

    With ``resume=(b, inputs)`` the blocks below b are bypassed and block b reads the cached per-batch ``inputs``
    instead: the same result when those blocks are unchanged since the inputs were taken, at a fraction of the cost.
    """
    captured: list[torch.Tensor] = []
    device = model_device(model)
    handles = [adapter.final_norm().register_forward_hook(lambda _m, _a, out: captured.append(out.detach().cpu()))]
    below: list[int] = []
    if resume is not None:
        start, cached = resume
        feed = iter(cached)

        def feed_input(_m, args, kwargs):
            x = next(feed).to(device)
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

        handles.append(adapter.block(start).register_forward_pre_hook(feed_input, with_kwargs=True))
        below = list(range(start))
    with hooks(handles), skipping(adapter, below):
        for i in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[i : i + batch_size].to(device), use_cache=False)
    return captured


@torch.inference_mode()
def block_inputs(model: nn.Module, adapter, windows: torch.Tensor, batch_size: int) -> list[list[torch.Tensor]]:
    """The residual stream entering every block, per batch, on CPU."""
    inputs: list[list[torch.Tensor]] = [[] for _ in range(adapter.num_blocks)]
    handles = [block.register_forward_pre_hook(
        lambda _m, args, kwargs, i=i: inputs[i].append(adapter.block_input(args, kwargs).detach().cpu()),
        with_kwargs=True) for i, block in enumerate(adapter.blocks())]
    device = model_device(model)
    with hooks(handles):
        for i in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[i : i + batch_size].to(device), use_cache=False)
    return inputs


def mean_cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Mean over all tokens of cos(a, b)."""
    total, count = 0.0, 0
    for x, y in zip(a, b, strict=True):
        s, n = cosine_sum(x, y)
        total, count = total + s, count + n
    return total / count


def sentence_cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Mean over windows of cos(flattened a, flattened b), each window's [tokens x hidden] states one vector."""
    cos = [torch.nn.functional.cosine_similarity(x.double().flatten(1), y.double().flatten(1), dim=-1)
           for x, y in zip(a, b, strict=True)]
    return float(torch.cat(cos).mean())


@register
class LaCo(Method):
    name = "laco"
    title = "LaCo (layer collapse by RDSC merging)"
    paper = "arXiv 2402.11187"
    summary = ("Merges runs of consecutive blocks into one (official code: the base takes the last absorbed "
               "block's linears; paper: base + sum of differences), top-down, keeping a merge only while the final "
               "hidden states stay close to the dense model's.")
    coarse = True

    @dataclass
    class Knobs:
        #: C: blocks per merge, base included (the paper's Llama-2-7B setting)
        span: int = 4
        #: I: how far down the base moves after an accepted merge
        interval: int = 2
        #: T: a merge stands when the similarity of dense and merged final hidden states is above this
        threshold: float = 0.65
        #: L: lowest block index that may be a base (blocks below it are never touched; the notebook's is 0)
        lowest_layer: int = 0
        #: official: the base ends holding the last absorbed block's linears (published code); paper: RDSC sum
        merge: str = "official"
        #: sentence: cos of flattened [tokens x hidden] per window, averaged (official); token: per-token mean
        similarity: str = "sentence"
        #: when a top-down pass ends short of the budget, lower T by at least this and search again; 0 = stop short
        relax_step: float = 0.05
        #: calibration windows used for the similarity (the paper uses a few sentences); 0 = all
        windows: int = 8

    def _check(self, adapter) -> None:
        k = self.knobs
        if k.span < 2 or k.interval < 1:
            raise UserError("laco.span must be >= 2 (base + at least one block) and laco.interval >= 1")
        if not 0 <= k.lowest_layer < adapter.num_blocks - 1:
            raise UserError(f"laco.lowest_layer must be between 0 and {adapter.num_blocks - 2}")
        if not math.isfinite(k.threshold):
            raise UserError(f"laco.threshold={k.threshold} must be a finite number (a cosine, e.g. 0.65)")
        if not (math.isfinite(k.relax_step) and k.relax_step >= 0):
            raise UserError(f"laco.relax_step={k.relax_step} must be a finite number >= 0 (e.g. 0.05)")
        if k.merge not in MERGES:
            raise UserError(f"laco.merge={k.merge!r}: choose one of {', '.join(MERGES)}")
        if k.similarity not in SIMILARITIES:
            raise UserError(f"laco.similarity={k.similarity!r}: choose one of {', '.join(SIMILARITIES)}")

    def solve(self, adapter, ratio: float) -> Solution:
        """n blocks to remove, closest to ``ratio``; at most all blocks above ``lowest_layer`` can be absorbed."""
        self._check(adapter)
        count = block_budget(adapter, ratio, keep=self.knobs.lowest_layer + 1)
        return Solution(knobs={"blocks": count.counts["blocks"]}, predicted_params=count.params,
                        notes=count.notes + "; which blocks merge is decided by the similarity search "
                        "(the count is met exactly unless relax_step=0 and the threshold stops the search short)")

    def compress(self, model: nn.Module, adapter, calibration: Calibration, solution: Solution) -> CompressionInfo:
        """Top-down passes of the paper's search until the solver's count is removed (threshold relaxed if allowed)."""
        self._check(adapter)
        k = self.knobs
        target = int(solution.knobs["blocks"])
        windows = calibration.tokens[: k.windows] if k.windows > 0 else calibration.tokens
        with blockwise.streaming(model, adapter, of(calibration, model)):  # offloaded: one block on the device at once
            search, passes = self._search(model, adapter, windows, calibration.batch_size, target)
        what = {"sentence": "one cos per window of the flattened [tokens x hidden] states, averaged over windows",
                "token": "mean over tokens of the per-token cos"}[k.similarity]
        details = {"merges": search.merges, "trials": search.trials, "passes": passes, "removed": search.removed,
                   "target_removed": target, "merge": k.merge, "similarity": k.similarity,
                   "similarity_definition": f"{what}; final norm's output (LM-head input), dense vs merged",
                   "calibration_windows": int(windows.shape[0])}
        if search.removed < target:
            details["shortfall"] = target - search.removed
        return CompressionInfo(details=details)

    def _search(self, model: nn.Module, adapter, windows: torch.Tensor, batch_size: int,
                target: int) -> tuple[Search, list[dict]]:
        k = self.knobs
        search = Search(model, adapter, windows, batch_size, k.merge, k.similarity)
        threshold, passes = k.threshold, []
        for _ in range(2 * target + 1):  # each pass removes a block, or lowers T so that the next one does
            if search.removed >= target:
                break
            accepted, best_rejected = search.run_pass(k, threshold, target)
            passes.append({"threshold": threshold, "accepted": accepted})
            if search.removed >= target or k.relax_step == 0 or (accepted == 0 and not best_rejected >= -1.0):
                break
            threshold -= k.relax_step
            if accepted == 0:  # the unchanged model repeats its similarities: go just below the best rejected one
                threshold = min(threshold, math.nextafter(best_rejected, -math.inf))
        return search, passes


class Search:
    """The model being collapsed, the dense model's final states to compare with, and the merges so far."""

    def __init__(self, model: nn.Module, adapter, windows: torch.Tensor, batch_size: int, merge: str = "official",
                 similarity: str = "sentence"):
        self.model, self.adapter, self.windows, self.batch_size = model, adapter, windows, batch_size
        self.how, self.score = merge, sentence_cosine if similarity == "sentence" else mean_cosine
        self.dense = final_states(model, adapter, windows, batch_size)
        self.origin = list(range(adapter.num_blocks))  # dense index of every current block
        self.merges: list[dict] = []
        self.trials: list[dict] = []
        self.removed = 0
        self.inputs: list[list[torch.Tensor]] = []

    def run_pass(self, k: LaCo.Knobs, threshold: float, target: int) -> tuple[int, float]:
        """One top-down pass (paper Algorithm 1, notebook order); returns merges accepted and the best rejected similarity."""
        accepted, best_rejected = 0, -2.0
        # blocks below the base never change during a pass (merges only touch the base and above, and the base
        # only moves down), so their outputs are taken once per pass and each trial runs from the base up
        self.inputs = block_inputs(self.model, self.adapter, self.windows, self.batch_size)
        base = max(self.adapter.num_blocks - 1 - k.span, k.lowest_layer)  # the notebook's HIGHEST_LAY - MERGE_LAYERS
        while base >= k.lowest_layer and self.removed < target:
            # fewer than span - 1 when fewer blocks remain above the base or the budget would be overshot
            m = min(k.span - 1, self.adapter.num_blocks - 1 - base, target - self.removed)
            if m < 1:
                break
            absorbed = list(range(base + 1, base + 1 + m))
            sim = self.similarity(base, absorbed)
            self.trials.append({"base": base, "absorbed": absorbed, "dense_base": self.origin[base],
                                "dense_absorbed": [self.origin[i] for i in absorbed], "similarity": sim,
                                "threshold": threshold, "accepted": sim > threshold})
            if sim > threshold:
                self.merge(base, absorbed, sim, threshold)
                accepted += 1
                base -= k.interval
            else:
                best_rejected = max(best_rejected, sim) if math.isfinite(sim) else best_rejected
                base -= 1
        return accepted, best_rejected

    def similarity(self, base: int, absorbed: list[int]) -> float:
        """Mean cos of final states, dense vs the model with ``absorbed`` merged into ``base``; leaves the model as is."""
        block = self.adapter.block(base)
        merged = merge_tensors(self.adapter, base, absorbed, self.how)
        saved = {key: block.get_parameter(key).detach().clone() for key in merged}
        write_params(block, merged)
        try:
            with skipping(self.adapter, absorbed):
                merged_states = final_states(self.model, self.adapter, self.windows, self.batch_size,
                                             resume=(base, self.inputs[base]))
            return self.score(self.dense, merged_states)
        finally:
            write_params(block, saved)

    def merge(self, base: int, absorbed: list[int], sim: float, threshold: float) -> None:
        """Write the merged weights into ``base`` and remove ``absorbed`` through the structure log."""
        write_params(self.adapter.block(base), merge_tensors(self.adapter, base, absorbed, self.how))
        structure.apply(self.model, self.adapter, "remove_blocks", indices=absorbed)
        self.merges.append({"base": base, "absorbed": absorbed, "dense_base": self.origin[base],
                            "dense_absorbed": self.origin[base + 1 : base + 1 + len(absorbed)],
                            "similarity": sim, "threshold": threshold})
        del self.origin[base + 1 : base + 1 + len(absorbed)]
        self.removed += len(absorbed)
