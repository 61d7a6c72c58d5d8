"""ShortGPT: remove the blocks whose output barely differs from their input (arXiv 2403.03853).

Block Influence is scored, as the official run does, on independent 256-token pieces of each calibration window
(its stride); ``segment=0`` scores whole windows. The two can pick different blocks when two nearly tie.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from bench import structure
from bench.calibration import Calibration, collect_block_cosines
from bench.errors import UserError
from bench.registry import CompressionInfo, Method, Solution, register
from methods._layerdrop import block_budget, lowest


def block_influence(model: nn.Module, adapter, calibration: Calibration, segment: int | None = None) -> list[float]:
    """BI_i = 1 - mean over tokens of cos(h_in, h_out) of block i, from hooks on the blocks (pieces of ``segment``)."""
    return [1.0 - float(c) for c in collect_block_cosines(model, adapter, calibration, segment=segment)]


@register
class ShortGPT(Method):
    name = "shortgpt"
    title = "ShortGPT (block removal by Block Influence)"
    paper = "arXiv 2403.03853"
    summary = "Removes the n blocks with the lowest Block Influence in one shot; n is solved from the budget."
    coarse = True

    @dataclass
    class Knobs:
        #: tokens per independently scored piece of a calibration window (official: 256); 0 or None = whole windows
        segment: int = 256

    def _check(self) -> None:
        if (self.knobs.segment or 0) < 0:
            raise UserError(f"shortgpt.segment={self.knobs.segment} must be >= 1 (tokens per piece), or 0 for whole "
                            "windows")

    def solve(self, adapter, ratio: float) -> Solution:
        """n = the block count whose whole-model ratio is closest to ``ratio``; which blocks is data-dependent."""
        self._check()
        count = block_budget(adapter, ratio)
        return Solution(knobs={"blocks": count.counts["blocks"]}, predicted_params=count.params,
                        notes=count.notes + "; which blocks go is decided by Block Influence on calibration data")

    def compress(self, model: nn.Module, adapter, calibration: Calibration, solution: Solution) -> CompressionInfo:
        """Score every block once on the dense model, then remove the n lowest-BI blocks together."""
        self._check()
        segment = self.knobs.segment or 0
        bi = block_influence(model, adapter, calibration, segment)
        removed = lowest(bi, int(solution.knobs["blocks"]))
        if removed:
            structure.apply(model, adapter, "remove_blocks", indices=removed)
        scored = (f"pieces of {segment} tokens" if 0 < segment < calibration.seq_len
                  else f"whole windows of {calibration.seq_len} tokens")
        return CompressionInfo(details={"block_influence": bi, "removed_blocks": removed, "scored_on": scored,
                                        "segment": segment})
