"""Shared pieces of the coarse methods (ShortGPT, LaCo, JointDrop): unit counting and the count solver.

A coarse method removes whole units (blocks or attention / MLP sub-layers). Each unit's size is counted
from its modules, so the budget alone fixes HOW MANY units go; calibration data only decides WHICH.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from bench.adapters.base import get_module
from bench.budget import count_params
from bench.errors import UserError


def unit_params(modules: Sequence[nn.Module]) -> int:
    """Unique parameters of a group of modules (a block, or one sub-layer's norm + module + post-norm)."""
    return count_params(nn.ModuleList(modules))


def block_sizes(adapter) -> list[int]:
    """Parameters of every block."""
    return [count_params(b) for b in adapter.blocks()]


def sublayer_sizes(adapter, which: str) -> list[int]:
    """Parameters of the ``which`` ("attn" | "mlp") sub-layer of every block: everything its branch uses."""
    paths = adapter.sublayer_paths(which)
    return [unit_params([get_module(b, p) for p in paths]) for b in adapter.blocks()]


def uniform(sizes: list[int], what: str) -> int:
    """The common size of interchangeable units; the count solver needs them equal, else WHICH decides HOW MANY."""
    if not sizes:
        raise UserError(f"the model has no {what} to remove")
    if len(set(sizes)) != 1:
        raise UserError(f"{what} differ in size ({sorted(set(sizes))}): a count cannot be solved from the budget alone")
    return sizes[0]


@dataclass
class Count:
    """How many units of each kind to remove, and what that gives."""

    counts: dict[str, int]
    params: int
    achieved: float
    notes: str


def solve_counts(dense: int, ratio: float, steps: list[tuple[str, int, int]], limit: str) -> Count:
    """Closest achievable whole-model ratio when units are removed in the order ``steps``.

    ``steps`` is a list of (kind, unit size, how many at most), consumed in order: with unit sizes s and the
    removed parameters R(k) after k removals, pick k minimising |R(k) / P_dense - ratio| (ties -> fewer).
    Refuses a target above R(all) / P_dense; ``limit`` says what "all" is.
    """
    cum = [(0, {kind: 0 for kind, _, _ in steps})]
    for kind, size, most in steps:
        for _ in range(most):
            removed, counts = cum[-1]
            cum.append((removed + size, {**counts, kind: counts[kind] + 1}))
    max_ratio = cum[-1][0] / dense
    if ratio > max_ratio + 1e-12:
        raise UserError(f"ratio {ratio} is beyond what this method can remove: {limit} gives {max_ratio:.4f}; "
                        "ask for a smaller ratio")
    k = min(range(len(cum)), key=lambda i: (abs(cum[i][0] / dense - ratio), i))
    removed, counts = cum[k]
    achieved = removed / dense
    lo = cum[k - 1][0] / dense if k > 0 else None
    hi = cum[k + 1][0] / dense if k + 1 < len(cum) else None
    neighbours = ", ".join(f"{r:.4f}" for r in (lo, hi) if r is not None)
    what = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    notes = (f"removes {what}: achieved ratio {achieved:.4f} vs target {ratio:.4f} "
             f"(miss {achieved - ratio:+.4f}; neighbouring counts give {neighbours})")
    return Count(counts, dense - removed, achieved, notes)


def block_budget(adapter, ratio: float, keep: int = 1) -> Count:
    """Number of whole blocks to remove, keeping at least ``keep`` blocks."""
    size = uniform(block_sizes(adapter), "blocks")
    n = adapter.num_blocks
    return solve_counts(count_params(adapter.model), ratio, [("blocks", size, n - keep)],
                        f"removing all but {keep} of {n} blocks")


def lowest(scores: Sequence[float], n: int) -> list[int]:
    """Indices of the ``n`` lowest scores (ties -> lower index), sorted."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(order[:n])


def cosine_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """Sum over tokens of cos(a, b) along the hidden dimension (float32), and the token count."""
    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    return float(cos.double().sum()), cos.numel()


class _SkipBlock(nn.Module):
    """A block that returns its input: running a model with it equals running it with the block removed."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


@contextmanager
def skipping(adapter, indices: Sequence[int]) -> Iterator[None]:
    """Temporarily bypass blocks (unlogged, for trial evaluations without cache); restores them on exit.

    Kept blocks keep their index, so per-layer settings (sliding windows, layer types) stay theirs exactly
    as after a real removal.
    """
    blocks = adapter.blocks()
    saved = {i: blocks[i] for i in indices}
    try:
        for i in indices:
            blocks[i] = _SkipBlock()
        yield
    finally:
        for i, block in saved.items():
            blocks[i] = block
