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


def _cosines_by_hand(model, pieces: list[torch.Tensor] | None = None) -> list[float]:
    """Mean cos(h_in, h_out) per block from output_hidden_states, with the final norm taken out of a copy;
    each of ``pieces`` (default: the calibration windows) run as its own sequence."""
    ref = copy.deepcopy(model)
    set_module(ref, get_adapter(ref).final_norm_path, torch.nn.Identity())
    sums, count = None, 0
    with torch.no_grad():
        for batch in pieces if pieces is not None else tiny_calibration().batches("cpu"):
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
    method = ShortGPT()  # the tiny windows (32 tokens) are shorter than the 256-token segments: whole windows
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


@pytest.mark.parametrize("segment", [8, 12])
def test_segments_score_each_piece_as_its_own_sequence(family, segment):
    model = make_tiny(family)
    calib = tiny_calibration()  # 8 windows x 32 tokens
    tokens = calib.tokens
    pieces = [tokens[i : i + 1, s : s + segment] for i in range(tokens.shape[0]) for s in range(0, 32, segment)]
    expected = [1 - c for c in _cosines_by_hand(model, pieces)]  # 12: pieces of 12, 12 and the 8-token tail
    whole = [1 - c for c in _cosines_by_hand(model)]
    info = ShortGPT(segment=segment).compress(model, get_adapter(model), calib, ShortGPT().solve(get_adapter(model), 0.0))
    assert info.details["block_influence"] == pytest.approx(expected, abs=1e-5)
    assert info.details["block_influence"] != pytest.approx(whole, abs=1e-5)  # causal attention sees less context
    assert info.details["segment"] == segment and info.details["scored_on"] == f"pieces of {segment} tokens"
    assert {e["statistic"] for e in calib.memo["log"]} == {f"block_cosines_seg{segment}"}


def test_segment_length_is_part_of_the_statistic_key(tmp_path):
    model = make_tiny("llama")
    adapter = get_adapter(model)
    calib = tiny_calibration()
    calib.cache_dir, calib.model_key = tmp_path, "tiny"
    paths = {calib.stats_path(n, adapter) for n in ("block_cosines", "block_cosines_seg8", "block_cosines_seg16")}
    assert len(paths) == 3
    ShortGPT(segment=0).compress(model, adapter, calib, ShortGPT().solve(adapter, 0.0))
    ShortGPT(segment=8).compress(model, adapter, calib, ShortGPT().solve(adapter, 0.0))
    assert [e["source"] for e in calib.memo["log"]] == ["computed", "computed"]  # no reuse across definitions
    assert calib.memo["block_cosines"].tolist() != calib.memo["block_cosines_seg8"].tolist()


def test_negative_segment_is_refused():
    model = make_tiny("llama")
    with pytest.raises(UserError, match="segment"):
        ShortGPT(segment=-1).solve(get_adapter(model), 0.1)
