"""The block-wise engine: calibration tokens through the embeddings, then through one block at a time.

Methods never walk the model. They ask :func:`walk` for the blocks (alone or in groups of consecutive blocks) with
the statistics they declare (probes: Gram matrices of the linears' inputs, cosine of a block's input and output,
sub-layer cosines). For each group the engine moves its blocks to the work device (when offloading), runs every
calibration batch through them with the probes attached, hands the method the group and its statistics, lets it
replace what it wants, and moves the blocks home. The group's outputs feed the next group: taken before the method
edits the block (``after=False``: the dense model's activations, what SVD-LLM and Basis Sharing whiten with) or after
(``after=True``: the compressed model's own activations, what sequential methods use). Statistics of a group are
released when its step ends, so their peak does not grow with the number of blocks.

:func:`streaming` runs whole-model forwards (LaCo's final states, evaluation) on an offloaded model: the non-block
parts sit on the device and every block visits it only for its own forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bench.adapters.base import get_module, set_module
from bench.placement import Placement, module_bytes, tensor_bytes


class _Stop(Exception):
    """Raised by the last recorder: nothing after the blocks is needed."""


class _Recorder(nn.Module):
    """Stands in for a block while capturing: keeps its keyword arguments (and block 0's input), passes x on."""

    def __init__(self, kwargs_sink: list, input_sink: list | None, last: bool):
        super().__init__()
        self.kwargs_sink, self.input_sink, self.last = kwargs_sink, input_sink, last

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.kwargs_sink.append(kwargs)
        if self.input_sink is not None:
            self.input_sink.append(hidden_states)
        if self.last:
            raise _Stop
        return hidden_states


@dataclass
class Captured:
    """Block 0's input per batch and every block's keyword arguments per batch (masks differ by layer type)."""

    inputs: list[torch.Tensor]
    kwargs: list[list[dict]]


@contextmanager
def _without_blocks(model: nn.Module, adapter, stand_ins: list[nn.Module] | None = None) -> Iterator[nn.ModuleList]:
    """The model with its block list swapped for ``stand_ins`` (default: none) for the body; yields the real list."""
    real = adapter.blocks()
    set_module(model, adapter.blocks_path, nn.ModuleList(stand_ins or []))
    try:
        yield real
    finally:
        set_module(model, adapter.blocks_path, real)


@contextmanager
def rest_on_device(model: nn.Module, adapter, placement: Placement) -> Iterator[None]:
    """Everything but the blocks (embeddings, rotary tables, final norm, head) on the work device for the body."""
    if not placement.offload:
        yield
        return
    with _without_blocks(model, adapter):
        size = module_bytes(model)
        placement.account(size)
        model.to(placement.device)
    try:
        yield
    finally:
        with _without_blocks(model, adapter):
            model.to(placement.home)
        placement.account(-size)


@torch.inference_mode()
def capture(model: nn.Module, adapter, batches: Sequence[torch.Tensor], placement: Placement) -> Captured:
    """Run ``batches`` of token ids through the embeddings only; the blocks are never touched."""
    n = adapter.num_blocks
    inputs: list[torch.Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in range(n)]
    recorders = [_Recorder(kwargs[i], inputs if i == 0 else None, i == n - 1) for i in range(n)]
    model.eval()
    with rest_on_device(model, adapter, placement), _without_blocks(model, adapter, recorders):
        for batch in batches:
            try:
                model(input_ids=batch.to(placement.device), use_cache=False)
            except _Stop:
                pass
    return Captured(inputs=inputs, kwargs=kwargs)


class Probe:
    """Gathers one statistic of one block while the calibration batches pass through it."""

    def attach(self, adapter, block: nn.Module) -> list:
        """Hooks inside the block (removed by the engine); none by default."""
        return []

    def observe(self, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        """One batch's block input and output."""

    def result(self) -> Any:
        raise NotImplementedError


class Grams(Probe):
    """G = sum over tokens of x x^T (float64) for the input of every linear role of the block ({role: G})."""

    def __init__(self) -> None:
        self.grams: dict[str, torch.Tensor] = {}

    def attach(self, adapter, block: nn.Module) -> list:
        handles = []
        for role in adapter.roles():
            first = next(s for s in adapter.slots if s.role == role)
            handles.append(get_module(block, first.path).register_forward_pre_hook(self._hook(role)))
        return handles

    def _hook(self, role: str) -> Callable:
        def hook(_module, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            g = (x.T @ x).double()
            self.grams[role] = self.grams[role] + g if role in self.grams else g

        return hook

    def result(self) -> dict[str, torch.Tensor]:
        return self.grams


class BlockCosine(Probe):
    """(sum over tokens of cos(h_in, h_out), token count), float64 sums."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def observe(self, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
        self.total += float(cos.double().sum())
        self.count += cos.numel()

    def result(self) -> tuple[float, int]:
        return self.total, self.count


class SublayerCosine(Probe):
    """Sums of cos(X, Y) per token for the attention branch (block input -> MLP norm input) and the MLP branch
    (MLP norm input -> block output): {"attn": sum, "mlp": sum, "tokens": count}."""

    def __init__(self) -> None:
        self.sums = {"attn": 0.0, "mlp": 0.0, "tokens": 0}
        self.mid: list[torch.Tensor] = []

    def attach(self, adapter, block: nn.Module) -> list:
        def hook(_m, args, kwargs):
            self.mid.append((args[0] if args else next(iter(kwargs.values()))).detach())

        return [get_module(block, adapter.mlp_norm_path).register_forward_pre_hook(hook, with_kwargs=True)]

    def observe(self, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        mid = self.mid.pop()
        for key, (a, b) in {"attn": (x_in, mid), "mlp": (mid, x_out)}.items():
            cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
            self.sums[key] += float(cos.double().sum())
        self.sums["tokens"] += cos.numel()

    def result(self) -> dict:
        return self.sums


PROBES: dict[str, type[Probe]] = {"grams": Grams, "block_cosine": BlockCosine, "sublayer_cosine": SublayerCosine}


@dataclass
class Step:
    """One group of consecutive blocks at work: their indices, each block's statistics, the group's inputs."""

    blocks: list[int]
    stats: dict[int, dict[str, Any]] = field(default_factory=dict)
    inputs: list[torch.Tensor] = field(default_factory=list)


def partition(num_blocks: int, groups: Sequence[Sequence[int]] | int = 1) -> list[list[int]]:
    """Consecutive groups covering every block: ``groups`` as a size, or explicit groups (gaps become singles)."""
    if isinstance(groups, int):
        return [list(range(s, min(s + groups, num_blocks))) for s in range(0, num_blocks, max(1, groups))]
    out, covered = [], set()
    first_of = {min(g): sorted(g) for g in groups if g}
    b = 0
    while b < num_blocks:
        g = first_of.get(b, [b])
        if g != list(range(g[0], g[0] + len(g))) or covered & set(g):
            raise ValueError(f"block groups must be consecutive and disjoint: {list(groups)}")
        covered |= set(g)
        out.append(g)
        b = g[-1] + 1
    return out


def _run(block: nn.Module, adapter, xs: list[torch.Tensor], kwargs: list[dict],
         probes: dict[str, Probe] | None = None) -> list[torch.Tensor]:
    """Every batch through one block (probes attached); the outputs."""
    probes = probes or {}
    handles = [h for p in probes.values() for h in p.attach(adapter, block)]
    try:
        outs = []
        for x, kw in zip(xs, kwargs, strict=True):
            out = adapter.block_output(block(x, **kw))
            for p in probes.values():
                p.observe(x, out)
            outs.append(out)
        return outs
    finally:
        for h in handles:
            h.remove()


def walk(model: nn.Module, adapter, batches: Sequence[torch.Tensor], placement: Placement,
         probes: Sequence[str] = (), groups: Sequence[Sequence[int]] | int = 1, after: bool = False) -> Iterator[Step]:
    """Yield each group of blocks on the work device with its statistics; see the module docstring.

    The method may edit the step's blocks (weights, or modules replaced through :mod:`bench.structure`) before
    asking for the next step; with ``after=True`` the group's outputs are then recomputed through the edited blocks.
    """
    unknown = sorted(set(probes) - set(PROBES))
    if unknown:
        raise ValueError(f"unknown probes {unknown}; known: {sorted(PROBES)}")
    cap = capture(model, adapter, batches, placement)
    xs, kwargs = cap.inputs, cap.kwargs
    del cap  # block 0's inputs must not outlive their group
    live = tensor_bytes(xs)
    placement.account(live)
    try:
        for group in partition(adapter.num_blocks, groups):
            with at_work(placement, adapter, group), torch.inference_mode():
                step, ys = Step(blocks=group, inputs=xs), xs
                for i in group:
                    made = {name: PROBES[name]() for name in probes}
                    ys = _run(adapter.block(i), adapter, ys, kwargs[i], made)
                    step.stats[i] = {name: p.result() for name, p in made.items()}
                if after:  # the dense outputs are not needed: the edited blocks' own replace them below
                    ys = None
                held = _stats_bytes(step.stats) + tensor_bytes(ys or [])
                placement.account(held)
                try:
                    yield step
                    if after:  # the edited blocks' own outputs (blocks may have been replaced: look them up again)
                        ys = xs
                        for i in group:
                            ys = _run(adapter.block(i), adapter, ys, kwargs[i])
                finally:
                    placement.account(-held)
                    # the caller's loop variable still holds this step while the next group runs: empty it, so
                    # that its inputs and statistics are freed now rather than one group later
                    step.stats.clear()
                    step.inputs = []
                    del step
            placement.account(tensor_bytes(ys) - live)
            xs, live = ys, tensor_bytes(ys)
    finally:
        placement.account(-live)


@contextmanager
def at_work(placement: Placement, adapter, indices: Sequence[int]) -> Iterator[None]:
    """Blocks ``indices`` on the work device for the body; whatever blocks sit at those indices at the end (a method
    may have replaced them) go home."""
    arrived = _arrive(placement, [adapter.block(i) for i in indices])
    try:
        yield
    finally:
        _leave(placement, [adapter.block(i) for i in indices], arrived)


def _arrive(placement: Placement, modules: list[nn.Module]) -> int:
    """Move ``modules`` to the work device when offloading; the bytes accounted."""
    if not placement.offload:
        return 0
    size = module_bytes(*modules)
    placement.account(size)
    for m in modules:
        m.to(placement.device)
    return size


def _leave(placement: Placement, modules: list[nn.Module], size: int) -> None:
    if placement.offload:
        for m in modules:
            m.to(placement.home)
        placement.account(-size)


def _stats_bytes(stats: dict) -> int:
    total = 0
    for value in stats.values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            total += _stats_bytes(value)
    return total


@contextmanager
def streaming(model: nn.Module, adapter, placement: Placement) -> Iterator[None]:
    """Whole-model forwards on an offloaded model: non-block parts on the device, each block only for its forward.

    Inference only (a block leaves the device right after its forward). Without offload it changes nothing.
    """
    if not placement.offload:
        yield
        return
    handles = []

    sizes: dict[int, int] = {}

    def arrive(block, _args):
        sizes[id(block)] = _arrive(placement, [block])

    def leave(block, _args, _output):
        _leave(placement, [block], sizes.pop(id(block), 0))

    for block in adapter.blocks():
        handles.append(block.register_forward_pre_hook(arrive))
        handles.append(block.register_forward_hook(leave))
    try:
        with rest_on_device(model, adapter, placement):
            yield
    finally:
        for h in handles:
            h.remove()
