"""Phi-3 layout: one fused qkv projection and one fused gate_up projection per block."""

from bench.adapters.base import Adapter, LinearSlot


class Phi3Adapter(Adapter):
    family = "phi3"
    model_types = ("phi3",)
    slots = (
        LinearSlot("qkv", "self_attn.qkv_proj", "attn_in"),
        LinearSlot("o", "self_attn.o_proj", "attn_out"),
        LinearSlot("gate_up", "mlp.gate_up_proj", "mlp_in"),
        LinearSlot("down", "mlp.down_proj", "mlp_out"),
    )
    #: qkv rows are [q | k | v]; gate_up rows are [gate | up] (the MLP chunks its output in two)
    fused_parts = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}

    def _part_sizes(self, block: int, kind: str, width: int) -> list[int]:
        if kind == "gate_up":
            return [width // 2, width - width // 2]
        attn = self.block(block).self_attn
        q = self.config.num_attention_heads * attn.head_dim
        kv = attn.num_key_value_heads * attn.head_dim
        return [q, kv, kv]
