"""Layer drop / Joint Layer Drop: remove whole attention or MLP sub-layers (arXiv 2406.15786).

A sub-layer maps the residual stream X to Y = X + Module(Norm(X)); its importance is 1 - mean cos(X, Y).
Dropping replaces the sub-layer's norm(s) and module with parameter-free stand-ins, so the branch adds zero
and its parameters are gone from the stored model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bench import structure
from bench.adapters.base import get_module, set_module
from bench.budget import count_params
from bench.calibration import Calibration, collect_block_cosines, forward_all, hooks
from bench.errors import UserError
from bench.registry import CompressionInfo, Method, Solution, register
from methods._layerdrop import block_budget, cosine_sum, lowest, solve_counts, sublayer_sizes, uniform

MODES = ("joint", "attn", "mlp", "block")


class DroppedAttention(nn.Module):
    """Stands in for a removed attention: adds zero to the residual stream and holds no parameters.

    It still appends a one-channel zero placeholder (batch x 1 x tokens x 1) to the KV cache: generation and
    mask building read the cached length from layer 0 (or the first layer of a type), which must stay right
    when that layer's attention is gone. A real entry is 2 x kv_heads x head_dim times larger.
    """

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, cache=None, past_key_values=None, **kwargs):
        kv = cache if cache is not None else past_key_values  # transformers >= 5.24 names it `cache`
        if kv is not None:
            stub = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            kv.update(stub, stub, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class DroppedMLP(nn.Module):
    """Stands in for a removed MLP: adds zero to the residual stream and holds no parameters."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


@structure.structural_op("drop_sublayer")
def drop_sublayer(model: nn.Module, adapter, block: int, which: str) -> None:
    """Replace every module of block ``block``'s ``which`` ("attn" | "mlp") branch by a parameter-free stand-in."""
    root = adapter.block(block)
    for path in adapter.sublayer_paths(which):
        if path == adapter.attn_path:
            new = DroppedAttention(getattr(get_module(root, path), "layer_idx", block))
        elif path == adapter.mlp_path:
            new = DroppedMLP()
        else:  # the branch's pre-norm and post-norm
            new = nn.Identity()
        set_module(root, path, new)


def _first_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


def sublayer_importance(model: nn.Module, adapter, calibration: Calibration) -> dict[str, list[float]]:
    """1 - mean over tokens of cos(X, Y) for every attention and MLP sub-layer, in one pass (memoised).

    X_attn = block input; Y_attn = X_mlp = input of the MLP's pre-norm (the residual stream after the
    attention add, also with Gemma-style post-norms); Y_mlp = block output.
    """
    if "sublayer_importance" in calibration.memo:
        return calibration.memo["sublayer_importance"]
    n = adapter.num_blocks
    sums = {"attn": [0.0] * n, "mlp": [0.0] * n}
    tokens = [0] * n
    x_in: dict[int, torch.Tensor] = {}
    x_mid: dict[int, torch.Tensor] = {}

    def pre_block(i):
        def hook(_m, args, kwargs):
            x_in[i] = adapter.block_input(args, kwargs).detach()
        return hook

    def pre_mlp_norm(i):
        def hook(_m, args, kwargs):
            x_mid[i] = _first_arg(args, kwargs).detach()
        return hook

    def post_block(i):
        def hook(_m, _args, _kwargs, output):
            mid = x_mid.pop(i)
            s_attn, count = cosine_sum(x_in.pop(i), mid)
            s_mlp, _ = cosine_sum(mid, adapter.block_output(output).detach())
            sums["attn"][i] += s_attn
            sums["mlp"][i] += s_mlp
            tokens[i] += count
        return hook

    handles = []
    for i, block in enumerate(adapter.blocks()):
        handles.append(block.register_forward_pre_hook(pre_block(i), with_kwargs=True))
        norm = get_module(block, adapter.mlp_norm_path)
        handles.append(norm.register_forward_pre_hook(pre_mlp_norm(i), with_kwargs=True))
        handles.append(block.register_forward_hook(post_block(i), with_kwargs=True))
    with hooks(handles):
        forward_all(model, calibration)
    result = {k: [1.0 - s / max(t, 1) for s, t in zip(v, tokens, strict=True)] for k, v in sums.items()}
    calibration.memo["sublayer_importance"] = result
    return result


@register
class JointDrop(Method):
    name = "jointdrop"
    title = "Layer drop / Joint Layer Drop (attention and MLP sub-layers)"
    paper = "arXiv 2406.15786"
    summary = ("Drops the least important attention sub-layers first, then MLP sub-layers (importance "
               "1 - cos(X, X + F(Norm X))); modes for attention-only, MLP-only or whole blocks.")
    coarse = True

    @dataclass
    class Knobs:
        #: joint: attention first, then MLP; attn / mlp: one kind only; block: whole blocks by 1 - cos
        mode: str = "joint"
        #: attention sub-layers never dropped (the joint solver moves on to MLPs after all but these)
        keep_attn: int = 1
        #: MLP sub-layers never dropped
        keep_mlp: int = 1

    def _check(self, adapter) -> None:
        k = self.knobs
        if k.mode not in MODES:
            raise UserError(f"jointdrop.mode={k.mode!r} is not one of {', '.join(MODES)}")
        if not (0 <= k.keep_attn <= adapter.num_blocks and 0 <= k.keep_mlp <= adapter.num_blocks):
            raise UserError(f"jointdrop.keep_attn / keep_mlp must be between 0 and {adapter.num_blocks}")

    def solve(self, adapter, ratio: float) -> Solution:
        """Counts from the budget; the attention / MLP split follows the attention-first rule, so it is fixed too."""
        self._check(adapter)
        k, n = self.knobs, adapter.num_blocks
        if k.mode == "block":
            count = block_budget(adapter, ratio)
        else:
            steps = {"attn": ("attn", uniform(sublayer_sizes(adapter, "attn"), "attention sub-layers"), n - k.keep_attn),
                     "mlp": ("mlp", uniform(sublayer_sizes(adapter, "mlp"), "MLP sub-layers"), n - k.keep_mlp)}
            order = ["attn", "mlp"] if k.mode == "joint" else [k.mode]
            limit = " then ".join(f"dropping all but {getattr(k, 'keep_' + w)} {w} sub-layers" for w in order)
            count = solve_counts(count_params(adapter.model), ratio, [steps[w] for w in order], limit)
        return Solution(knobs=dict(count.counts), predicted_params=count.params,
                        notes=count.notes + "; which units go is decided by importance on calibration data")

    def compress(self, model: nn.Module, adapter, calibration: Calibration, solution: Solution) -> CompressionInfo:
        """Score every unit once on the dense model, then drop the least important ones of each kind."""
        self._check(adapter)
        counts = solution.knobs
        if self.knobs.mode == "block":
            importance = [1.0 - float(c) for c in collect_block_cosines(model, adapter, calibration)]
            removed = lowest(importance, int(counts["blocks"]))
            if removed:
                structure.apply(model, adapter, "remove_blocks", indices=removed)
            return CompressionInfo(details={"block_importance": importance, "removed_blocks": removed})
        importance = sublayer_importance(model, adapter, calibration)
        details: dict = {f"{w}_importance": importance[w] for w in importance}
        for which in ("attn", "mlp"):
            dropped = lowest(importance[which], int(counts.get(which, 0)))
            for b in dropped:
                structure.apply(model, adapter, "drop_sublayer", block=b, which=which)
            details[f"dropped_{which}"] = dropped
        return CompressionInfo(details=details)
