"""Qwen2 layout: Llama's blocks with biases on q, k and v; per-layer sliding windows via config.layer_types."""

from bench.adapters.llama import LlamaAdapter


class Qwen2Adapter(LlamaAdapter):
    family = "qwen2"
    model_types = ("qwen2",)
