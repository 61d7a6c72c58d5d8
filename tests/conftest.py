"""Shared fixtures: tiny random-weight models of each supported architecture, a tiny tokenizer."""

from __future__ import annotations

import contextlib
import importlib.util
import pathlib

import pytest
import torch
import transformers

from bench import registry
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

# Sliding windows shorter than the test sequences, so windowed attention and its KV cache really act.
_WINDOW = 8


def _head_dim(kw: dict) -> int:
    return kw["hidden_size"] // kw["num_attention_heads"]


def _mistral(**kw) -> transformers.PreTrainedConfig:
    """Mistral: one sliding window for every layer, no layer_types."""
    return transformers.MistralConfig(**{"sliding_window": _WINDOW, **kw})


def _qwen2(**kw) -> transformers.PreTrainedConfig:
    """Qwen2 with its sliding window on from layer 2, so layer_types mixes full and sliding attention."""
    return transformers.Qwen2Config(**{"use_sliding_window": True, "sliding_window": _WINDOW,
                                       "max_window_layers": 2, **kw})


def _phi3(**kw) -> transformers.PreTrainedConfig:
    """Phi-3; its default pad/eos ids (32000) lie outside the tiny vocabulary."""
    return transformers.Phi3Config(**{"pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2, **kw})


def _gemma(**kw) -> transformers.PreTrainedConfig:
    """Gemma; its default head_dim is 256 whatever the width."""
    return transformers.GemmaConfig(**{"head_dim": _head_dim(kw), **kw})


def _gemma2(**kw) -> transformers.PreTrainedConfig:
    """Gemma-2: alternating sliding and full attention (its default), logit soft-capping on."""
    return transformers.Gemma2Config(**{"head_dim": _head_dim(kw), "sliding_window": _WINDOW, **kw})


def _gemma3(**kw) -> transformers.PreTrainedConfig:
    """Gemma-3 text; the real 5:1 sliding:full pattern would make 4 layers all sliding, so alternate."""
    types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(kw["num_hidden_layers"])]
    return transformers.Gemma3TextConfig(**{"head_dim": _head_dim(kw), "sliding_window": _WINDOW,
                                            "layer_types": types, **kw})


# family -> config factory taking (vocab_size, **TINY); every supported architecture gets a tiny model here.
FAMILIES = {
    "llama": transformers.LlamaConfig,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "phi3": _phi3,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
}


def make_tiny(family: str = "llama", seed: int = 0, vocab_size: int = 384, **overrides) -> torch.nn.Module:
    """A tiny random-weight causal LM of ``family`` in float32, eval mode."""
    cfg = FAMILIES[family](vocab_size=vocab_size, **{**TINY, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # random init of norms is all ones; perturb so that norm folding and scaling are really tested
    with torch.no_grad():
        for p in model.parameters():
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


@contextlib.contextmanager
def registered(*classes):
    """Test plugin methods registered (beside the discovered ones) while the block runs, removed after."""
    registry.discover()
    for cls in classes:
        registry.register(cls)
    try:
        yield
    finally:
        for cls in classes:
            registry._REGISTRY.pop(cls.name, None)
