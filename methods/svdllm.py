"""SVD-LLM: truncation-aware whitened SVD of every block linear (arXiv 2403.07378), whitening-only variant.

Every linear inside the blocks (q, k, v, o, gate, up, down, or a family's fused qkv / gate_up) becomes
up (down x) with the factors of ``methods/_whiten.py``, computed from the dense model's input Gram matrices.
Embeddings, LM head and norms are untouched. The whole-model ratio is turned into the paper's linear-only
ratio r_lin by counting: one r_lin for all linears, each keeping rank floor(m n (1 - r_lin) / (m + n)).

The paper's optional update steps (least-squares refit, sequential LoRA) are not implemented; the
whitening-only variant is the one most tables compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from bench import structure
from bench.budget import count_params
from bench.calibration import Calibration, block_grams
from bench.registry import CompressionInfo, Method, Solution, register
from methods._whiten import Unit, solve_ratio, whitened_svd, whitening_workspace


def linear_units(adapter) -> list[Unit]:
    """One unit per block linear, named by its module path."""
    units = []
    for b in range(adapter.num_blocks):
        for kind in adapter.kinds():
            lin = adapter.linear(b, kind)
            units.append(Unit(adapter.linear_name(b, kind), lin.in_features, lin.out_features))
    return units


@register
class SVDLLM(Method):
    name = "svdllm"
    title = "SVD-LLM (truncation-aware whitened SVD)"
    paper = "arXiv 2403.07378"
    summary = ("Factorises every block linear by the SVD of W S, S the Cholesky factor of its input Gram, "
               "so truncation error maps directly to output error.")

    @dataclass
    class Knobs:
        pass

    device_workspace = whitening_workspace

    def solve(self, adapter, ratio: float) -> Solution:
        dense = count_params(adapter.model)
        plan = solve_ratio(linear_units(adapter), dense, ratio, self.name)
        ranks = sorted(set(plan.ranks.values()))
        notes = (f"linear-only ratio {plan.r_lin:.4f}; {len(plan.ranks)} linears factorised, ranks "
                 f"{ranks[0] if ranks else '-'}..{ranks[-1] if ranks else '-'}; "
                 f"counted ratio {1 - plan.params / dense:.4f}")
        return Solution(knobs={"r_lin": plan.r_lin, "ranks": plan.ranks}, predicted_params=plan.params, notes=notes)

    def compress(self, model: nn.Module, adapter, calibration: Calibration, solution: Solution) -> CompressionInfo:
        ranks: dict[str, int] = solution.knobs["ranks"]
        errors, jitters = {}, {}
        for step in block_grams(model, adapter, calibration):  # one block at a time, on the work device
            b = step.blocks[0]
            for kind in adapter.kinds():
                name = adapter.linear_name(b, kind)
                if name not in ranks:
                    continue
                lin = adapter.linear(b, kind)
                f = whitened_svd(lin.weight, step.stats[b]["grams"][adapter.role_of(kind)], ranks[name])
                bias = None if lin.bias is None else lin.bias.detach().clone()
                new = structure.apply(model, adapter, "factorize", module=name, rank=ranks[name])
                new.down.weight.data.copy_(f.down.to(new.down.weight))
                new.up.weight.data.copy_(f.up.to(new.up.weight))
                if bias is not None:
                    new.up.bias.data.copy_(bias)
                errors[name] = f.truncated_energy / max(float(f.sigma.square().sum().sqrt()), 1e-30)
                if f.jitter:
                    jitters[name] = f.jitter
        worst = sorted(errors.items(), key=lambda kv: -kv[1])[:5]
        return CompressionInfo(details={"r_lin": solution.knobs["r_lin"], "factorised": len(errors),
                                        "relative_output_error_worst": dict(worst), "cholesky_jitter": jitters})
