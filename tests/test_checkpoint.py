"""Save/load: safetensors plus a structure log; bit-identical outputs; shared tensors stored once."""

import json

import torch
from conftest import make_tiny

from bench import checkpoint, structure
from bench.adapters import get_adapter
from bench.budget import count_params


def _edit(model):
    adapter = get_adapter(model)
    kinds = adapter.kinds()
    structure.apply(model, adapter, "factorize", module=adapter.linear_name(0, kinds[0]), rank=5)
    structure.apply(model, adapter, "share_basis",
                    modules=[adapter.linear_name(1, kinds[-1]), adapter.linear_name(2, kinds[-1])], rank=6)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    structure.apply(model, adapter, "remove_blocks", indices=[3])
    return model


def test_round_trip_is_bit_identical(tmp_path, family, tiny_tokenizer):
    model = _edit(make_tiny(family, vocab_size=len(tiny_tokenizer)))
    ids = torch.randint(0, len(tiny_tokenizer), (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
    checkpoint.save(model, tiny_tokenizer, tmp_path / "ck")
    loaded, tok = checkpoint.load(tmp_path / "ck")
    with torch.no_grad():
        got = loaded(ids).logits
    assert torch.equal(expected, got)
    assert count_params(loaded) == count_params(model)
    assert loaded.config.num_hidden_layers == 3
    meta = json.loads((tmp_path / "ck" / "slimbench.json").read_text())
    assert [op["op"] for op in meta["ops"]] == ["factorize", "share_basis", "remove_blocks"]
    assert meta["base_config"]["num_hidden_layers"] == 4  # the dense skeleton the log replays on


def test_shared_tensors_stored_once(tmp_path, tiny_tokenizer):
    model = _edit(make_tiny("llama"))
    checkpoint.save(model, None, tmp_path / "ck")
    size = (tmp_path / "ck" / checkpoint.WEIGHTS).stat().st_size
    unique_bytes = count_params(model) * 4
    naive_bytes = sum(t.numel() for t in model.state_dict().values()) * 4
    assert unique_bytes < naive_bytes
    assert unique_bytes <= size < unique_bytes + 64 * 1024  # header only on top of the unique tensors
