"""Basis Sharing: one stored basis per group, exact at full rank, counted budget, refit that helps."""

import copy

import pytest
import torch
from conftest import make_tiny, tiny_calibration

from bench.adapters import get_adapter
from bench.budget import count_params
from bench.calibration import collect_grams
from bench.errors import UserError
from bench.registry import Solution
from bench.structure import FactorizedLinear
from methods.basis import BasisSharing, groups_of, units
from methods.svdllm import SVDLLM


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_groups_are_consecutive_with_a_leftover():
    assert groups_of(5, 2) == [[0, 1], [2, 3], [4]]
    assert groups_of(4, 4) == [[0, 1, 2, 3]]


def test_default_shares_the_input_linears_only(family):
    adapter = get_adapter(make_tiny(family))
    shared = BasisSharing()._shared(adapter)
    assert shared and all(adapter.role_of(k) in ("attn_in", "mlp_in") for k in shared)
    assert not {"o", "down"} & set(shared)


def test_full_rank_reproduces_the_dense_model(family):
    model = make_tiny(family)
    dense = copy.deepcopy(model)
    adapter = get_adapter(model)
    method = BasisSharing()
    shared = method._shared(adapter)
    ranks = {u.name: min(u.in_f, u.out_total) for u in units(adapter, shared, 2)}
    method.compress(model, adapter, tiny_calibration(), Solution({"r_lin": 0.0, "ranks": ranks, "shared": shared}, 0))
    ids = tiny_calibration().tokens[:2]
    torch.testing.assert_close(_logits(model, ids), _logits(dense, ids), rtol=0, atol=2e-4)


@pytest.mark.parametrize("ratio", [0.05, 0.12, 0.24])
def test_predicted_params_are_the_counted_params_and_the_basis_is_stored_once(family, ratio):
    model = make_tiny(family)
    adapter = get_adapter(model)
    dense = count_params(model)
    method = BasisSharing()
    sol = method.solve(adapter, ratio)
    method.compress(model, adapter, tiny_calibration(), sol)
    assert count_params(model) == sol.predicted_params
    assert abs(1 - sol.predicted_params / dense - ratio) < 0.01
    for kind in sol.knobs["shared"]:
        a, b = adapter.linear(0, kind), adapter.linear(1, kind)
        if isinstance(a, FactorizedLinear):
            assert a.down is b.down and a.up is not b.up


def test_group_of_one_is_svdllm(family):
    """With groups of one nothing is shared and every factor equals SVD-LLM's (up to the sigma split)."""
    m1, m2 = make_tiny(family), make_tiny(family)
    a1, a2 = get_adapter(m1), get_adapter(m2)
    s1, s2 = BasisSharing(group_size=1).solve(a1, 0.15), SVDLLM().solve(a2, 0.15)
    assert s1.predicted_params == s2.predicted_params
    BasisSharing(group_size=1).compress(m1, a1, tiny_calibration(), s1)
    SVDLLM().compress(m2, a2, tiny_calibration(), s2)
    ids = tiny_calibration().tokens[:2]
    torch.testing.assert_close(_logits(m1, ids), _logits(m2, ids), rtol=1e-3, atol=1e-3)


def test_shared_basis_error_is_the_truncated_energy_of_the_stacked_weights():
    model = make_tiny("llama")
    adapter = get_adapter(model)
    calib = tiny_calibration()
    grams = collect_grams(model, adapter, calib)
    w = torch.cat([adapter.linear(b, "up").weight.detach().double() for b in (0, 1)])
    g = grams[(0, "mlp_in")] + grams[(1, "mlp_in")]
    dense_w = [adapter.linear(b, "up").weight.detach().double().clone() for b in (0, 1)]
    rank = 10
    method = BasisSharing(shared=["up"])
    ranks = {"up@0+1": rank}
    method.compress(model, adapter, calib, Solution({"r_lin": 0.0, "ranks": ranks, "shared": ["up"]}, 0))
    err2 = 0.0  # the objective the shared whitening minimises: sum_i ||(W_i - C_i D) L||^2 with G = L L^T summed
    for b in (0, 1):
        lin = adapter.linear(b, "up")
        e = dense_w[b] - lin.up.weight.detach().double() @ lin.down.weight.detach().double()
        err2 += float(((e @ g) * e).sum())
    chol = torch.linalg.cholesky(g)
    s = torch.linalg.svdvals(w @ chol)
    assert err2**0.5 == pytest.approx(float(s[rank:].square().sum().sqrt()), rel=1e-4)


def test_refit_lowers_the_error_on_the_compressed_inputs(family):
    model = make_tiny(family)
    adapter = get_adapter(model)
    method = BasisSharing(refit_from=0.0)
    info = method.compress(model, adapter, tiny_calibration(), method.solve(adapter, 0.3))
    refit = info.details["refit"]
    assert refit["layers"] > 0
    assert refit["relative_error_after"] <= refit["relative_error_before"] + 1e-9


def test_refit_is_off_below_its_threshold(family):
    model = make_tiny(family)
    adapter = get_adapter(model)
    method = BasisSharing()
    sol = method.solve(adapter, 0.05)
    assert sol.knobs["r_lin"] < 0.4
    assert "refit" not in method.compress(model, adapter, tiny_calibration(), sol).details


def test_bad_knobs_are_refused():
    adapter = get_adapter(make_tiny("llama"))
    with pytest.raises(UserError, match="no linear"):
        BasisSharing(shared=["nosuch"]).solve(adapter, 0.1)
    with pytest.raises(UserError, match="group_size"):
        BasisSharing(group_size=0).solve(adapter, 0.1)
