"""SliceGPT: exact at zero slicing, counted exactly, sequential PCA, working cache, replayable checkpoints."""

import copy

import pytest
import torch
from conftest import make_tiny, tiny_calibration

from bench import checkpoint, structure
from bench.adapters import get_adapter
from bench.budget import count_params
from bench.errors import UserError
from methods._slicing import RMSNormalize, SlicedBlock, is_rms_norm, predict_params
from methods.slicegpt import SliceGPT, pca

VARIANTS = [{}, {"untie": True}, {"rotation": "global"}, {"slice_head": True}, {"rotation": "global", "untie": True},
            {"pca_signal": "normed"}]


def _refused(adapter) -> bool:
    """Families whose sub-layer outputs are normalised before the residual add (Gemma-2/3)."""
    return bool(adapter.attn_post_norm_path or adapter.mlp_post_norm_path)


def _sliced(family: str, **knobs):
    """A tiny model of ``family`` and its SliceGPT-compressed copy, with the solution; skips refused families."""
    model = make_tiny(family)
    dense = copy.deepcopy(model)
    adapter = get_adapter(model)
    if _refused(adapter):
        pytest.skip(f"{family} is refused (tested separately)")
    method = SliceGPT(**knobs)
    sol = method.solve(adapter, 0.2)
    info = method.compress(model, adapter, tiny_calibration(), sol)
    return dense, model, sol, info


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_families_with_post_norms_are_refused(family):
    model = make_tiny(family)
    adapter = get_adapter(model)
    if not _refused(adapter):
        SliceGPT().solve(adapter, 0.2)
        return
    with pytest.raises(UserError, match=f"does not support the {family} family"):
        SliceGPT().solve(adapter, 0.2)
    with pytest.raises(UserError, match="post-norms"):
        SliceGPT(slicing=0.25).compress(model, adapter, tiny_calibration(), None)


