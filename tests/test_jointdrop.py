"""JointDrop: sub-layers really go (parameters and compute), the rest computes as before, generation works."""

import copy

import pytest
import torch
from conftest import make_tiny, tiny_calibration

from bench import checkpoint, structure
from bench.adapters import get_adapter
from bench.adapters.base import get_module
from bench.budget import count_params
from bench.errors import UserError
from bench.models import kv_cache_kwarg, returned_kv_cache
from methods.jointdrop import JointDrop


def _size(model, block: int, which: str) -> int:
    adapter = get_adapter(model)
    return sum(p.numel() for path in adapter.sublayer_paths(which)
               for p in get_module(adapter.block(block), path).parameters())


def _importance_by_hand(model) -> dict[str, list[float]]:
    """1 - mean cos(X, X + F) with X caught entering each branch's pre-norm and F leaving its last module."""
    adapter = get_adapter(model)
    x, f = {}, {}
    sums = {w: [0.0] * adapter.num_blocks for w in ("attn", "mlp")}
    handles, count = [], 0
    for i, block in enumerate(adapter.blocks()):
        for which in ("attn", "mlp"):
            paths = adapter.sublayer_paths(which)
            first, last = get_module(block, paths[0]), get_module(block, paths[-1])
            handles.append(first.register_forward_pre_hook(lambda _m, a, k=(i, which): x.__setitem__(k, a[0])))
            handles.append(last.register_forward_hook(
                lambda _m, _a, out, k=(i, which): f.__setitem__(k, out[0] if isinstance(out, tuple) else out)))
    with torch.no_grad():
        for batch in tiny_calibration().batches("cpu"):
            model(input_ids=batch, use_cache=False)
            count += batch.numel()
            for (i, which), xi in x.items():
                sums[which][i] += torch.cosine_similarity(xi, xi + f[(i, which)], dim=-1).sum().item()
    for h in handles:
        h.remove()
    return {w: [1 - s / count for s in v] for w, v in sums.items()}


def test_attention_first_solver_drops_attention_first_then_mlps(family):
    model = make_tiny(family)
    adapter = get_adapter(model)
    dense, h = count_params(model), adapter.num_blocks
    a, m = _size(model, 0, "attn"), _size(model, 0, "mlp")
    method = JointDrop(ranking="attn_first")
    sol = method.solve(adapter, 1.4 * a / dense)
    assert sol.knobs == {"attn": 1, "mlp": 0} and sol.predicted_params == dense - a
    sol = method.solve(adapter, ((h - 1) * a + 2 * m) / dense)
    assert sol.knobs == {"attn": h - 1, "mlp": 2} and sol.predicted_params == dense - (h - 1) * a - 2 * m
    most = (h - 1) * (a + m) / dense
    assert method.solve(adapter, most).knobs == {"attn": h - 1, "mlp": h - 1}
    with pytest.raises(UserError, match="beyond"):
        method.solve(adapter, most + 0.01)
    with pytest.raises(UserError, match="beyond"):
        JointDrop(mode="attn").solve(adapter, h * a / dense)
    with pytest.raises(UserError, match="mode"):
        JointDrop(mode="heads").solve(adapter, 0.1)
    with pytest.raises(UserError, match="ranking"):
        JointDrop(ranking="mlp_first").solve(adapter, 0.1)


