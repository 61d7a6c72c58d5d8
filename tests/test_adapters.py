"""Adapters: every path resolves, roles and norms mean what they claim, block removal keeps models working."""

from types import SimpleNamespace

import pytest
import torch
import transformers
from conftest import FAMILIES, make_tiny, tiny_calibration
from torch import nn

from bench.adapters import ADAPTERS, get_adapter, supported_model_types
from bench.adapters.base import get_module
from bench.calibration import collect_block_cosines, collect_grams
from bench.errors import UserError

ROLE_ORDER = ["attn_in", "attn_out", "mlp_in", "mlp_out"]


def _ids(n: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    """Longer than the tiny configs' sliding window (8), so windowed attention and its cache act."""
    return torch.randint(3, 384, (n, length), generator=torch.Generator().manual_seed(seed))


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _capture(modules: dict[str, nn.Module], model: nn.Module, ids: torch.Tensor) -> tuple[dict, dict]:
    """Inputs and outputs of named modules during one forward pass."""
    ins, outs, handles = {}, {}, []
    for name, mod in modules.items():
        def hook(_m, args, kwargs, output, name=name):
            x = args[0] if args else kwargs["hidden_states"]
            ins[name], outs[name] = x.detach(), _first(output).detach()

        handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return ins, outs


# -- registry -----------------------------------------------------------------------------------


def test_get_adapter_picks_the_family(family):
    adapter = get_adapter(make_tiny(family))
    assert adapter.family == family
    assert adapter.model.config.model_type in adapter.model_types


def test_every_adapter_is_tested_and_model_types_are_unique():
    assert {cls.family for cls in ADAPTERS} <= set(FAMILIES)
    types = [t for cls in ADAPTERS for t in cls.model_types]
    assert len(types) == len(set(types))


def test_unknown_model_type_names_the_supported_ones():
    model = SimpleNamespace(config=SimpleNamespace(model_type="no_such_arch"))
    with pytest.raises(UserError) as err:
        get_adapter(model)
    for t in supported_model_types():
        assert t in str(err.value)
    assert "no_such_arch" in str(err.value)


# -- where things are ---------------------------------------------------------------------------


def test_slots_are_linears_of_consistent_widths(family):
    model = make_tiny(family)
    adapter = get_adapter(model)
    hidden = model.config.hidden_size
    assert adapter.roles() == ROLE_ORDER
    for b in range(adapter.num_blocks):
        parts = {}
        for s in adapter.slots:
            lin = adapter.linear(b, s.kind)
            assert type(lin) is nn.Linear, (s.kind, type(lin))
            assert get_module(model, adapter.linear_name(b, s.kind)) is lin
            if s.role in ("attn_in", "mlp_in"):
                assert lin.in_features == hidden
            else:
                assert lin.out_features == hidden
            parts.update({k: sl.stop - sl.start for k, sl in adapter.part_slices(b, s.kind).items()})
        assert set(parts) == {"q", "k", "v", "o", "gate", "up", "down"}
        cfg = model.config
        assert parts["q"] == adapter.linear(b, "o").in_features
        assert parts["k"] == parts["v"] == parts["q"] * cfg.num_key_value_heads // cfg.num_attention_heads
        assert parts["gate"] == parts["up"] == adapter.linear(b, "down").in_features


def test_embeddings_head_and_final_norm(family):
    model = make_tiny(family)
    adapter = get_adapter(model)
    assert adapter.embeddings() is model.get_input_embeddings()
    assert adapter.lm_head() is model.get_output_embeddings()
    assert adapter.final_norm() is model.model.norm
    assert adapter.tied_embeddings() is model.config.tie_word_embeddings
    assert not get_adapter(make_tiny(family, tie_word_embeddings=False)).tied_embeddings()


def test_embed_scale_is_what_the_embedding_applies(family):
    model = make_tiny(family)
    adapter = get_adapter(model)
    ids = _ids()
    emb = adapter.embeddings()
    with torch.no_grad():
        first_hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[0]
        assert torch.equal(emb(ids), first_hidden)
        torch.testing.assert_close(first_hidden, emb.weight[ids] * adapter.embed_scale(), rtol=0, atol=0)
    expected = model.config.hidden_size**0.5 if family.startswith("gemma") else 1.0
    assert adapter.embed_scale() == pytest.approx(expected)


def test_norm_gain_convention(family):
    """Every norm computes x / rms(x) * norm_gain; setting the gain to 1 leaves a pure normaliser."""
    adapter = get_adapter(make_tiny(family))
    x = torch.randn(3, 5, adapter.config.hidden_size)
    block = adapter.block(0)
    norms = [get_module(block, p) for w in ("attn", "mlp") for p in adapter.sublayer_paths(w) if "norm" in p]
    for norm in [*norms, adapter.final_norm()]:
        eps = getattr(norm, "eps", None) or norm.variance_epsilon
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        with torch.no_grad():
            torch.testing.assert_close(norm(x), normed * adapter.norm_gain(norm))
            adapter.set_norm_gain(norm, 1.0)
            torch.testing.assert_close(norm(x), normed)
    assert adapter.norm_weight_offset == (1.0 if family.startswith("gemma") else 0.0)


def test_sublayer_paths_cover_the_block_and_form_its_residual_branches(family):
    model = make_tiny(family)
    adapter = get_adapter(model)
    block = adapter.block(1)
    attn, mlp = adapter.sublayer_paths("attn"), adapter.sublayer_paths("mlp")
    with_params = {name for name, child in block.named_children() if any(True for _ in child.parameters())}
    assert with_params == set(attn) | set(mlp) and not set(attn) & set(mlp)
    mods = {"block": block, **{p: get_module(block, p) for p in attn + mlp}}
    ins, outs = _capture(mods, model, _ids())
    mid = ins["block"] + outs[attn[-1]]  # residual after the attention branch
    torch.testing.assert_close(ins[mlp[0]], mid)
    torch.testing.assert_close(outs["block"], mid + outs[mlp[-1]])
    with pytest.raises(ValueError):
        adapter.sublayer_paths("moe")


def test_linears_of_one_role_read_the_same_input(family):
    model = make_tiny(family)
    adapter = get_adapter(model)
    mods = {adapter.linear_name(b, s.kind): adapter.linear(b, s.kind) for b in (0, 3) for s in adapter.slots}
    ins, _ = _capture(mods, model, _ids())
    for b in (0, 3):
        for role in adapter.roles():
            got = [ins[adapter.linear_name(b, s.kind)] for s in adapter.slots if s.role == role]
            assert all(torch.equal(got[0], g) for g in got[1:])


def test_part_slices_match_the_forward(family):
    """v rows feed o (zeroing them zeroes o's input); down reads act(gate rows) * up rows."""
    model = make_tiny(family)
    adapter = get_adapter(model)
    b = 2
    where = {part: (s.kind, sl) for s in adapter.slots for part, sl in adapter.part_slices(b, s.kind).items()}
    mlp = get_module(adapter.block(b), adapter.mlp_path)
    act = getattr(mlp, "act_fn", None) or mlp.activation_fn
    names = {k: adapter.linear_name(b, k) for k in adapter.kinds()}
    ins, outs = _capture({n: get_module(model, n) for n in names.values()}, model, _ids())
    (gk, gs), (uk, us) = where["gate"], where["up"]
    expected = act(outs[names[gk]][..., gs]) * outs[names[uk]][..., us]
    torch.testing.assert_close(ins[names["down"]], expected)
    vk, vs = where["v"]
    with torch.no_grad():
        lin = adapter.linear(b, vk)
        lin.weight[vs] = 0
        if lin.bias is not None:
            lin.bias[vs] = 0
    ins, _ = _capture({"o": adapter.linear(b, "o")}, model, _ids())
    assert torch.count_nonzero(ins["o"]) == 0


# -- structural edits ---------------------------------------------------------------------------


def _rebuilt_without(model: nn.Module, adapter, drop: list[int]) -> nn.Module:
    """A model built from scratch with only the kept blocks (and their layer types), same weights."""
    cfg = model.config.to_dict()
    kept = [i for i in range(adapter.num_blocks) if i not in drop]
    cfg["num_hidden_layers"] = len(kept)
    if cfg.get("layer_types"):
        cfg["layer_types"] = [cfg["layer_types"][i] for i in kept]
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    fresh = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    renumber = {f"{adapter.block_name(old)}.": f"{adapter.block_name(new)}." for new, old in enumerate(kept)}
    state = {}
    for key, value in model.state_dict().items():
        prefix = next((p for p in renumber if key.startswith(p)), None)
        if prefix is not None:
            state[renumber[prefix] + key[len(prefix):]] = value
        elif not key.startswith(f"{adapter.blocks_path}."):
            state[key] = value
    fresh.load_state_dict(state, strict=True)
    return fresh


def _generate(model: nn.Module, ids: torch.Tensor, cache: bool = True) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                              do_sample=False, use_cache=cache, pad_token_id=0)


