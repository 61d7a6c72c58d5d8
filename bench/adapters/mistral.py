"""Mistral layout: Llama's blocks; one global sliding window (config.sliding_window) and no layer_types."""

from bench.adapters.llama import LlamaAdapter


class MistralAdapter(LlamaAdapter):
    family = "mistral"
    model_types = ("mistral",)
