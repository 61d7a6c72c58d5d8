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
            raise UserError(f"the device budget of {gib(self.budget_bytes)} is exceeded ({gib(over)} needed at once); "
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


def gram_bytes(adapter) -> int:
    """Bytes of one block's Gram matrices (float64, one per linear role)."""
    return 8 * sum(adapter.linear(0, next(s.kind for s in adapter.slots if s.role == role)).in_features ** 2
                   for role in adapter.roles())


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def gib(n: int) -> str:
    """A byte count as people read it: GiB from 1 GiB up, else MiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def of(calibration, model: nn.Module) -> Placement:
    """The calibration's placement, or one for the model's own device without offload."""
    placement = getattr(calibration, "placement", None)
    if placement is None:
        placement = Placement(device=next(model.parameters()).device)
        calibration.placement = placement
    return placement


#: share of a CUDA device's memory slimbench plans to use (the rest: CUDA context, allocator slack, fragmentation)
CUDA_USABLE = 0.9


def working_set(model: nn.Module, adapter, calib_samples: int, calib_seq_len: int, batch_size: int,
                workspace: int = 0) -> dict[str, int]:
    """The fit estimate's parts (bytes): ``alone`` with only a pair of blocks on the device, ``whole`` resident."""
    blocks = list(adapter.blocks())
    weights = module_bytes(model)
    rest = weights - module_bytes(*blocks)
    block = max(module_bytes(b) for b in blocks)
    elem = next(model.parameters()).element_size()
    cfg = model.config
    acts = 2 * calib_samples * calib_seq_len * cfg.hidden_size * elem
    inner = batch_size * calib_seq_len * getattr(cfg, "intermediate_size", 4 * cfg.hidden_size) * 4 * 3
    stats = 2 * gram_bytes(adapter)
    return {"alone": rest + 2 * block + stats + acts + inner + workspace,
            "whole": weights + stats + acts + inner + workspace,
            "block": block, "stats": stats, "acts": acts + inner, "rest": rest, "workspace": workspace}


def fits_or_refuse(model: nn.Module, adapter, device: str, offload: str, device_memory_gib: float | None, engine: str,
                   calib_samples: int, calib_seq_len: int, batch_size: int, workspace: int = 0) -> Placement:
    """Decide where the run works (``offload``: auto, on or off) and refuse, before any work, a run that cannot fit.

    The budget is ``device_memory_gib`` when given (a cap, or a simulated small device), else 90 % of a CUDA device's
    memory, else (CPU) none. Working alone a block needs: the non-block parts, a group of two blocks (Basis Sharing's
    default) and their Grams, the calibration activations entering and leaving it, one batch's MLP intermediates,
    and ``workspace``: the largest :meth:`~bench.registry.Method.device_workspace` of the run's methods (on an H100,
    peaks were 1.3-2.7x the estimate without it).
    """
    from bench.models import resolve_device

    dev = torch.device(resolve_device(device))
    if offload not in ("auto", "on", "off"):
        raise UserError(f"--offload {offload!r}: use auto, on or off")
    if device_memory_gib is not None:
        if not device_memory_gib > 0:
            raise UserError(f"--device-memory {device_memory_gib}: give GiB above 0, e.g. --device-memory 40")
        budget: int | None = int(device_memory_gib * 2**30)
    elif dev.type == "cuda":
        budget = int(torch.cuda.get_device_properties(dev).total_memory * CUDA_USABLE)
    else:
        budget = None
    est = working_set(model, adapter, calib_samples, calib_seq_len, batch_size, workspace)
    alone, whole, block, stats, acts, rest = (est[k] for k in ("alone", "whole", "block", "stats", "acts", "rest"))
    off = {"on": True, "off": False, "auto": budget is not None and whole > budget}[offload]
    if budget is not None:
        need = alone if off else whole
        if need > budget:
            if off:
                raise UserError(f"{gib(need)} must be on {dev} at once (one pair of blocks {gib(2 * block)}, their "
                                f"statistics {gib(stats)}, calibration activations {gib(acts)}, the methods' "
                                f"own workspace {gib(workspace)}, embeddings and head {gib(rest)}) but the budget is "
                                f"{gib(budget)}; use a larger device or fewer calibration tokens (--calib-samples, "
                                "--calib-seq-len)")
            raise UserError(f"the model and its working set need {gib(need)} on {dev}, above the budget of "
                            f"{gib(budget)}; use --offload auto (or on) to keep the blocks in host memory")
    return Placement(device=dev, offload=off, budget_bytes=budget, engine=engine)
