"""A few checks on the real SmolLM2-135M (select with -m real). Small data so they finish in minutes."""

import math

import pytest
import torch

from bench import checkpoint, data
from bench.adapters import get_adapter
from bench.budget import budget_report, count_block_matrix_params, count_params
from bench.calibration import Calibration
from bench.evaluate.perplexity import perplexity
from bench.models import load_model
from bench.registry import get_method

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def real():
    return load_model("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def windows(real):
    return data.perplexity_windows(real.tokenizer, 256, 4)


@pytest.fixture(scope="module")
def dense_ppl(real, windows):
    return perplexity(real.model, windows)["perplexity"]


def test_default_model_shape_and_answer(real, dense_ppl):
    cfg = real.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert count_params(real.model) == 134_515_008  # tied embeddings counted once
    assert 5 < dense_ppl < 40
    ids = real.tokenizer("The capital of France is", return_tensors="pt")
    out = real.model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in real.tokenizer.decode(out[0])


@pytest.mark.parametrize("method", ["svdllm", "basis", "shortgpt"])
def test_methods_hit_the_budget_on_the_real_model(method, real, windows, dense_ppl, tmp_path):
    model = load_model("smollm2-135m", device="cpu", dtype="float32").model
    adapter = get_adapter(model)
    p0, lin0 = count_params(model), count_block_matrix_params(adapter)
    tokens = data.calibration_batch(real.tokenizer, 8, 256, seed=0)
    inst = get_method(method)()
    sol = inst.solve(adapter, 0.12)
    inst.compress(model, adapter, Calibration(tokens=tokens, seed=0, batch_size=4), sol)
    rep = budget_report(p0, lin0, get_adapter(model), 0.12)
    assert rep.params_compressed == sol.predicted_params
    assert rep.within_tolerance, rep
    ppl = perplexity(model, windows)["perplexity"]
    assert math.isfinite(ppl) and dense_ppl < ppl < 20 * dense_ppl
    checkpoint.save(model, real.tokenizer, tmp_path / "ck")
    again, _ = checkpoint.load(tmp_path / "ck")
    ids = windows[:1, :64]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