def test_drops_the_least_important_sublayers_for_real(family):
    model = make_tiny(family)
    dense_model = copy.deepcopy(model)
    adapter = get_adapter(model)
    dense = count_params(model)
    a, m = _size(model, 0, "attn"), _size(model, 0, "mlp")
    h = adapter.num_blocks
    method = JointDrop(ranking="attn_first")
    sol = method.solve(adapter, ((h - 1) * a + m) / dense)
    assert sol.knobs == {"attn": h - 1, "mlp": 1}
    calls = {}
    for i, block in enumerate(adapter.blocks()):
        for which in ("attn", "mlp"):
            for path in adapter.sublayer_paths(which):
                get_module(block, path).register_forward_hook(
                    lambda *_, k=(i, which, path): calls.__setitem__(k, calls.get(k, 0) + 1))
    info = method.compress(model, adapter, tiny_calibration(), sol)
    assert info.details["ranking"] == "attn_first"

    imp = _importance_by_hand(dense_model)
    for which in ("attn", "mlp"):
        assert info.details[f"{which}_importance"] == pytest.approx(imp[which], abs=1e-5)
        chosen = sorted(sorted(range(h), key=imp[which].__getitem__)[: sol.knobs[which]])
        assert info.details[f"dropped_{which}"] == chosen
    gone = [(i, "attn") for i in info.details["dropped_attn"]] + [(i, "mlp") for i in info.details["dropped_mlp"]]
    assert count_params(model) == sol.predicted_params == dense - sum(_size(dense_model, i, w) for i, w in gone)
    for i, which in gone:
        assert all(not list(get_module(adapter.block(i), p).parameters()) for p in adapter.sublayer_paths(which))

    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    calls.clear()
    with torch.no_grad():
        got = model(ids).logits
    assert all((i, w) not in {k[:2] for k in calls} for i, w in gone)  # the dropped modules never ran
    assert {k[:2] for k in calls} == {(i, w) for i in range(h) for w in ("attn", "mlp")} - set(gone)

    # reference: the dense model with the dropped branches' outputs replaced by zeros
    ref = get_adapter(dense_model)
    for i, which in gone:
        path = ref.attn_path if which == "attn" else ref.mlp_path
        get_module(ref.block(i), path).register_forward_hook(
            lambda _m, _a, out: (torch.zeros_like(out[0]), *out[1:]) if isinstance(out, tuple) else torch.zeros_like(out))
    with torch.no_grad():
        torch.testing.assert_close(got, dense_model(ids).logits, rtol=0, atol=1e-5)


def test_kv_cache_stays_right_when_layer_zero_attention_is_gone(family, tmp_path, tiny_tokenizer):
    model = make_tiny(family, vocab_size=len(tiny_tokenizer))
    adapter = get_adapter(model)
    for b, which in [(0, "attn"), (2, "attn"), (1, "mlp")]:
        structure.apply(model, adapter, "drop_sublayer", block=b, which=which)
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :12], use_cache=True)
        cache, steps = returned_kv_cache(out), [out.logits]
        cache_kw = kv_cache_kwarg(model)
        for t in range(12, 20):  # past the sliding windows of the families that have them
            out = model(ids[:, t : t + 1], use_cache=True, **{cache_kw: cache})
            steps.append(out.logits)
        assert cache.get_seq_length() == 20
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-4)
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
        again = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                               use_cache=False)
    assert gen.shape == (2, 25) and torch.equal(gen, again)

    checkpoint.save(model, tiny_tokenizer, tmp_path / "ck")
    loaded, _ = checkpoint.load(tmp_path / "ck")
    assert count_params(loaded) == count_params(model)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, full)


@pytest.mark.parametrize("mode", ["attn", "mlp", "block"])
def test_single_kind_modes(family, mode):
    model = make_tiny(family)
    adapter = get_adapter(model)
    dense = count_params(model)
    unit = _size(model, 0, "attn") + _size(model, 0, "mlp") if mode == "block" else _size(model, 0, mode)
    method = JointDrop(mode=mode)
    sol = method.solve(adapter, 1.9 * unit / dense)
    assert sol.knobs == {"blocks" if mode == "block" else mode: 2}
    info = method.compress(model, adapter, tiny_calibration(), sol)
    assert count_params(model) == sol.predicted_params < dense
    if mode == "block":
        assert get_adapter(model).num_blocks == 4 - sol.knobs["blocks"] == 4 - len(info.details["removed_blocks"])
    else:
        assert len(info.details[f"dropped_{mode}"]) == 2
        other = "mlp" if mode == "attn" else "attn"
        assert info.details[f"dropped_{other}"] == []


