"""Where compression and evaluation run: the work device, where blocks rest, and the device's memory budget.

With ``offload`` the model stays in host memory and only the block at work (plus the small non-block parts:
embeddings, final norm, head) is on the device; ``budget_bytes`` caps what slimbench places on the device
(the real device's total by default, or a smaller figure to simulate a small GPU; on CPU it is only accounted).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from bench.errors import UserError


@dataclass
class Placement:
    """The work device, whether blocks rest in host memory between uses, and the device budget in bytes."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    offload: bool = False
    #: bytes slimbench may keep on the device at once (None: no limit is checked)
    budget_bytes: int | None = None
    #: "blockwise": statistics gathered one block at a time (the default); "whole": one whole-model forward with
    #: hooks (the reference path, kept for comparison; every block's statistics are alive at once)
    engine: str = "blockwise"
    #: bytes of device memory placed by slimbench now and at most so far (parameters moved, statistics, activations)
    resident: int = 0
    peak: int = 0

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        if self.engine not in ("blockwise", "whole"):
            raise UserError(f"engine {self.engine!r}: use blockwise or whole")

    @property
    def home(self) -> torch.device:
        """Where blocks rest when not at work."""
        return torch.device("cpu") if self.offload else self.device

    def account(self, nbytes: int) -> None:
        """Add (or with a negative figure, release) ``nbytes`` of device memory; refuses going over the budget."""
        self.resident += nbytes
        self.peak = max(self.peak, self.resident)
        if nbytes > 0 and self.budget_bytes is not None and self.resident > self.budget_bytes:
            over = self.resident
            self.resident -= nbytes
            raise UserError(f"the device budget of {_gb(self.budget_bytes)} is exceeded ({_gb(over)} needed at once); "
                            "use a device with more memory, fewer calibration samples (--calib-samples), or "
                            "--offload on")

    @contextmanager
    def on_device(self, *modules: nn.Module) -> Iterator[None]:
        """Move ``modules`` to the work device for the body (when offloading), then back home; accounted."""
        if not self.offload:
            yield
            return
        size = module_bytes(*modules)
        self.account(size)
        try:
            for m in modules:
                m.to(self.device)
            yield
        finally:
            for m in modules:
                m.to(self.home)
            self.account(-size)


def module_bytes(*modules: nn.Module) -> int:
    """Bytes of the distinct parameter and buffer storages of ``modules`` (a shared one counted once)."""
    seen, total = set(), 0
    for t in [t for m in modules for t in (*m.parameters(), *m.buffers())]:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def of(calibration, model: nn.Module) -> Placement:
    """The calibration's placement, or one for the model's own device without offload."""
    placement = getattr(calibration, "placement", None)
    if placement is None:
        placement = Placement(device=next(model.parameters()).device)
        calibration.placement = placement
    return placement