@pytest.mark.parametrize("drop", [[1], [0, 2]])
def test_remove_blocks_matches_a_model_built_without_them(family, drop):
    model = make_tiny(family)
    adapter = get_adapter(model)
    ids = _ids()
    reference = _rebuilt_without(model, adapter, drop)
    adapter.remove_blocks(drop)
    assert model.config.num_hidden_layers == adapter.num_blocks == 4 - len(drop)
    for new_idx, block in enumerate(adapter.blocks()):
        idxs = {m.layer_idx for m in block.modules() if hasattr(m, "layer_idx")}
        assert idxs == {new_idx}
    if getattr(model.config, "layer_types", None) is not None:
        assert model.config.layer_types == reference.config.layer_types
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)
    generated = _generate(model, ids)
    assert generated.shape == (2, ids.shape[1] + 5)
    assert torch.equal(generated, _generate(reference, ids))
    assert torch.equal(generated, _generate(model, ids, cache=False))


def test_remove_blocks_rejects_bad_indices(family):
    adapter = get_adapter(make_tiny(family))
    with pytest.raises(IndexError):
        adapter.remove_blocks([4])


# -- calibration statistics ---------------------------------------------------------------------


def test_grams_are_psd_of_the_role_widths(family):
    model = make_tiny(family)
    adapter = get_adapter(model)
    grams = collect_grams(model, adapter, tiny_calibration())
    assert set(grams) == {(b, r) for b in range(adapter.num_blocks) for r in adapter.roles()}
    for (b, role), g in grams.items():
        first = next(s for s in adapter.slots if s.role == role)
        width = adapter.linear(b, first.kind).in_features
        assert g.shape == (width, width) and g.dtype == torch.float64
        torch.testing.assert_close(g, g.T)
        eig = torch.linalg.eigvalsh(g)
        assert eig.min() >= -1e-6 * eig.max() and eig.max() > 0  # PSD up to float32 accumulation


def test_block_cosines_match_hidden_states(family):
    model = make_tiny(family)
    adapter = get_adapter(model)
    calib = tiny_calibration()
    cos = collect_block_cosines(model, adapter, calib)
    assert cos.shape == (adapter.num_blocks,)
    hidden = []
    with torch.no_grad():
        for batch in calib.batches("cpu"):
            hidden.append(model(input_ids=batch, output_hidden_states=True).hidden_states)
    for i in range(adapter.num_blocks - 1):  # the last hidden state is after the final norm
        sims = torch.cat([nn.functional.cosine_similarity(h[i], h[i + 1], dim=-1).flatten() for h in hidden])
        assert cos[i].item() == pytest.approx(sims.double().mean().item(), abs=1e-5)
