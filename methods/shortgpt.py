"""ShortGPT: remove the blocks whose output barely differs from their input (arXiv 2403.03853)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from bench import structure
from bench.calibration import Calibration, collect_block_cosines
from bench.registry import CompressionInfo, Method, Solution, register
from methods._layerdrop import block_budget, lowest


def block_influence(model: nn.Module, adapter, calibration: Calibration) -> list[float]:
    """BI_i = 1 - mean over tokens of cos(h_in, h_out) of block i, from hooks on the blocks."""
    return [1.0 - float(c) for c in collect_block_cosines(model, adapter, calibration)]


@register
class ShortGPT(Method):
    name = "shortgpt"
    title = "ShortGPT (block removal by Block Influence)"
    paper = "arXiv 2403.03853"
    summary = "Removes the n blocks with the lowest Block Influence in one shot; n is solved from the budget."
    coarse = True

    @dataclass
    class Knobs:
        pass

    def solve(self, adapter, ratio: float) -> Solution:
        """n = the block count whose whole-model ratio is closest to ``ratio``; which blocks is data-dependent."""
        count = block_budget(adapter, ratio)
        return Solution(knobs={"blocks": count.counts["blocks"]}, predicted_params=count.params,
                        notes=count.notes + "; which blocks go is decided by Block Influence on calibration data")

    def compress(self, model: nn.Module, adapter, calibration: Calibration, solution: Solution) -> CompressionInfo:
        """Score every block once on the dense model, then remove the n lowest-BI blocks together."""
        bi = block_influence(model, adapter, calibration)
        removed = lowest(bi, int(solution.knobs["blocks"]))
        if removed:
            structure.apply(model, adapter, "remove_blocks", indices=removed)
        return CompressionInfo(details={"block_influence": bi, "removed_blocks": removed})
