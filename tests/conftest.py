"""Shared fixtures: tiny random-weight models of each supported architecture, a tiny tokenizer."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
import transformers

from bench.calibration import Calibration

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)

# family -> config class; every supported architecture gets a tiny model here.
FAMILIES = {
    "llama": transformers.LlamaConfig,
}


def make_tiny(family: str = "llama", seed: int = 0, vocab_size: int = 384, **overrides) -> torch.nn.Module:
    """A tiny random-weight causal LM of ``family`` in float32, eval mode."""
    cfg = FAMILIES[family](vocab_size=vocab_size, **{**TINY, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # random init of norms is all ones; perturb so that norm folding and scaling are really tested
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tiny_calibration(vocab_size: int = 384, n: int = 8, seq_len: int = 32, seed: int = 0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    return Calibration(tokens=torch.randint(0, vocab_size, (n, seq_len), generator=g), seed=seed,
                       source="random tokens", batch_size=4)


def _wiki_sample(chars: int = 60_000) -> str:
    spec = importlib.util.find_spec("exllamav2")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "conversion/standard_cal_data/wiki.utf8"
    return path.read_text(encoding="utf-8")[:chars]


def make_tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE trained in a second on packaged Wikipedia text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = _wiki_sample()
    tok.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(family):
    return make_tiny(family)


@pytest.fixture
def tiny_calib():
    return tiny_calibration()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> pathlib.Path:
    """A saved tiny llama with a real tokenizer, usable as ``bench run --model <dir>``."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny("llama", vocab_size=len(tiny_tokenizer))
    model.config.bos_token_id = model.config.eos_token_id = tiny_tokenizer.eos_token_id
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path
