"""Truncation-aware whitened SVD (SVD-LLM) and the rank solver that SVD-LLM and Basis Sharing share.

Convention: a linear computes y = W x with W of shape (out, in); G = sum over calibration tokens of x x^T
(in x in). With the lower Cholesky factor L (G = L L^T) and the SVD W L = U S V^T, the rank-k factors are

    up = U_k S_k^(1/2)            (out x k)
    down = S_k^(1/2) V_k^T L^(-1)  (k x in)

and ||W X - up down X||_F = sqrt(sum of the truncated S_i^2), because L^(-1) X has orthonormal rows.

A *unit* is what one factorisation replaces: one linear (SVD-LLM), or the same linear of n layers stacked
along the output (Basis Sharing, one shared ``down``). At a linear-only ratio r a unit of shape
(out_total, in) keeps rank k = floor(out_total * in * (1 - r) / (out_total + in)) (at least 1); it is factorised only
where that stores fewer parameters than the dense weights, otherwise left dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.errors import UserError


def cholesky(gram: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Lower L with G + jitter I = L L^T, in float64; jitter is 0 unless G is not positive definite.

    On failure the paper's fix is used: add (-lambda_min + eps) I, with eps = 1e-6 times the mean diagonal
    (relative, so it means the same whatever the activation scale), and retry.
    """
    g = gram.double()
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return chol, 0.0
    eps = 1e-6 * float(g.diagonal().mean().clamp(min=1e-30))
    lam = float(torch.linalg.eigvalsh(g).min())
    jitter = max(-lam, 0.0) + eps
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(g + jitter * torch.eye(g.shape[0], dtype=g.dtype, device=g.device))
        if int(info) == 0:
            return chol, jitter
        jitter *= 10
    raise RuntimeError("activation Gram matrix is not positive definite even after adding jitter")


@dataclass
class Factors:
    """The rank-k factors of a whitened SVD and what the truncation threw away."""

    up: torch.Tensor  # out x k
    down: torch.Tensor  # k x in
    sigma: torch.Tensor  # all singular values of W L, descending
    jitter: float

    @property
    def truncated_energy(self) -> float:
        """sqrt(sum of the dropped sigma^2): the predicted ||W X - up down X||_F."""
        return float(self.sigma[self.up.shape[1] :].square().sum().sqrt())


def whitening_workspace(_method, adapter, tokens: int) -> int:
    """``Method.device_workspace`` of every method that factorises with :func:`whitened_svd`: for the widest-input
    linear, its Gram's Cholesky factor, that factor's inverse and the whitened weight, each at most in^2 float64
    (the Gram itself is the engine's statistics)."""
    widest = max(adapter.linear(0, kind).in_features for kind in adapter.kinds())
    return 3 * widest**2 * 8


@torch.no_grad()
def whitened_svd(weight: torch.Tensor, gram: torch.Tensor, rank: int, split: str = "sqrt") -> Factors:
    """Rank-``rank`` factors of ``weight`` (out x in) that minimise the output error on inputs with Gram ``gram``.

    ``split="sqrt"`` puts S^(1/2) on both sides (SVD-LLM); ``split="down"`` puts all of S into ``down``
    (Basis Sharing's shared basis), leaving ``up`` = U_k with orthonormal columns.
    """
    chol, jitter = cholesky(gram.to(weight.device))
    w = weight.detach().double()
    u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
    k = max(1, min(rank, s.numel()))
    if split == "sqrt":
        root = s[:k].sqrt()
        up, down = u[:, :k] * root, root[:, None] * vh[:k]
    elif split == "down":
        up, down = u[:, :k], s[:k, None] * vh[:k]
    else:
        raise ValueError(f"split must be 'sqrt' or 'down', not {split!r}")
    down = torch.linalg.solve_triangular(chol, down, upper=False, left=False)  # down L = S^(1/2) V^T
    return Factors(up=up, down=down, sigma=s, jitter=jitter)


# -- the budget solver ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One factorisation: ``in_f`` inputs, ``out_total`` stacked outputs; ``name`` says what it replaces."""

    name: str
    in_f: int
    out_total: int

    @property
    def dense(self) -> int:
        return self.in_f * self.out_total

    def rank(self, r_lin: float) -> int:
        return max(1, int(self.dense * (1.0 - r_lin) // (self.in_f + self.out_total)))

    def factorised(self, r_lin: float) -> bool:
        k = self.rank(r_lin)
        return k * (self.in_f + self.out_total) < self.dense

    def params(self, r_lin: float) -> int:
        """Weights stored for this unit at ``r_lin`` (biases are untouched and not counted here)."""
        return self.rank(r_lin) * (self.in_f + self.out_total) if self.factorised(r_lin) else self.dense


@dataclass
class RankPlan:
    r_lin: float
    ranks: dict[str, int]  # unit name -> rank, factorised units only
    params: int  # whole-model unique parameters after compression


def plan_at(units: list[Unit], dense_params: int, r_lin: float) -> RankPlan:
    weights = sum(u.dense for u in units)
    kept = sum(u.params(r_lin) for u in units)
    ranks = {u.name: u.rank(r_lin) for u in units if u.factorised(r_lin)}
    return RankPlan(r_lin=r_lin, ranks=ranks, params=dense_params - weights + kept)


def solve_ratio(units: list[Unit], dense_params: int, ratio: float, method: str) -> RankPlan:
    """The linear-only ratio whose counted whole-model parameters are closest to ``(1 - ratio) * dense``.

    Counted parameters fall in steps as r_lin grows; bisection finds the first r_lin at or below the
    target, and the step just before it is the closest one above; the nearer of the two wins.
    """
    if not 0.0 < ratio < 1.0:
        raise UserError(f"{method}: ratio must be in (0, 1), not {ratio}")
    target = (1.0 - ratio) * dense_params
    most = plan_at(units, dense_params, 1.0)
    if most.params > target:
        reach = 1 - most.params / dense_params
        raise UserError(f"{method}: ratio {ratio} is beyond reach; factorising every linear to rank 1 removes "
                        f"{reach:.4f} of the parameters (the rest is embeddings, norms and biases)")
    lo, hi = 0.0, 1.0  # plan(lo) > target >= plan(hi)
    for _ in range(80):
        mid = (lo + hi) / 2
        if plan_at(units, dense_params, mid).params > target:
            lo = mid
        else:
            hi = mid
    below, above = plan_at(units, dense_params, hi), plan_at(units, dense_params, lo)
    return above if abs(above.params - target) < abs(below.params - target) else below
