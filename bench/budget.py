"""The one budget definition: the share of whole-model unique stored parameters removed.

Every tensor is counted once by its storage, so tied embeddings, a shared basis or a shared base weight
count once however many modules use them. Nothing is assumed: the compressed model is counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_TOLERANCE = 0.02


def _storage_key(t: torch.Tensor) -> tuple:
    if t.device.type == "meta":
        return ("meta", id(t))
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)


def unique_tensors(module: nn.Module, buffers: bool = False) -> list[torch.Tensor]:
    """Distinct tensors of ``module``: parameters (and optionally buffers), each storage once."""
    seen: set = set()
    out = []
    tensors = list(module.parameters())
    if buffers:
        tensors += list(module.buffers())
    for t in tensors:
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def count_params(module: nn.Module) -> int:
    """Unique stored parameters of ``module``."""
    return sum(t.numel() for t in unique_tensors(module))


def count_bytes(module: nn.Module) -> int:
    """Bytes of unique parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in unique_tensors(module, buffers=True))


def count_block_matrix_params(adapter) -> int:
    """Unique 2-D parameters inside the transformer blocks: the 'linear-only' base the papers quote."""
    seen: set = set()
    total = 0
    for block in adapter.blocks():
        for p in block.parameters():
            key = _storage_key(p)
            if p.dim() >= 2 and key not in seen:
                seen.add(key)
                total += p.numel()
    return total


@dataclass
class BudgetReport:
    """Target and achieved budget of one compressed model, counted on both models."""

    target_ratio: float
    achieved_ratio: float
    params_dense: int
    params_compressed: int
    linear_params_dense: int
    linear_params_compressed: int
    linear_ratio: float
    tolerance: float
    within_tolerance: bool
    predicted_params: int | None = None

    @property
    def miss(self) -> float:
        return self.achieved_ratio - self.target_ratio


def budget_report(
    dense_params: int,
    dense_linear_params: int,
    compressed_adapter,
    target_ratio: float,
    tolerance: float = DEFAULT_TOLERANCE,
    predicted_params: int | None = None,
) -> BudgetReport:
    params = count_params(compressed_adapter.model)
    lin = count_block_matrix_params(compressed_adapter)
    achieved = 1.0 - params / dense_params
    return BudgetReport(
        target_ratio=target_ratio,
        achieved_ratio=achieved,
        params_dense=dense_params,
        params_compressed=params,
        linear_params_dense=dense_linear_params,
        linear_params_compressed=lin,
        linear_ratio=1.0 - lin / dense_linear_params if dense_linear_params else 0.0,
        tolerance=tolerance,
        within_tolerance=abs(achieved - target_ratio) <= tolerance,
        predicted_params=predicted_params,
    )


def linear_only_ratio(ratio: float, dense_params: int, compressible_params: int) -> float:
    """The ratio a method must apply to its compressible parameters to remove ``ratio`` of the whole model."""
    if compressible_params <= 0:
        return float("inf")
    return ratio * dense_params / compressible_params
