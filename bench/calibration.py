"""Calibration data and the activation statistics that several methods share.

Statistics are memoised on the :class:`Calibration` object, so SVD-LLM and Basis Sharing in one run
read the same Gram matrices from one pass over the dense model. With a ``cache_dir`` and a ``model_key``
they are also stored on disk (safetensors) under a key hashing the model, the calibration tokens and the
statistic's definition, so a later command reuses them; ``memo["log"]`` says where each one came from.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import blockwise, integrity
from bench.claims import Claims
from bench.placement import gram_bytes, of

#: bump when a statistic's definition changes, so stored ones are not reused
STATS_VERSION = 3  # 2: files carry a content digest; 3: and what computing the statistic cost (COST_KEY)
#: the tensor beside a stored statistic holding the seconds its computation took, so a cell that reuses it can
#: count that cost as its own (compression time must not depend on which cell of a run came first)
COST_KEY = "_compute_seconds"
#: seconds between looks at a statistic another process is computing
WAIT_POLL = 1.0
_CLAIMS: Claims | None = None

#: statistics larger than this are kept in memory only (a 7B model's Grams are tens of GB)
MAX_CACHE_BYTES = 8 * 2**30

Progress = Callable[[int], None] | None


@dataclass
class Calibration:
    """Token windows [n_samples, seq_len] drawn from the calibration split, plus how they were made."""

    tokens: torch.Tensor
    seed: int = 0
    source: str = ""
    batch_size: int = 4
    memo: dict = field(default_factory=dict)
    #: where statistics are stored between commands (None: memory only)
    cache_dir: Path | None = None
    #: identifies the dense model the statistics come from (weights, dtype, device); empty: no disk cache
    model_key: str = ""
    #: the model's tokenizer, for a method that reads text of its own (DeltaLLM's training corpus); None in tests
    tokenizer: Any = None
    #: where the work runs and whether blocks are offloaded (bench.placement.Placement); None: the model's device
    placement: Any = None
    #: where a long method step reports how far it has got (one short line, every few seconds); None: nowhere
    report: Callable[[str], None] | None = None

    @property
    def n_samples(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def n_tokens(self) -> int:
        return self.n_samples * self.seq_len

    def batches(self, device: torch.device | str) -> Iterator[torch.Tensor]:
        for i in range(0, self.n_samples, self.batch_size):
            yield self.tokens[i : i + self.batch_size].to(device)

    def stats_path(self, name: str, adapter) -> Path | None:
        """Where statistic ``name`` of this model and these tokens is stored, or None without a disk cache."""
        if self.cache_dir is None or not self.model_key:
            return None
        tokens = hashlib.sha256(self.tokens.cpu().numpy().tobytes()).hexdigest()
        spec = {"stat": name, "version": STATS_VERSION, "model": self.model_key, "tokens": tokens,
                "shape": list(self.tokens.shape), "family": adapter.family, "blocks": adapter.num_blocks,
                "slots": [(s.kind, s.role) for s in adapter.slots]}
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]
        return Path(self.cache_dir) / f"{name}-{key}.safetensors"

    def log(self, name: str, source: str, seconds: float = 0.0, cost: float | None = None, **extra) -> None:
        """Say where statistic ``name`` came from and what getting it cost here (``seconds``; what a cache hit
        saves is the computing cell's seconds minus its own) and what computing it cost (``compute_seconds``:
        these ``seconds`` when computed here, else the computing cell's, remembered in memory or read with the
        file as ``cost``; None for a file stored before costs were kept); ``extra``: how (engine, streamed)."""
        costs = self.memo.setdefault("cost", {})
        if source == "computed":
            costs[name] = cost = seconds
        elif source == "memory":
            cost = costs.get(name)
        elif cost is not None:
            costs[name] = cost
        self.memo.setdefault("log", []).append({"statistic": name, "source": source, "seconds": round(seconds, 3),
                                                "compute_seconds": None if cost is None else round(cost, 3),
                                                **extra})

    def describe(self) -> dict:
        return {"source": self.source, "n_samples": self.n_samples, "seq_len": self.seq_len,
                "seed": self.seed, "tokens": self.n_tokens}


def reused_cost(log: list[dict]) -> float | None:
    """The compute seconds of the statistics a :meth:`Calibration.log` shows reused (from memory or disk) instead of
    computed: 0 when none was; None when one of them does not say (stored before costs were kept)."""
    reused = [e for e in log if e.get("source") != "computed"]
    if any(e.get("compute_seconds") is None for e in reused):
        return None
    return sum(e["compute_seconds"] for e in reused)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def hooks(handles: list):
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def forward_all(model: nn.Module, calib: Calibration, progress: Progress = None) -> None:
    """Run every calibration batch through ``model`` (hooks do the collecting)."""
    model.eval()
    device = model_device(model)  # with an offloaded model (blockwise.streaming) the embeddings' device
    for batch in calib.batches(device):
        model(input_ids=batch, use_cache=False)
        if progress:
            progress(int(batch.shape[0]))


#: with a statistics cache, whole-model Grams up to this size are kept for the run (shared by methods, stored on disk);
#: larger ones, or any without a cache, are streamed block by block, each block's freed with it (SmolLM2-135M's Grams:
#: 0.8 GB; a 7B model's: 44 GB)
KEEP_STATS_BYTES = 2 * 2**30


def collect_grams(model: nn.Module, adapter, calib: Calibration, progress: Progress = None) -> dict:
    """G = sum over tokens of x x^T (float64) for the input of every linear role of every block.

    Returns ``{(block_index, role): G}``, every block's at once (see :func:`block_grams` for one block at a time).
    Linears of one role (q, k, v) share their input, so one statistic serves them all.
    """
    if "grams" in calib.memo:
        calib.log("grams", "memory")
        return calib.memo["grams"]
    t0 = time.perf_counter()
    placement = of(calib, model)
    path = calib.stats_path("grams", adapter)
    stored = _load(path, placement.home)
    if stored is not None:
        cost = _pop_cost(stored)
        grams = {(int(k.split(".")[0]), k.split(".", 1)[1]): v for k, v in stored.items()}
        calib.memo["grams"] = grams
        calib.log("grams", f"disk {path}", time.perf_counter() - t0, cost)
        return grams
    try:
        if placement.engine == "whole":
            grams = _whole_model_grams(model, adapter, calib, progress)
        else:
            grams = {}
            for step in blockwise.walk(model, adapter, list(calib.batches(placement.device)), placement, ["grams"]):
                for b, stats in step.stats.items():
                    grams.update({(b, role): g.to(placement.home) for role, g in stats["grams"].items()})
        calib.memo["grams"] = grams
        seconds = time.perf_counter() - t0
        calib.log("grams", "computed", seconds, engine=placement.engine, kept=True)
        _store(path, {f"{b}.{role}": g for (b, role), g in grams.items()}, seconds)
    finally:
        _release(path)
    return grams


def block_grams(model: nn.Module, adapter, calib: Calibration, groups=1) -> Iterator[blockwise.Step]:
    """Each group of consecutive blocks on the work device with its blocks' Grams: ``step.stats[b]["grams"][role]``.

    With a statistics cache (``calib.cache_dir``: a run whose cells and later commands can reuse them), Grams of a
    whole model up to :data:`KEEP_STATS_BYTES` come from :func:`collect_grams` (memoised, stored on disk, shared with
    other methods); otherwise they are computed for one group at a time and freed with it. Either way the
    method sees the dense model's Grams and may edit each group's blocks in its step.
    """
    placement = of(calib, model)
    shareable = calib.cache_dir is not None and gram_bytes(adapter) * adapter.num_blocks <= KEEP_STATS_BYTES
    if placement.engine == "whole" or "grams" in calib.memo or shareable:
        grams = collect_grams(model, adapter, calib)
        for group in blockwise.partition(adapter.num_blocks, groups):
            with blockwise.at_work(placement, adapter, group):
                yield blockwise.Step(blocks=group, stats={b: {"grams": {r: grams[(b, r)] for r in adapter.roles()}}
                                                          for b in group})
        return
    t0 = time.perf_counter()
    yield from blockwise.walk(model, adapter, list(calib.batches(placement.device)), placement, ["grams"], groups)
    calib.log("grams", "computed", time.perf_counter() - t0, engine=placement.engine,
              kept=False)  # streamed: each block's freed with it (too large to keep)


def _whole_model_grams(model: nn.Module, adapter, calib: Calibration, progress: Progress) -> dict:
    """The reference path: one whole-model forward per batch with hooks on every block (all Grams alive at once)."""
    grams: dict = {}

    def make_hook(key):
        def hook(_module, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            g = (x.T @ x).double()
            grams[key] = grams[key] + g if key in grams else g

        return hook

    handles = []
    for b in range(adapter.num_blocks):
        for role in adapter.roles():
            first = next(s for s in adapter.slots if s.role == role)
            handles.append(adapter.linear(b, first.kind).register_forward_pre_hook(make_hook((b, role))))
    with hooks(handles), blockwise.streaming(model, adapter, of(calib, model)):
        forward_all(model, calib, progress)
    return grams


def collect_block_cosines(model: nn.Module, adapter, calib: Calibration, progress: Progress = None,
                          segment: int | None = None) -> torch.Tensor:
    """Mean over tokens of cos(h_in, h_out) for every block (the blocks' own input and output, not
    ``output_hidden_states``, whose last entry Hugging Face passes through the final norm).

    ``segment``: score each window as independent pieces of this many tokens (each its own forward, positions
    from 0), as ShortGPT's official run does with 256; None or 0 (or a length >= the window) = whole windows.
    The segment length is part of the statistic's name, so its memo and disk cache never mix the two.
    """
    whole = not segment or segment >= calib.seq_len
    name = "block_cosines" if whole else f"block_cosines_seg{segment}"
    if name in calib.memo:
        calib.log(name, "memory")
        return calib.memo[name]
    t0 = time.perf_counter()
    path = calib.stats_path(name, adapter)
    stored = _load(path, "cpu")
    if stored is not None:
        calib.memo[name] = stored["cosines"]
        calib.log(name, f"disk {path}", time.perf_counter() - t0, _pop_cost(stored))
        return stored["cosines"]
    placement = of(calib, model)
    pieces = [calib] if whole else [Calibration(tokens=group, batch_size=calib.batch_size)
                                    for group in _segments(calib.tokens, int(segment))]
    try:
        if placement.engine == "whole":
            sums, counts = _whole_model_cosines(model, adapter, pieces, placement, progress)
        else:
            sums = torch.zeros(adapter.num_blocks, dtype=torch.float64)
            counts = torch.zeros(adapter.num_blocks, dtype=torch.float64)
            batches = [b for part in pieces for b in part.batches(placement.device)]
            for step in blockwise.walk(model, adapter, batches, placement, ["block_cosine"]):
                for i, stats in step.stats.items():
                    sums[i], counts[i] = stats["block_cosine"]
        result = sums / counts.clamp(min=1)
        calib.memo[name] = result
        seconds = time.perf_counter() - t0
        calib.log(name, "computed", seconds, engine=placement.engine)
        _store(path, {"cosines": result}, seconds)
    finally:
        _release(path)
    return result


def _whole_model_cosines(model: nn.Module, adapter, pieces: list[Calibration], placement,
                         progress: Progress) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference path: hooks on every block during whole-model forwards."""
    n = adapter.num_blocks
    sums = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.float64)
    inputs: dict[int, torch.Tensor] = {}

    def pre(i):
        def hook(_m, args, kwargs):
            inputs[i] = adapter.block_input(args, kwargs).detach()

        return hook

    def post(i):
        def hook(_m, _args, _kwargs, output):
            h_in = inputs.pop(i).float()
            h_out = adapter.block_output(output).detach().float()
            cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)
            sums[i] += float(cos.double().sum())
            counts[i] += cos.numel()

        return hook

    handles = []
    for i, block in enumerate(adapter.blocks()):
        handles.append(block.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(block.register_forward_hook(post(i), with_kwargs=True))
    with hooks(handles), blockwise.streaming(model, adapter, placement):
        for part in pieces:
            forward_all(model, part, progress)
    return sums, counts


def _segments(tokens: torch.Tensor, segment: int) -> list[torch.Tensor]:
    """Windows [n, T] cut into consecutive pieces of ``segment`` tokens: [n * (T // segment), segment], plus the
    [n, T % segment] tails when T is not a multiple (a stride loop's last, shorter piece)."""
    full = tokens.shape[1] // segment * segment
    groups = [tokens[:, :full].reshape(-1, segment)]
    if full < tokens.shape[1]:
        groups.append(tokens[:, full:])
    return groups


def _load(path: Path | None, device) -> dict | None:
    """A stored statistic, or None when absent; a file failing its digest is moved aside and recomputed.

    None comes with this process holding the statistic's claim (released by :func:`_release`), so processes
    sharing the cache (parallel cells, Ray workers) compute it once: the others wait for the file.
    """
    global _CLAIMS
    while True:
        stored = integrity.load_tensors(path, device)
        if stored is not None or path is None:
            return stored
        _CLAIMS = _CLAIMS or Claims()
        try:
            if _CLAIMS.acquire(path):
                stored = integrity.load_tensors(path, device)  # written between the look and the claim
                if stored is not None:
                    _CLAIMS.release(path)
                return stored
        except OSError:  # a read-only cache: compute here, memory only
            return None
        time.sleep(WAIT_POLL)


def _release(path: Path | None) -> None:
    if path is not None and _CLAIMS is not None:
        _CLAIMS.release(path)


def _pop_cost(stored: dict[str, torch.Tensor]) -> float | None:
    """The seconds computing a stored statistic took (removed from ``stored``); None for an older file."""
    cost = stored.pop(COST_KEY, None)
    return None if cost is None else float(cost)


def _store(path: Path | None, tensors: dict[str, torch.Tensor], seconds: float) -> None:
    """Write atomically with a content digest and the ``seconds`` computing it took; too large, a full disk or a
    read-only cache: memory only."""
    try:
        if path is None or sum(t.numel() * t.element_size() for t in tensors.values()) > MAX_CACHE_BYTES:
            return
        integrity.save_tensors(path, tensors | {COST_KEY: torch.tensor(seconds, dtype=torch.float64)})
    finally:
        _release(path)  # the file is there (or never will be): processes waiting on the claim go on
