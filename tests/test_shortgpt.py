"""ShortGPT: the count comes from the budget, the n lowest-BI blocks go, and the rest computes as before."""

import copy

import pytest
import torch
from conftest import make_tiny, tiny_calibration

from bench.adapters import get_adapter
from bench.adapters.base import set_module
from bench.budget import count_params
from bench.errors import UserError
from methods.shortgpt import ShortGPT


def _block_size(model) -> int:
    block = get_adapter(model).block(0)
    return sum(p.numel() for p in block.parameters())


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.2, 0.3, 0.45])
def test_solver_picks_the_closest_block_count(family, ratio):
    model = make_tiny(family)
    adapter = get_adapter(model)
    dense, size, h = count_params(model), _block_size(model), adapter.num_blocks
    best = min(range(h), key=lambda n: (abs(n * size / dense - ratio), n))
    sol = ShortGPT().solve(adapter, ratio)
    assert sol.knobs == {"blocks": best}
    assert sol.predicted_params == dense - best * size
    assert f"{1 - sol.predicted_params / dense:.4f}" in sol.notes and "miss" in sol.notes


def test_solver_refuses_more_than_all_but_one_block(family):
    model = make_tiny(family)
    adapter = get_adapter(model)
    most = (adapter.num_blocks - 1) * _block_size(model) / count_params(model)
    ShortGPT().solve(adapter, most)
    with pytest.raises(UserError, match="beyond"):
        ShortGPT().solve(adapter, most + 0.01)


def _cosines_by_hand(model) -> list[float]:
    """Mean cos(h_in, h_out) per block from output_hidden_states, with the final norm taken out of a copy."""
    ref = copy.deepcopy(model)
    set_module(ref, get_adapter(ref).final_norm_path, torch.nn.Identity())
    calib = tiny_calibration()
    sums, count = None, 0
    with torch.no_grad():
        for batch in calib.batches("cpu"):
            hs = ref(input_ids=batch, output_hidden_states=True, use_cache=False).hidden_states
            cos = torch.stack([torch.cosine_similarity(hs[i], hs[i + 1], dim=-1).sum() for i in range(len(hs) - 1)])
            sums = cos if sums is None else sums + cos
            count += batch.numel()
    return (sums / count).tolist()


def test_removes_the_lowest_influence_blocks_and_matches_skipping_them(family):
    model = make_tiny(family)
    dense_model = copy.deepcopy(model)
    adapter = get_adapter(model)
    dense = count_params(model)
    method = ShortGPT()
    sol = method.solve(adapter, 2.4 * _block_size(model) / dense)  # closest count: 2 blocks
    assert sol.knobs == {"blocks": 2}
    info = method.compress(model, adapter, tiny_calibration(), sol)

    bi = [1 - c for c in _cosines_by_hand(dense_model)]
    expected = sorted(sorted(range(len(bi)), key=bi.__getitem__)[:2])
    assert info.details["removed_blocks"] == expected
    assert info.details["block_influence"] == pytest.approx(bi, abs=1e-5)
    assert get_adapter(model).num_blocks == len(bi) - 2 and model.config.num_hidden_layers == len(bi) - 2
    assert count_params(model) == sol.predicted_params

    # reference: the dense model with the removed blocks passing their input straight through
    ref_adapter = get_adapter(dense_model)
    for i in expected:
        ref_adapter.block(i).register_forward_hook(
            lambda _m, args, kwargs, _out: ref_adapter.block_input(args, kwargs), with_kwargs=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense_model(ids).logits, rtol=0, atol=1e-5)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 21)
