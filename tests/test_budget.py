"""The parameter counter: storage-based, whole model, tied and shared tensors once."""

import torch
from conftest import make_tiny

from bench import structure
from bench.adapters import get_adapter
from bench.budget import budget_report, count_block_matrix_params, count_params, linear_only_ratio


def test_tied_embeddings_count_once():
    model = make_tiny(tie_word_embeddings=True)
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    naive = sum(t.numel() for t in model.state_dict().values())
    assert count_params(model) == naive - emb.numel()


def test_untied_head_counts_twice():
    tied, untied = make_tiny(tie_word_embeddings=True), make_tiny(tie_word_embeddings=False)
    assert count_params(untied) - count_params(tied) == untied.get_output_embeddings().weight.numel()


def test_views_of_one_storage_count_once():
    lin = torch.nn.Linear(8, 8, bias=False)
    other = torch.nn.Linear(8, 8, bias=False)
    other.weight = lin.weight  # same Parameter under two names
    mod = torch.nn.ModuleDict({"a": lin, "b": other})
    assert count_params(mod) == 64


def test_shared_basis_counted_once(family):
    model = make_tiny(family)
    adapter = get_adapter(model)
    kind = adapter.slots[0].kind
    names = [adapter.linear_name(b, kind) for b in (0, 1)]
    outs = [adapter.linear(b, kind).out_features for b in (0, 1)]
    ins = adapter.linear(0, kind).in_features
    has_bias = adapter.linear(0, kind).bias is not None
    before = count_params(model)
    structure.apply(model, adapter, "share_basis", modules=names, rank=4)
    removed = sum(o * ins for o in outs) - (4 * ins + sum(4 * o for o in outs))
    assert count_params(model) == before - removed
    assert has_bias is (adapter.linear(0, kind).up.bias is not None)


def test_budget_report_counts_the_compressed_model(family):
    dense = make_tiny(family)
    adapter = get_adapter(dense)
    p0, lin0 = count_params(dense), count_block_matrix_params(adapter)
    structure.apply(dense, adapter, "remove_blocks", indices=[0])
    rep = budget_report(p0, lin0, adapter, target_ratio=0.2, tolerance=0.02)
    assert rep.params_compressed == count_params(dense)
    assert rep.achieved_ratio == 1 - rep.params_compressed / p0
    assert abs(rep.linear_ratio - 0.25) < 1e-12  # one of four identical blocks
    assert rep.within_tolerance == (abs(rep.achieved_ratio - 0.2) <= 0.02)


def test_linear_only_ratio_formula():
    # SmolLM2-like: 134.5M total, 106.2M in block linears -> 12% of the model is 15.2% of the linears
    assert abs(linear_only_ratio(0.12, 134_515_008, 106_168_320) - 0.12 * 134_515_008 / 106_168_320) < 1e-15