@pytest.mark.parametrize("knobs", VARIANTS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
def test_zero_slicing_with_rotations_equals_dense(family, knobs):
    dense, model, sol, _ = _sliced(family, slicing=0.0, **knobs)
    assert sol.knobs["width"] == 64
    ids = torch.randint(0, 384, (2, 16))
    torch.testing.assert_close(_logits(model, ids), _logits(dense, ids), rtol=0, atol=1e-4)
    assert count_params(model) == sol.predicted_params
    # the rotation really happened: rows keep their Gram matrix (E Q Q^T E^T) but not their values
    emb, emb_dense = get_adapter(model).embeddings().weight, get_adapter(dense).embeddings().weight
    assert not torch.allclose(emb, emb_dense, atol=1e-3)
    torch.testing.assert_close(emb @ emb.T, emb_dense @ emb_dense.T, rtol=0, atol=1e-4)


def test_zero_slicing_shortcuts_are_orthogonal(family):
    _, model, _, _ = _sliced(family, slicing=0.0)
    eye = torch.eye(64)
    for block in get_adapter(model).blocks():
        for s in (block.attn_shortcut, block.mlp_shortcut):  # Q_in^T Q_mid and Q_mid^T Q_out
            torch.testing.assert_close(s.T @ s, eye, rtol=0, atol=1e-5)


def test_pca_is_orthogonal_sorted_and_undamped_in_its_eigenvalues():
    x = torch.randn(500, 12, dtype=torch.float64) * torch.linspace(0.1, 3, 12, dtype=torch.float64)
    h = x.T @ x
    q, vals = pca(h, damping=0.01)
    torch.testing.assert_close(q.T @ q, torch.eye(12, dtype=torch.float64))
    assert torch.all(vals[:-1] >= vals[1:])
    torch.testing.assert_close(h @ q, q * vals)  # eigenpairs of H itself: damping shifts values, not vectors


@pytest.mark.parametrize("knobs", VARIANTS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
def test_moderate_slicing_is_counted_exactly_and_shaped(family, knobs):
    _, model, sol, _ = _sliced(family, slicing=0.25, **knobs)
    adapter = get_adapter(model)
    d, full, n = 48, 64, adapter.num_blocks
    assert sol.knobs == {"width": d, "slicing": 0.25}
    assert count_params(model) == sol.predicted_params
    assert adapter.embeddings().weight.shape[1] == d
    head_in = d if knobs.get("slice_head") else full
    for b, block in enumerate(adapter.blocks()):
        assert isinstance(block, SlicedBlock)
        d_out = head_in if b == n - 1 else d
        if knobs.get("rotation") == "global":
            assert block.attn_shortcut is None and block.mlp_shortcut is None
        else:
            assert block.attn_shortcut.shape == (d, d) and block.mlp_shortcut.shape == (d, d_out)
        for slot in adapter.slots:
            lin = adapter.linear(b, slot.kind)
            width = {"attn_in": d, "attn_out": d, "mlp_in": d, "mlp_out": d_out}[slot.role]
            assert (lin.in_features if slot.role.endswith("_in") else lin.out_features) == width
    head = adapter.lm_head()
    if knobs.get("untie"):
        assert not adapter.tied_embeddings() and head.weight.shape[1] == head_in
        assert not model.config.tie_word_embeddings
    else:
        assert adapter.tied_embeddings() and adapter.final_norm().head_map.shape == (head_in, d)


def test_generate_with_cache_matches_greedy_without(family):
    _, model, _, _ = _sliced(family, slicing=0.25)
    ids = torch.randint(0, 384, (2, 12))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
        seq = ids
        for _ in range(12):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
        assert torch.isfinite(model(seq).logits).all()
    assert torch.equal(out, seq)


def test_pca_runs_on_the_sliced_model(family):
    """Each rotation diagonalises the signal the SLICED model produces there: sequential, not from the dense model."""
    _, model, _, _ = _sliced(family, slicing=0.25)
    adapter = get_adapter(model)
    grams: dict[str, torch.Tensor] = {}

    def hook(key):
        def fn(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[key] = grams.get(key, 0) + x.T @ x
        return fn

    handles = [b.sub(r).register_forward_pre_hook(hook(f"{i}.{r}"))
               for i, b in enumerate(adapter.blocks()) for r in ("attn_norm", "mlp_norm")]
    with torch.no_grad():
        for batch in tiny_calibration().batches("cpu"):
            model(batch, use_cache=False)
    for h in handles:
        h.remove()
    for key, g in grams.items():
        diag = g.diagonal()
        off = g - torch.diag(diag)
        assert off.abs().max() < 1e-4 * diag.max(), key
        assert torch.all(diag[:-1] >= diag[1:] * (1 - 1e-6)), key


@pytest.mark.parametrize("knobs", [{}, {"untie": True}, {"rotation": "global"}])
def test_solver_picks_the_closest_counted_width(knobs):
    model = make_tiny("llama")
    adapter = get_adapter(model)
    dense = count_params(model)
    method = SliceGPT(round_to=4, **knobs)
    sol = method.solve(adapter, 0.3)
    widths = range(4, 65, 4)
    best = min(widths, key=lambda w: (abs(1 - predict_params(adapter, method.plan(adapter, w)) / dense - 0.3), -w))
    assert sol.knobs["width"] == best
    method.compress(model, adapter, tiny_calibration(), sol)
    assert count_params(model) == sol.predicted_params
    assert f"{1 - sol.predicted_params / dense:.4f}" in sol.notes


def test_solver_refuses_beyond_the_thinnest_model():
    adapter = get_adapter(make_tiny("llama"))
    with pytest.raises(UserError, match="beyond slicegpt"):
        SliceGPT().solve(adapter, 0.99)
    with pytest.raises(UserError, match="slicing"):
        SliceGPT(slicing=1.0).solve(adapter, 0.2)
    with pytest.raises(UserError, match="rotation"):
        SliceGPT(rotation="layer").solve(adapter, 0.2)
    with pytest.raises(UserError, match="pca_signal"):
        SliceGPT(pca_signal="whitened").solve(adapter, 0.2)


def test_untying_counts_the_new_head():
    model = make_tiny("llama")
    adapter = get_adapter(model)
    tied, untied = SliceGPT(slicing=0.25), SliceGPT(slicing=0.25, untie=True)
    gap = untied.solve(adapter, 0.2).predicted_params - tied.solve(adapter, 0.2).predicted_params
    assert gap == 384 * 64 - 64 * 48  # a V x D head instead of the D x d map


def test_refuses_non_rms_norms():
    adapter = get_adapter(make_tiny("llama"))
    assert is_rms_norm(adapter, adapter.final_norm())
    assert not is_rms_norm(adapter, torch.nn.LayerNorm(64))
    assert not is_rms_norm(adapter, RMSNormalize(64, 1e-6))


@pytest.mark.parametrize("knobs", [{}, {"untie": True}, {"rotation": "global", "slice_head": True}])
def test_checkpoint_round_trip(tmp_path, family, knobs, tiny_tokenizer):
    model = make_tiny(family, vocab_size=len(tiny_tokenizer))
    adapter = get_adapter(model)
    if _refused(adapter):
        pytest.skip(f"{family} is refused")
    method = SliceGPT(slicing=0.25, **knobs)
    method.compress(model, adapter, tiny_calibration(len(tiny_tokenizer)), method.solve(adapter, 0.2))
    ids = torch.randint(0, len(tiny_tokenizer), (2, 12))
    checkpoint.save(model, tiny_tokenizer, tmp_path / "ck")
    loaded, _ = checkpoint.load(tmp_path / "ck")
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert count_params(loaded) == count_params(model)
    assert get_adapter(loaded).tied_embeddings() == get_adapter(model).tied_embeddings()
    ops = [op["op"] for op in structure.structure_log(loaded)]
    assert ops == ["slicegpt_ends"] + ["slicegpt_block"] * adapter.num_blocks


def test_official_variant_is_the_dense_model_with_centred_embeddings_and_an_untied_head(family):
    dense, model, sol, info = _sliced(family, slicing=0.0, variant="official")
    ref = copy.deepcopy(dense)  # the official fusion by hand: head copied first, then each embedding row centred
    adapter = get_adapter(ref)
    head = adapter.lm_head()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    with torch.no_grad():
        emb = adapter.embeddings().weight
        emb -= emb.mean(-1, keepdim=True)
    ids = torch.randint(0, 384, (2, 16))
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), rtol=0, atol=1e-4)
    assert info.details["variant"] == "official" and info.details["embedding_centred"]
    assert info.details["head"] == "untied"
    untied = SliceGPT(slicing=0.0, untie=True).solve(get_adapter(dense), 0.2)
    assert count_params(model) == sol.predicted_params == untied.predicted_params


def test_official_variant_refuses_other_rotations():
    adapter = get_adapter(make_tiny("llama"))
    with pytest.raises(UserError, match="variant=official"):
        SliceGPT(variant="official", rotation="global").solve(adapter, 0.2)
    with pytest.raises(UserError, match="slicegpt.variant"):
        SliceGPT(variant="paper").solve(adapter, 0.2)
