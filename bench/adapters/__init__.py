"""Architecture adapters: the one place that knows where a model family keeps its blocks and linears.

Methods only talk to an :class:`Adapter`; adding a family is one small subclass registered here.
"""

from __future__ import annotations

from bench.adapters.base import Adapter, LinearSlot
from bench.adapters.gemma import Gemma2Adapter, Gemma3Adapter, GemmaAdapter
from bench.adapters.llama import LlamaAdapter
from bench.adapters.mistral import MistralAdapter
from bench.adapters.phi3 import Phi3Adapter
from bench.adapters.qwen2 import Qwen2Adapter
from bench.errors import UserError

ADAPTERS: list[type[Adapter]] = [
    LlamaAdapter, MistralAdapter, Qwen2Adapter, Phi3Adapter, GemmaAdapter, Gemma2Adapter, Gemma3Adapter,
]


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Make an adapter class available to :func:`get_adapter` (usable as a decorator)."""
    if cls not in ADAPTERS:
        ADAPTERS.append(cls)
    return cls


def supported_model_types() -> list[str]:
    return sorted({t for cls in ADAPTERS for t in cls.model_types})


def get_adapter(model) -> Adapter:
    """Return the adapter for ``model`` chosen by its ``config.model_type``."""
    model_type = getattr(model.config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    raise UserError(
        f"no architecture adapter for model_type {model_type!r}; supported: "
        f"{', '.join(supported_model_types())}. Add one in bench/adapters/ (see README, 'Adding an architecture')."
    )


__all__ = ["ADAPTERS", "Adapter", "LinearSlot", "get_adapter", "register_adapter", "supported_model_types"]
