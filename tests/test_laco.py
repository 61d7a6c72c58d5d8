"""LaCo: RDSC weights are exact, the solver's count is removed, the search's similarity is the real one."""

import copy

import pytest
import torch
from conftest import make_tiny, tiny_calibration
from torch import nn

from bench import checkpoint
from bench.adapters import get_adapter
from bench.adapters.base import get_module
from bench.budget import count_params
from bench.errors import UserError
from methods.laco import LaCo, block_inputs, final_states


def _blocks_state(model) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in b.state_dict().items()} for b in get_adapter(model).blocks()]


def _merged_keys(model) -> set[str]:
    """Weights and biases of the attention and MLP linears, by path inside a block."""
    adapter = get_adapter(model)
    keys = set()
    for branch in (adapter.attn_path, adapter.mlp_path):
        for name, mod in get_module(adapter.block(0), branch).named_modules(prefix=branch):
            if isinstance(mod, nn.Linear):
                keys |= {f"{name}.{p}" for p, _ in mod.named_parameters(recurse=False)}
    return keys


def _ratio(model, blocks: int) -> float:
    return blocks * count_params(get_adapter(model).block(0)) / count_params(model)


def _final_states(model, calib) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for batch in calib.batches("cpu"):
            out.append(model(input_ids=batch, output_hidden_states=True, use_cache=False).hidden_states[-1])
    return torch.cat(out)


def test_merged_weights_are_base_plus_differences(family, tiny_tokenizer, tmp_path):
    model = make_tiny(family, vocab_size=len(tiny_tokenizer), num_hidden_layers=8)
    dense_model = copy.deepcopy(model)
    adapter = get_adapter(model)
    dense = count_params(model)
    method = LaCo(span=3, interval=1, threshold=-1.0)  # every trial accepted: several merges, one into a merged block
    sol = method.solve(adapter, _ratio(model, 4))
    assert sol.knobs == {"blocks": 4}
    calib = tiny_calibration(vocab_size=len(tiny_tokenizer))
    info = method.compress(model, adapter, calib, sol)
    merges = info.details["merges"]
    assert [(m["base"], m["absorbed"]) for m in merges] == [(5, [6, 7]), (4, [5]), (3, [4])]
    assert info.details["removed"] == 4 and "shortfall" not in info.details
    assert count_params(model) == sol.predicted_params == dense - 4 * count_params(adapter.block(0))

    # replay the recorded merges on copies of the dense weights: theta_l* = theta_l + sum_k (theta_(l+k) - theta_l)
    expected = _blocks_state(dense_model)
    linear = _merged_keys(dense_model)
    for m in merges:
        base = expected[m["base"]]
        for key in linear:
            theta = base[key].double()
            base[key] = (theta + sum(expected[k][key].double() - theta for k in m["absorbed"])).float()
        expected = [s for i, s in enumerate(expected) if i not in m["absorbed"]]
    got = _blocks_state(model)
    assert len(got) == len(expected) == 4
    for g, e in zip(got, expected, strict=True):
        assert g.keys() == e.keys()
        for key in g:
            assert torch.equal(g[key], e[key]), key  # norms and QK-norms are the base's own, linears merged

    # the last accepted similarity is the one the compressed model really has
    cos = torch.cosine_similarity(_final_states(dense_model, calib), _final_states(model, calib), dim=-1)
    assert merges[-1]["similarity"] == pytest.approx(cos.mean().item(), abs=1e-5)

    checkpoint.save(model, tiny_tokenizer, tmp_path / "ck")
    loaded, _ = checkpoint.load(tmp_path / "ck")
    ids = calib.tokens[:2]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        assert torch.isfinite(model(ids).logits).all()


def test_default_search_meets_the_count_and_respects_the_lowest_layer(family):
    model = make_tiny(family, num_hidden_layers=8)
    adapter = get_adapter(model)
    method = LaCo()
    sol = method.solve(adapter, _ratio(model, 3))
    info = method.compress(model, adapter, tiny_calibration(), sol)
    assert info.details["removed"] == sol.knobs["blocks"] == 3
    assert count_params(model) == sol.predicted_params
    assert all(m["dense_base"] >= 1 for m in info.details["merges"])  # block 0 is never touched
    assert all(m["similarity"] >= m["threshold"] for m in info.details["merges"])


def test_too_strict_threshold_is_relaxed_step_by_step_or_stops_short(family):
    model = make_tiny(family, num_hidden_layers=8)
    dense_model = copy.deepcopy(model)
    adapter = get_adapter(model)
    dense, block = count_params(model), count_params(adapter.block(0))
    sol = LaCo().solve(adapter, _ratio(model, 3))

    relaxed = LaCo(threshold=1.5).compress(model, adapter, tiny_calibration(), sol).details
    assert relaxed["removed"] == 3 and count_params(model) == sol.predicted_params
    thresholds = [p["threshold"] for p in relaxed["passes"]]
    assert thresholds[0] == 1.5 and relaxed["passes"][0]["accepted"] == 0
    assert all(b <= a - 0.05 for a, b in zip(thresholds, thresholds[1:], strict=False))  # lowered by at least the step
    assert all(m["threshold"] < 1.5 for m in relaxed["merges"])

    strict = LaCo(threshold=1.5, relax_step=0.0)
    short = strict.compress(dense_model, get_adapter(dense_model), tiny_calibration(), sol).details
    assert short["removed"] == 0 and short["shortfall"] == 3 and len(short["passes"]) == 1
    assert count_params(dense_model) == dense != sol.predicted_params == dense - 3 * block


def test_solver_keeps_the_blocks_up_to_the_lowest_layer(family):
    model = make_tiny(family, num_hidden_layers=8)
    adapter = get_adapter(model)
    assert LaCo().solve(adapter, _ratio(model, 6)).knobs == {"blocks": 6}  # all but blocks 0 and 1
    with pytest.raises(UserError, match="beyond"):
        LaCo().solve(adapter, _ratio(model, 6) + 0.01)
    assert LaCo(lowest_layer=0).solve(adapter, _ratio(model, 7)).knobs == {"blocks": 7}
    with pytest.raises(UserError, match="span"):
        LaCo(span=1).solve(adapter, 0.1)


def test_trials_resumed_from_cached_block_inputs_equal_full_forwards(family):
    model = make_tiny(family)
    adapter = get_adapter(model)
    windows = tiny_calibration().tokens
    full = final_states(model, adapter, windows, 4)
    inputs = block_inputs(model, adapter, windows, 4)
    for b in range(adapter.num_blocks):
        resumed = final_states(model, adapter, windows, 4, resume=(b, inputs[b]))
        for x, y in zip(full, resumed, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
