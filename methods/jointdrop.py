"""Layer drop / Joint Layer Drop: remove whole attention or MLP sub-layers (arXiv 2406.15786).

A sub-layer maps the residual stream X to Y = X + Module(Norm(X)); its importance is 1 - mean cos(X, Y).
Dropping replaces the sub-layer's norm(s) and module with parameter-free stand-ins, so the branch adds zero
and its parameters are gone from the stored model.

Ranking (``mode=joint``): by default, as the official LLM-Drop code runs Joint Layer Drop (``discrete_layer_dropping``
with target ``all``), every attention and MLP sub-layer goes into ONE list sorted by importance and the least
important units go first, whichever kind they are, until the budget (``ranking=joint``). The official code counts
the budget in units; here a prefix of that list is taken whose removed parameters come closest to the whole-model
target (ties -> fewer units), so how many of each kind go is known only once the data has ranked them: compress
writes the final counts and parameter total into the solution. ``ranking=attn_first`` is slimbench's former rule:
the counts are fixed from the budget with attention first, then MLP, and each kind drops its least important.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from bench import blockwise, structure
from bench.adapters.base import get_module, set_module
from bench.budget import count_params
from bench.calibration import Calibration, collect_block_cosines, forward_all, hooks
from bench.errors import UserError
from bench.placement import of
from bench.registry import CompressionInfo, Method, Solution, register
from methods._layerdrop import block_budget, cosine_sum, lowest, solve_counts, sublayer_sizes, uniform

MODES = ("joint", "attn", "mlp", "block")
RANKINGS = ("joint", "attn_first")


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
        calibration.log("sublayer_importance", "memory")
        return calibration.memo["sublayer_importance"]
    t0 = time.perf_counter()
    placement = of(calibration, model)
    n = adapter.num_blocks
    if placement.engine == "whole":
        sums, tokens = _whole_model_sums(model, adapter, calibration, placement)
    else:
        sums, tokens = {"attn": [0.0] * n, "mlp": [0.0] * n}, [0] * n
        batches = list(calibration.batches(placement.device))
        for step in blockwise.walk(model, adapter, batches, placement, ["sublayer_cosine"]):
            for i, stats in step.stats.items():
                got = stats["sublayer_cosine"]
                sums["attn"][i], sums["mlp"][i], tokens[i] = got["attn"], got["mlp"], got["tokens"]
    result = {k: [1.0 - s / max(t, 1) for s, t in zip(v, tokens, strict=True)] for k, v in sums.items()}
    calibration.memo["sublayer_importance"] = result
    calibration.log("sublayer_importance", "computed", time.perf_counter() - t0, engine=placement.engine)
    return result


def _whole_model_sums(model: nn.Module, adapter, calibration: Calibration, placement) -> tuple[dict, list[int]]:
    """The reference path: hooks on every block during whole-model forwards."""
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
    with hooks(handles), blockwise.streaming(model, adapter, placement):
        forward_all(model, calibration)
    return sums, tokens


@register
class JointDrop(Method):
    name = "jointdrop"
    title = "Layer drop / Joint Layer Drop (attention and MLP sub-layers)"
    paper = "arXiv 2406.15786"
    summary = ("Drops the least important attention and MLP sub-layers from one joint ranking (importance "
               "1 - cos(X, X + F(Norm X)), official LLM-Drop); attention-first, attention-only, MLP-only or whole "
               "blocks as knob values.")
    coarse = True

    @dataclass
    class Knobs:
        #: joint: attention and MLP sub-layers; attn / mlp: one kind only; block: whole blocks by 1 - cos
        mode: str = "joint"
        #: joint mode: "joint" = one list of both kinds by importance (official); "attn_first" = attention, then MLP
        ranking: str = "joint"
        #: attention sub-layers never dropped (the attention-first solver moves on to MLPs after all but these)
        keep_attn: int = 1
        #: MLP sub-layers never dropped
        keep_mlp: int = 1

    def _check(self, adapter) -> None:
        k = self.knobs
        if k.mode not in MODES:
            raise UserError(f"jointdrop.mode={k.mode!r} is not one of {', '.join(MODES)}")
        if k.ranking not in RANKINGS:
            raise UserError(f"jointdrop.ranking={k.ranking!r} is not one of {', '.join(RANKINGS)}")
        if not (0 <= k.keep_attn <= adapter.num_blocks and 0 <= k.keep_mlp <= adapter.num_blocks):
            raise UserError(f"jointdrop.keep_attn / keep_mlp must be between 0 and {adapter.num_blocks}")

    def _joint(self) -> bool:
        return self.knobs.mode == "joint" and self.knobs.ranking == "joint"

    def solve(self, adapter, ratio: float) -> Solution:
        """Counts from the budget (attention-first: the split too); the joint ranking only checks the budget here."""
        self._check(adapter)
        k, n = self.knobs, adapter.num_blocks
        if self._joint():
            return joint_solution(adapter, ratio, k.keep_attn, k.keep_mlp)
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
        if self._joint():
            order = joint_prefix(adapter, importance, solution, self.knobs.keep_attn, self.knobs.keep_mlp)
            details["drop_order"] = [f"{w}{b}" for w, b in order]
            chosen = {w: sorted(b for v, b in order if v == w) for w in ("attn", "mlp")}
        else:
            chosen = {w: lowest(importance[w], int(counts.get(w, 0))) for w in ("attn", "mlp")}
        for which in ("attn", "mlp"):
            for b in chosen[which]:
                structure.apply(model, adapter, "drop_sublayer", block=b, which=which)
            details[f"dropped_{which}"] = chosen[which]
        details["ranking"] = self.knobs.ranking if self.knobs.mode == "joint" else self.knobs.mode
        return CompressionInfo(details=details)


def joint_solution(adapter, ratio: float, keep_attn: int, keep_mlp: int) -> Solution:
    """The budget in parameters; refuses a target beyond dropping every sub-layer the keep knobs allow."""
    dense, n = count_params(adapter.model), adapter.num_blocks
    a = uniform(sublayer_sizes(adapter, "attn"), "attention sub-layers")
    m = uniform(sublayer_sizes(adapter, "mlp"), "MLP sub-layers")
    most = (n - keep_attn) * a + (n - keep_mlp) * m
    if ratio * dense > most + 1e-9 * dense:
        raise UserError(f"ratio {ratio} is beyond what this method can remove: dropping all but {keep_attn} attention "
                        f"and {keep_mlp} MLP sub-layers gives {most / dense:.4f}; ask for a smaller ratio")
    target = round(ratio * dense)
    return Solution(knobs={"ranking": "joint", "target_removed": target}, predicted_params=dense - target,
                    notes=(f"joint ranking: the prefix of the importance-sorted list of attention ({a} parameters "
                           f"each) and MLP ({m}) sub-layers closest to removing {target} parameters; how many of each "
                           "kind is decided by calibration data and written here by compress"))


def joint_prefix(adapter, importance: dict[str, list[float]], solution: Solution, keep_attn: int,
                 keep_mlp: int) -> list[tuple[str, int]]:
    """The units to drop, in drop order: the joint list's prefix closest to the budget; sets ``solution``'s counts.

    The list is sorted by importance (ties: attention before MLP, lower block first, as a stable sort of the
    official concatenated [attention..., MLP...] list gives); a unit past its kind's keep limit is skipped.
    """
    n = adapter.num_blocks
    size = {"attn": sublayer_sizes(adapter, "attn")[0], "mlp": sublayer_sizes(adapter, "mlp")[0]}
    room = {"attn": n - keep_attn, "mlp": n - keep_mlp}
    ranked = sorted(((importance[w][b], i, w, b) for i, w in enumerate(("attn", "mlp")) for b in range(n)))
    order: list[tuple[str, int]] = []
    for _imp, _i, w, b in ranked:
        if room[w] > 0:
            room[w] -= 1
            order.append((w, b))
    removed = [0]
    for w, _b in order:
        removed.append(removed[-1] + size[w])
    target = int(solution.knobs["target_removed"])
    k = min(range(len(removed)), key=lambda i: (abs(removed[i] - target), i))
    dense = count_params(adapter.model)  # compress starts from the dense model
    counts = {w: sum(1 for v, _ in order[:k] if v == w) for w in ("attn", "mlp")}
    # new objects, not edits: the runner shares one solution between the seeds of a cell
    solution.knobs = {"ranking": "joint", "target_removed": target, **counts}
    solution.predicted_params = dense - removed[k]
    solution.notes = solution.notes.split("; removes")[0] + (f"; removes {counts['attn']} attn, {counts['mlp']} mlp: achieved ratio {removed[k] / dense:.4f} "
                       f"vs target {target / dense:.4f}")
    return order[:k]
