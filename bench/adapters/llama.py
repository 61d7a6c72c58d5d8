"""Llama layout: separate q/k/v/o projections and a gated MLP (gate, up, down)."""

from bench.adapters.base import Adapter, LinearSlot


class LlamaAdapter(Adapter):
    family = "llama"
    model_types = ("llama",)
    slots = (
        LinearSlot("q", "self_attn.q_proj", "attn_in"),
        LinearSlot("k", "self_attn.k_proj", "attn_in"),
        LinearSlot("v", "self_attn.v_proj", "attn_in"),
        LinearSlot("o", "self_attn.o_proj", "attn_out"),
        LinearSlot("gate", "mlp.gate_proj", "mlp_in"),
        LinearSlot("up", "mlp.up_proj", "mlp_in"),
        LinearSlot("down", "mlp.down_proj", "mlp_out"),
    )
