"""Basis Sharing: one SVD basis shared by the same linear of consecutive layers (arXiv 2410.03765).

Blocks are cut into consecutive groups of ``group_size`` (a leftover block forms its own group). For each
shared kind (by default the linears that read the attention or MLP input: q, k, v, gate, up, or a family's
fused qkv / gate_up) the group's weights are stacked along the output, W = [W_1; ...; W_n], whitened with the
sum of the group's input Grams, and factorised once: the k x in ``down`` (S_k V_k^T L^(-1)) is one module
shared by every layer of the group, and layer i keeps its own out x k coefficients (its rows of U_k).
Kinds not shared (o and down: the paper found sharing them hurts) get SVD-LLM's per-layer whitened SVD.

The paper's rank for a linear-only ratio r is k = floor(in * n * out * (1 - r) / (in + n * out)); the
solver turns the whole-model ratio into that r by counting. With ``refit_from`` at or below the linear-only
ratio, the coefficients are refitted by least squares on the inputs the compressed model itself produces:
C_i = W_i G' D^T (D G' D^T)^(-1), G' the Gram of layer i's input in the compressed model (the paper does
this at 40 % and above).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from bench import structure
from bench.budget import count_params
from bench.calibration import Calibration, block_grams
from bench.errors import UserError
from bench.placement import of
from bench.registry import CompressionInfo, Method, Solution, register
from methods._whiten import Unit, solve_ratio, whitened_svd, whitening_workspace

SHARED_ROLES = ("attn_in", "mlp_in")


def groups_of(num_blocks: int, size: int) -> list[list[int]]:
    return [list(range(s, min(s + size, num_blocks))) for s in range(0, num_blocks, size)]


def _unit_name(kind: str, group: list[int]) -> str:
    return f"{kind}@{'+'.join(map(str, group))}"


def units(adapter, shared: list[str], group_size: int) -> list[Unit]:
    """Shared kinds: one unit per group (outputs stacked); the other kinds: one unit per layer."""
    out = []
    for kind in adapter.kinds():
        groups = groups_of(adapter.num_blocks, group_size if kind in shared else 1)
        for g in groups:
            lins = [adapter.linear(b, kind) for b in g]
            if len({(m.in_features, m.out_features) for m in lins}) != 1:
                raise UserError(f"basis: {kind} differs in shape across blocks {g}; it cannot share a basis "
                                f"(leave it out with --set basis.shared=...)")
            out.append(Unit(_unit_name(kind, g), lins[0].in_features, lins[0].out_features * len(g)))
    return out


@register
class BasisSharing(Method):
    name = "basis"
    title = "Basis Sharing (cross-layer shared SVD basis)"
    paper = "arXiv 2410.03765"
    summary = ("Consecutive layers share one whitened-SVD basis per linear kind (q, k, v, gate, up) and keep their "
               "own coefficients; o and down get SVD-LLM's per-layer factorisation.")

    @dataclass
    class Knobs:
        #: layers per shared basis (the paper's default 2; a leftover layer forms its own group)
        group_size: int = 2
        #: linear kinds that share a basis (adapter kinds; empty = every kind reading the attention or MLP input)
        shared: list[str] = field(default_factory=list)
        #: refit the coefficients on the compressed model's own inputs when the linear-only ratio is at least this
        refit_from: float = 0.4

    def _shared(self, adapter) -> list[str]:
        k = self.knobs
        if k.group_size < 1:
            raise UserError("basis.group_size must be >= 1")
        unknown = sorted(set(k.shared) - set(adapter.kinds()))
        if unknown:
            raise UserError(f"basis.shared: {adapter.family} blocks have no linear {unknown}; kinds: {adapter.kinds()}")
        if k.shared:
            return list(k.shared)
        return [s for s in adapter.kinds() if adapter.role_of(s) in SHARED_ROLES]

    device_workspace = whitening_workspace

    def solve(self, adapter, ratio: float) -> Solution:
        shared = self._shared(adapter)
        dense = count_params(adapter.model)
        plan = solve_ratio(units(adapter, shared, self.knobs.group_size), dense, ratio, self.name)
        notes = (f"linear-only ratio {plan.r_lin:.4f}; groups of {self.knobs.group_size} share {shared}; "
                 f"{len(plan.ranks)} factorisations; counted ratio {1 - plan.params / dense:.4f}")
        return Solution(knobs={"r_lin": plan.r_lin, "ranks": plan.ranks, "shared": shared},
                        predicted_params=plan.params, notes=notes)

    def compress(self, model: nn.Module, adapter, calibration: Calibration, solution: Solution) -> CompressionInfo:
        ranks, shared = solution.knobs["ranks"], solution.knobs["shared"]
        coeffs: list[tuple] = []  # (block, kind, factorised linear, original weight at home) of the shared kinds
        errors: dict[str, float] = {}
        will_refit = solution.knobs["r_lin"] >= self.knobs.refit_from
        home = of(calibration, model).home
        for step in block_grams(model, adapter, calibration, self.knobs.group_size):  # a group at a time
            for kind in adapter.kinds():
                role = adapter.role_of(kind)
                for g in groups_of(len(step.blocks), len(step.blocks) if kind in shared else 1):
                    g = [step.blocks[i] for i in g]
                    name = _unit_name(kind, g)
                    if name not in ranks:
                        continue
                    lins = [adapter.linear(b, kind) for b in g]
                    stacked = torch.cat([m.weight.detach() for m in lins], dim=0)
                    gram = sum(step.stats[b]["grams"][role] for b in g)
                    f = whitened_svd(stacked, gram, ranks[name], split="down")
                    biases = [None if m.bias is None else m.bias.detach().clone() for m in lins]
                    originals = ([m.weight.detach().to(home, copy=True) for m in lins] if kind in shared and will_refit
                                 else [None] * len(g))
                    new = structure.apply(model, adapter, "share_basis",
                                          modules=[adapter.linear_name(b, kind) for b in g], rank=ranks[name])
                    new[0].down.weight.data.copy_(f.down.to(new[0].down.weight))
                    rows = 0
                    for b, lin, bias, orig in zip(g, new, biases, originals, strict=True):
                        lin.up.weight.data.copy_(f.up[rows : rows + lin.out_features].to(lin.up.weight))
                        rows += lin.out_features
                        if bias is not None:
                            lin.up.bias.data.copy_(bias)
                        if orig is not None:
                            coeffs.append((b, kind, orig))
                    errors[name] = f.truncated_energy / max(float(f.sigma.square().sum().sqrt()), 1e-30)
        details = {"r_lin": solution.knobs["r_lin"], "shared": shared, "factorisations": len(errors),
                   "relative_output_error_worst": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5])}
        if coeffs:
            details["refit"] = refit(model, adapter, calibration, coeffs)
        return CompressionInfo(details=details)


@torch.no_grad()
def refit(model, adapter, calibration: Calibration, coeffs) -> dict:
    """Least-squares coefficients on the compressed model's inputs: C = W G' D^T (D G' D^T)^(-1).

    ``coeffs`` holds (block, kind, original weight). G' is the Gram of that linear's input when the calibration
    data runs through the compressed model (every block as compressed, none refitted yet), so later layers absorb
    earlier layers' errors. Returns the relative output error on those inputs before and after, summed over layers.
    """
    fresh = Calibration(tokens=calibration.tokens, seed=calibration.seed, batch_size=calibration.batch_size,
                        placement=calibration.placement)
    by_block: dict[int, list[tuple]] = {}
    for b, kind, weight in coeffs:
        by_block.setdefault(b, []).append((kind, weight))
    before = after = total = 0.0
    for step in block_grams(model, adapter, fresh):  # the outputs feeding the next block were taken before the edit
        for b in step.blocks:
            for kind, weight in by_block.get(b, []):
                lin = adapter.linear(b, kind)
                g = step.stats[b]["grams"][adapter.role_of(kind)].double()
                d, w, c_old = lin.down.weight.double(), weight.double().to(g.device), lin.up.weight.double()
                d, c_old = d.to(g.device), c_old.to(g.device)
                dgd = d @ g @ d.T
                dgd = dgd + 1e-10 * dgd.diagonal().mean() * torch.eye(dgd.shape[0], dtype=dgd.dtype, device=dgd.device)
                c = torch.linalg.solve(dgd, d @ g @ w.T).T  # (W G D^T) (D G D^T)^-1, solved without an inverse

                total += _gram_norm2(w, g)
                before += _gram_norm2(w - c_old @ d, g)
                after += _gram_norm2(w - c @ d, g)
                lin.up.weight.data.copy_(c.to(lin.up.weight))
    scale = max(total, 1e-30)
    return {"layers": len(coeffs), "relative_error_before": (before / scale) ** 0.5,
            "relative_error_after": (after / scale) ** 0.5}


def _gram_norm2(e: torch.Tensor, g: torch.Tensor) -> float:
    """||E X||_F^2 = tr(E G E^T) from the Gram G = X X^T."""
    return float(((e @ g) * e).sum())
