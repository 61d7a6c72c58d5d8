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
    # every trial accepted: two merges, the second into the merged block; the first base is H - C = 7 - 3
    method = LaCo(span=3, interval=1, threshold=-1.0, merge="paper", similarity="token")
    sol = method.solve(adapter, _ratio(model, 4))
    assert sol.knobs == {"blocks": 4}
    calib = tiny_calibration(vocab_size=len(tiny_tokenizer))
    info = method.compress(model, adapter, calib, sol)
    merges = info.details["merges"]
    assert [(m["base"], m["absorbed"]) for m in merges] == [(4, [5, 6]), (3, [4, 5])]
    assert [m["dense_absorbed"] for m in merges] == [[5, 6], [4, 7]]
    assert info.details["merge"] == "paper" and info.details["similarity"] == "token"
    assert [t["accepted"] for t in info.details["trials"]] == [True, True]
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
    method = LaCo(lowest_layer=1)
    sol = method.solve(adapter, _ratio(model, 3))
    info = method.compress(model, adapter, tiny_calibration(), sol)
    assert info.details["removed"] == sol.knobs["blocks"] == 3
    assert count_params(model) == sol.predicted_params
    assert all(m["dense_base"] >= 1 for m in info.details["merges"])  # block 0 is never touched
    assert all(m["similarity"] > m["threshold"] for m in info.details["merges"])
    assert info.details["merge"] == "official" and info.details["similarity"] == "sentence"
    assert all(t["accepted"] == (t["similarity"] > t["threshold"]) for t in info.details["trials"])
    assert [t for t in info.details["trials"] if t["accepted"]] == [
        {**m, "accepted": True} for m in info.details["merges"]]


def test_too_strict_threshold_is_relaxed_step_by_step_or_stops_short(family):
    model = make_tiny(family, num_hidden_layers=8)
    dense_model = copy.deepcopy(model)
    adapter = get_adapter(model)
    dense, block = count_params(model), count_params(adapter.block(0))
    sol = LaCo().solve(adapter, _ratio(model, 3))

    relaxed = LaCo(threshold=1.5).compress(model, adapter, tiny_calibration(), sol).details
    assert relaxed["removed"] == 3 and count_params(model) == sol.predicted_params
    thresholds = [p["threshold"] for p in relaxed["passes"]]
    assert len(thresholds) <= 2 * 3 + 1  # each pass removes a block or makes sure the next one does
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
    assert LaCo(lowest_layer=1).solve(adapter, _ratio(model, 6)).knobs == {"blocks": 6}  # all but blocks 0 and 1
    with pytest.raises(UserError, match="beyond"):
        LaCo(lowest_layer=1).solve(adapter, _ratio(model, 6) + 0.01)
    assert LaCo().solve(adapter, _ratio(model, 7)).knobs == {"blocks": 7}  # the notebook's lowest layer is 0
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


def test_official_merge_leaves_the_last_absorbed_linears_in_the_base(family):
    model = make_tiny(family, num_hidden_layers=8)
    dense_model = copy.deepcopy(model)
    adapter = get_adapter(model)
    method = LaCo(span=4, interval=2, threshold=-1.0)  # official merge by default; every trial accepted
    calib = tiny_calibration()
    info = method.compress(model, adapter, calib, method.solve(adapter, _ratio(model, 3)))
    assert [(m["base"], m["absorbed"]) for m in info.details["merges"]] == [(3, [4, 5, 6])]

    dense = _blocks_state(dense_model)
    got = _blocks_state(model)
    for key in got[3]:
        if key in _merged_keys(dense_model):
            assert torch.equal(got[3][key], dense[6][key]), key
            notebook = dense[3][key].clone()  # the notebook's loop: base += layer_k - base, k = 4, 5, 6
            for k in (4, 5, 6):
                notebook += dense[k][key] - notebook
            torch.testing.assert_close(got[3][key], notebook, rtol=0, atol=1e-6)
        else:
            assert torch.equal(got[3][key], dense[3][key]), key  # the base's own norms
    assert [torch.equal(got[i][k], dense[j][k]) for i, j in ((4, 7), (2, 2)) for k in got[i]] == [True] * (
        len(got[4]) + len(got[2]))

    # the official similarity: one cos per window of the flattened [tokens x hidden] final states, averaged
    a, b = _final_states(dense_model, calib), _final_states(model, calib)
    by_hand = torch.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=-1).mean().item()
    assert info.details["merges"][0]["similarity"] == pytest.approx(by_hand, abs=1e-6)


def test_search_visits_bases_in_the_notebooks_order(family):
    model = make_tiny(family, num_hidden_layers=8)
    adapter = get_adapter(model)
    sol = LaCo().solve(adapter, _ratio(model, 3))
    info = LaCo(threshold=1.0, relax_step=0.0).compress(model, adapter, tiny_calibration(), sol).details
    assert [t["base"] for t in info["trials"]] == [3, 2, 1, 0]  # H - C = 7 - 4, then down by 1 on each rejection
    assert [t["absorbed"] for t in info["trials"]][:1] == [[4, 5, 6]] and info["shortfall"] == 3


@pytest.mark.parametrize("knob", ["threshold=nan", "threshold=inf", "relax_step=nan", "merge=sum", "similarity=x"])
def test_bad_search_knobs_are_refused_before_any_work(knob):
    name, value = knob.split("=")
    with pytest.raises(UserError, match=f"laco.{name}"):
        LaCo(**{name: value if name in ("merge", "similarity") else float(value)}).solve(
            get_adapter(make_tiny("llama")), 0.1)