# constructed importances (1 - cos) for 4 blocks; the joint list, most similar first:
# attn3 0.01, mlp0 0.02 (ties with attn1: attention first), attn1 0.02, mlp2 0.03, attn2 0.20, attn0 0.30, mlp1, mlp3
CONSTRUCTED = {"attn": [0.30, 0.02, 0.20, 0.01], "mlp": [0.02, 0.40, 0.03, 0.50]}
JOINT_ORDER = [("attn", 3), ("attn", 1), ("mlp", 0), ("mlp", 2), ("attn", 2), ("attn", 0), ("mlp", 1), ("mlp", 3)]


@pytest.mark.parametrize("k", [1, 3, 4, 6])
def test_joint_ranking_drops_the_top_of_one_list_until_the_budget(family, k):
    model = make_tiny(family)
    adapter = get_adapter(model)
    dense = count_params(model)
    size = {"attn": _size(model, 0, "attn"), "mlp": _size(model, 0, "mlp")}
    top = JOINT_ORDER[:k]
    removed = sum(size[w] for w, _ in top)
    calib = tiny_calibration()
    calib.memo["sublayer_importance"] = CONSTRUCTED
    method = JointDrop(keep_attn=0, keep_mlp=0)  # the official code keeps nothing back
    sol = method.solve(adapter, removed / dense)
    assert sol.knobs == {"ranking": "joint", "target_removed": removed}
    info = method.compress(model, adapter, calib, sol)
    assert info.details["drop_order"] == [f"{w}{b}" for w, b in top]
    for which in ("attn", "mlp"):
        assert info.details[f"dropped_{which}"] == sorted(b for w, b in top if w == which)
    assert info.details["ranking"] == "joint"
    assert sol.knobs == {"ranking": "joint", "target_removed": removed,
                         "attn": sum(w == "attn" for w, _ in top), "mlp": sum(w == "mlp" for w, _ in top)}
    assert count_params(model) == sol.predicted_params == dense - removed


def test_joint_ranking_takes_the_closest_prefix_and_respects_keep(family):
    model = make_tiny(family)
    adapter = get_adapter(model)
    dense = count_params(model)
    a, m = _size(model, 0, "attn"), _size(model, 0, "mlp")
    calib = tiny_calibration()
    calib.memo["sublayer_importance"] = CONSTRUCTED
    # 2a + 0.4m is closer to 2a (attn3, attn1) than to 2a + m (then mlp0)
    sol = JointDrop().solve(adapter, (2 * a + 0.4 * m) / dense)
    info = JointDrop().compress(model, adapter, calib, sol)
    assert info.details["drop_order"] == ["attn3", "attn1"] and count_params(model) == sol.predicted_params

    model = make_tiny(family)
    adapter = get_adapter(model)
    method = JointDrop(keep_attn=3)  # only one attention may go: attn1, attn2 and attn0 are skipped
    with pytest.raises(UserError, match="beyond"):
        method.solve(adapter, (a + 3 * m) / dense + 0.01)
    sol = method.solve(adapter, (a + 3 * m) / dense)
    info = method.compress(model, adapter, calib, sol)
    assert info.details["drop_order"] == ["attn3", "mlp0", "mlp2", "mlp1"]


def test_joint_ranking_on_real_importances_drops_the_silent_sublayers(family):
    model = make_tiny(family)
    adapter = get_adapter(model)
    with torch.no_grad():  # a branch whose output linear is zero adds nothing: cos = 1, importance 0
        adapter.linear(2, "o").weight.zero_()
        adapter.linear(0, "down").weight.zero_()
        adapter.linear(3, "down").weight.zero_()
        for b, kind in [(2, "o"), (0, "down"), (3, "down")]:
            if adapter.linear(b, kind).bias is not None:
                adapter.linear(b, kind).bias.zero_()
    a, m = _size(model, 0, "attn"), _size(model, 0, "mlp")
    method = JointDrop()
    info = method.compress(model, adapter, tiny_calibration(), method.solve(adapter, (a + 2 * m) / count_params(model)))
    assert info.details["dropped_attn"] == [2] and info.details["dropped_mlp"] == [0, 3]
