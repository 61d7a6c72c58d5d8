"""Gemma layouts: RMSNorm gains stored as ``w`` and applied as ``1 + w``, embeddings scaled by sqrt(hidden).

Gemma-2 and Gemma-3 add a norm on each sub-layer's output before the residual add, so their MLP reads
``pre_feedforward_layernorm`` while ``post_attention_layernorm`` closes the attention branch.
"""

from bench.adapters.llama import LlamaAdapter


class GemmaAdapter(LlamaAdapter):
    family = "gemma"
    model_types = ("gemma",)
    needs_bos = True
    norm_weight_offset = 1.0

    def embed_scale(self) -> float:
        """Read from the scaled embedding module, rounded to its weight dtype as its forward does."""
        emb = self.embeddings()
        scale = getattr(emb, "embed_scale", None)
        return 1.0 if scale is None else float(scale.to(emb.weight.dtype))


class Gemma2Adapter(GemmaAdapter):
    family = "gemma2"
    model_types = ("gemma2",)
    attn_post_norm_path = "post_attention_layernorm"
    mlp_norm_path = "pre_feedforward_layernorm"
    mlp_post_norm_path = "post_feedforward_layernorm"


class Gemma3Adapter(Gemma2Adapter):
    """Gemma-3 text (Gemma3ForCausalLM); its attention also RMS-normalises q and k per head (q_norm, k_norm)."""

    family = "gemma3"
    model_types = ("gemma3_text",)

