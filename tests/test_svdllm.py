"""SVD-LLM: truncation error equals the dropped singular values, exact at full rank, counted budget."""

import copy

import pytest
import torch
from conftest import make_tiny, tiny_calibration

from bench import checkpoint
from bench.adapters import get_adapter
from bench.budget import count_params
from bench.errors import UserError
from bench.registry import Solution
from bench.structure import FactorizedLinear
from methods._whiten import Unit, cholesky, plan_at, solve_ratio, whitened_svd
from methods.svdllm import SVDLLM, linear_units


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("rank", [1, 4, 11])
def test_output_error_is_the_truncated_singular_values(rank):
    g = torch.Generator().manual_seed(rank)
    w = torch.randn(24, 16, generator=g, dtype=torch.float64)
    x = torch.randn(16, 200, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 16, dtype=torch.float64)[:, None]
    f = whitened_svd(w, x @ x.T, rank)
    err = torch.linalg.norm(w @ x - f.up @ (f.down @ x))
    assert f.up.shape == (24, rank) and f.down.shape == (rank, 16)
    torch.testing.assert_close(err, torch.tensor(f.truncated_energy, dtype=torch.float64), rtol=1e-8, atol=1e-9)
    # and it beats the plain (unwhitened) truncated SVD on these inputs
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    plain = torch.linalg.norm(w @ x - (u[:, :rank] * s[:rank]) @ vh[:rank] @ x)
    assert err <= plain + 1e-9


def test_singular_gram_gets_jitter_and_still_factorises():
    x = torch.randn(8, 3, dtype=torch.float64)  # rank 3 < 8: G is singular
    chol, jitter = cholesky(x @ x.T)
    assert jitter > 0 and torch.isfinite(chol).all()
    f = whitened_svd(torch.randn(5, 8, dtype=torch.float64), x @ x.T, 3)
    assert torch.isfinite(f.up).all() and torch.isfinite(f.down).all()


def test_full_rank_reproduces_the_dense_model(family):
    model = make_tiny(family)
    dense = copy.deepcopy(model)
    adapter = get_adapter(model)
    ranks = {u.name: min(u.in_f, u.out_total) for u in linear_units(adapter)}
    SVDLLM().compress(model, adapter, tiny_calibration(), Solution({"r_lin": 0.0, "ranks": ranks}, 0))
    assert all(isinstance(adapter.linear(b, k), FactorizedLinear)
               for b in range(adapter.num_blocks) for k in adapter.kinds())
    ids = tiny_calibration().tokens[:2]
    torch.testing.assert_close(_logits(model, ids), _logits(dense, ids), rtol=0, atol=2e-4)


@pytest.mark.parametrize("ratio", [0.05, 0.12, 0.24])
def test_predicted_params_are_the_counted_params(family, ratio):
    model = make_tiny(family)
    adapter = get_adapter(model)
    dense = count_params(model)
    method = SVDLLM()
    sol = method.solve(adapter, ratio)
    method.compress(model, adapter, tiny_calibration(), sol)
    assert count_params(model) == sol.predicted_params
    assert abs(1 - sol.predicted_params / dense - ratio) < 0.01
    for name, k in sol.knobs["ranks"].items():
        lin = model.get_submodule(name)
        assert isinstance(lin, FactorizedLinear) and lin.rank == k
        assert k * (lin.in_features + lin.out_features) < lin.in_features * lin.out_features


def test_rank_follows_the_paper_formula():
    unit = Unit("w", in_f=576, out_total=1536)
    assert unit.rank(0.2) == int(576 * 1536 * 0.8 // (576 + 1536))
    assert plan_at([unit], 10**6, 0.2).params == 10**6 - 576 * 1536 + unit.rank(0.2) * (576 + 1536)


def test_solver_takes_the_closest_step():
    units = [Unit(f"w{i}", 64, 96) for i in range(3)]
    dense = 3 * 64 * 96 + 1000
    plan = solve_ratio(units, dense, 0.3, "svdllm")
    target = 0.7 * dense
    for r in torch.linspace(0, 0.999, 400).tolist():  # no r_lin lands nearer the target
        assert abs(plan.params - target) <= abs(plan_at(units, dense, r).params - target)


def test_ratio_beyond_reach_is_refused(family):
    adapter = get_adapter(make_tiny(family))
    with pytest.raises(UserError, match="beyond reach"):
        SVDLLM().solve(adapter, 0.99)


def test_checkpoint_round_trip(tmp_path, tiny_tokenizer):
    model = make_tiny("llama", vocab_size=len(tiny_tokenizer))
    adapter = get_adapter(model)
    method = SVDLLM()
    method.compress(model, adapter, tiny_calibration(), method.solve(adapter, 0.2))
    checkpoint.save(model, tiny_tokenizer, tmp_path / "ck")
    loaded, _ = checkpoint.load(tmp_path / "ck")
    ids = tiny_calibration().tokens[:2]
    assert torch.equal(_logits(model, ids), _logits(loaded, ids))
    assert count_params(loaded) == count_params(model)
