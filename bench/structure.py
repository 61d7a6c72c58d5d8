"""Structural edits that compression makes to a model, replayable for loading a saved checkpoint.

A method changes a model's structure only through :func:`apply`, which builds the new modules
(uninitialised, same dtype and device) and logs the edit. A checkpoint stores that log; loading
rebuilds the dense skeleton from its config, replays the log and then loads the safetensors weights.
New methods register new edits with :func:`structural_op`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bench.adapters.base import get_module, set_module

_OPS: dict[str, Callable] = {}
LOG_ATTR = "_slimbench_ops"
BASE_ATTR = "_slimbench_base_config"


def structural_op(name: str):
    """Register ``fn(model, adapter, **args)`` as the structural edit ``name``."""

    def deco(fn):
        _OPS[name] = fn
        return fn

    return deco


def apply(model: nn.Module, adapter, op: str, **args):
    """Apply edit ``op`` to ``model`` and append it to the model's structure log; returns what the op returns."""
    if op not in _OPS:
        raise KeyError(f"unknown structural op {op!r}; registered: {sorted(_OPS)}")
    if getattr(model, BASE_ATTR, None) is None:  # the dense config, before any edit changes it
        setattr(model, BASE_ATTR, model.config.to_dict())
    result = _OPS[op](model, adapter, **args)
    ops = getattr(model, LOG_ATTR, None)
    if ops is None:
        ops = []
        setattr(model, LOG_ATTR, ops)
    ops.append({"op": op, **args})
    return result


def registered_ops() -> list[str]:
    return sorted(_OPS)


def structure_log(model: nn.Module) -> list[dict]:
    return list(getattr(model, LOG_ATTR, []) or [])


def base_config(model: nn.Module) -> dict:
    """The config of the dense model this one was made from (its own config if never edited)."""
    return getattr(model, BASE_ATTR, None) or model.config.to_dict()


def replay(model: nn.Module, adapter, ops: list[dict]) -> None:
    for entry in ops:
        entry = dict(entry)
        apply(model, adapter, entry.pop("op"), **entry)


class FactorizedLinear(nn.Module):
    """y = up(down(x)): a rank-k factorisation of a linear layer.

    ``down`` (k x in) may be one module shared by several FactorizedLinears (a shared basis); it is
    then stored once.
    """

    def __init__(self, down: nn.Linear, up: nn.Linear):
        super().__init__()
        self.down = down
        self.up = up
        self.in_features = down.in_features
        self.out_features = up.out_features
        self.rank = down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def _like(ref: nn.Linear, in_f: int, out_f: int, bias: bool) -> nn.Linear:
    w = ref.weight
    return nn.Linear(in_f, out_f, bias=bias, device=w.device, dtype=w.dtype)


@structural_op("factorize")
def _factorize(model, adapter, module: str, rank: int) -> FactorizedLinear:
    ref = get_module(model, module)
    new = FactorizedLinear(
        _like(ref, ref.in_features, rank, False), _like(ref, rank, ref.out_features, ref.bias is not None)
    )
    set_module(model, module, new)
    return new


@structural_op("share_basis")
def _share_basis(model, adapter, modules: list[str], rank: int) -> list[FactorizedLinear]:
    refs = [get_module(model, m) for m in modules]
    in_f = refs[0].in_features
    if any(r.in_features != in_f for r in refs):
        raise ValueError(f"cannot share a basis across inputs of different widths: {modules}")
    basis = _like(refs[0], in_f, rank, False)
    out = []
    for name, ref in zip(modules, refs, strict=True):
        new = FactorizedLinear(basis, _like(ref, rank, ref.out_features, ref.bias is not None))
        set_module(model, name, new)
        out.append(new)
    return out


@structural_op("remove_blocks")
def _remove_blocks(model, adapter, indices: list[int]) -> None:
    adapter.remove_blocks(list(indices))
