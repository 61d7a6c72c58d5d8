"""The adapter interface: where blocks, attention, MLP, norms and embeddings live in a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class LinearSlot:
    """One linear of a transformer block.

    ``kind`` is the canonical name methods use (q, k, v, o, gate, up, down; fused families use qkv or
    gate_up); ``path`` is where it sits inside a block; ``role`` groups linears that read the same input
    (attn_in, attn_out, mlp_in, mlp_out), so one activation statistic serves the whole group.
    """

    kind: str
    path: str
    role: str


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent), name, module)


class Adapter:
    """Architecture facts for one model family; methods never inspect model types themselves."""

    family: ClassVar[str] = "base"
    model_types: ClassVar[tuple[str, ...]] = ()
    slots: ClassVar[tuple[LinearSlot, ...]] = ()
    blocks_path: ClassVar[str] = "model.layers"
    embed_path: ClassVar[str] = "model.embed_tokens"
    final_norm_path: ClassVar[str] = "model.norm"
    lm_head_path: ClassVar[str] = "lm_head"
    attn_path: ClassVar[str] = "self_attn"
    mlp_path: ClassVar[str] = "mlp"
    attn_norm_path: ClassVar[str] = "input_layernorm"
    mlp_norm_path: ClassVar[str] = "post_attention_layernorm"
    #: norms applied to a sub-layer's output before the residual add (Gemma-2/3); None where absent
    attn_post_norm_path: ClassVar[str | None] = None
    mlp_post_norm_path: ClassVar[str | None] = None
    #: perplexity windows must start with BOS (Gemma)
    needs_bos: ClassVar[bool] = False
    #: RMSNorms compute ``x_hat * (norm_weight_offset + weight)``: 0 for Llama-style, 1 for Gemma's ``(1 + w)``
    norm_weight_offset: ClassVar[float] = 0.0
    #: output rows of fused linears, in order: kind -> the unfused kinds it stacks (Phi-3's qkv, gate_up)
    fused_parts: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, model: nn.Module):
        self.model = model

    # -- where things are -------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    def blocks(self) -> nn.ModuleList:
        return get_module(self.model, self.blocks_path)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks())

    def block(self, i: int) -> nn.Module:
        return self.blocks()[i]

    def block_name(self, i: int) -> str:
        return f"{self.blocks_path}.{i}"

    def embeddings(self) -> nn.Module:
        return get_module(self.model, self.embed_path)

    def lm_head(self) -> nn.Module:
        return get_module(self.model, self.lm_head_path)

    def final_norm(self) -> nn.Module:
        return get_module(self.model, self.final_norm_path)

    def embed_scale(self) -> float:
        """The factor the embedding module multiplies its looked-up rows by (Gemma: sqrt(hidden), in its dtype).

        A method that replaces or rotates the embedding must keep this factor; it is not in the weight.
        """
        return 1.0

    def tied_embeddings(self) -> bool:
        """Whether the LM head and the input embedding share one weight tensor."""
        return self.lm_head().weight.data_ptr() == self.embeddings().weight.data_ptr()

    def norm_gain(self, norm: nn.Module) -> torch.Tensor:
        """The per-channel gain (float32) an RMSNorm applies after normalising, whatever its weight convention."""
        return norm.weight.float() + self.norm_weight_offset

    @torch.no_grad()
    def set_norm_gain(self, norm: nn.Module, gain: torch.Tensor | float) -> None:
        """Make ``norm`` apply ``gain`` per channel (1.0 turns it into a pure normaliser, as norm fusion needs)."""
        gain = torch.as_tensor(gain, dtype=torch.float32, device=norm.weight.device)
        norm.weight.copy_((gain - self.norm_weight_offset).expand_as(norm.weight))

    def sublayer_paths(self, which: str) -> list[str]:
        """Paths inside a block of everything one residual branch uses: ``which`` is "attn" or "mlp"."""
        if which == "attn":
            paths = [self.attn_norm_path, self.attn_path, self.attn_post_norm_path]
        elif which == "mlp":
            paths = [self.mlp_norm_path, self.mlp_path, self.mlp_post_norm_path]
        else:
            raise ValueError(f"sub-layer must be 'attn' or 'mlp', not {which!r}")
        return [p for p in paths if p]

    def slot(self, kind: str) -> LinearSlot:
        for s in self.slots:
            if s.kind == kind:
                return s
        raise KeyError(f"{self.family} blocks have no linear of kind {kind!r}; kinds: {self.kinds()}")

    def kinds(self) -> list[str]:
        return [s.kind for s in self.slots]

    def linear(self, block: int, kind: str) -> nn.Module:
        return get_module(self.block(block), self.slot(kind).path)

    def linear_name(self, block: int, kind: str) -> str:
        return f"{self.block_name(block)}.{self.slot(kind).path}"

    def set_linear(self, block: int, kind: str, module: nn.Module) -> None:
        set_module(self.block(block), self.slot(kind).path, module)

    def roles(self) -> list[str]:
        """Input groups in block order; linears of one role read the same activations."""
        seen: list[str] = []
        for s in self.slots:
            if s.role not in seen:
                seen.append(s.role)
        return seen

    def role_of(self, kind: str) -> str:
        return self.slot(kind).role

    def part_slices(self, block: int, kind: str) -> dict[str, slice]:
        """Output rows of linear ``kind`` per unfused kind: {"q": rows, "k": ..., "v": ...} for a fused qkv.

        An unfused linear maps to itself over all its rows, so methods can treat every family alike.
        """
        width = self.linear(block, kind).out_features
        parts = self.fused_parts.get(kind)
        if not parts:
            return {kind: slice(0, width)}
        sizes = self._part_sizes(block, kind, width)
        if sum(sizes) != width or len(sizes) != len(parts):
            raise ValueError(f"{self.family} {kind}: part sizes {sizes} do not add up to its {width} rows")
        out, start = {}, 0
        for part, size in zip(parts, sizes, strict=True):
            out[part] = slice(start, start + size)
            start += size
        return out

    def _part_sizes(self, block: int, kind: str, width: int) -> list[int]:
        """Row counts of the parts of fused linear ``kind``; families with fused linears override this."""
        raise NotImplementedError(f"{self.family} declares fused {kind!r} but no part sizes")

    # -- block I/O, for hooks ---------------------------------------------------------------
    @staticmethod
    def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
        """The residual stream entering a block, from a forward pre-hook's (args, kwargs)."""
        return args[0] if args else kwargs["hidden_states"]

    @staticmethod
    def block_output(output) -> torch.Tensor:
        """The residual stream leaving a block, from a forward hook's output."""
        return output[0] if isinstance(output, (tuple, list)) else output

    # -- structural edits -------------------------------------------------------------------
    def remove_blocks(self, indices: list[int]) -> None:
        """Delete whole blocks and keep config, KV-cache indices and per-layer settings consistent."""
        drop = set(indices)
        blocks = self.blocks()
        if any(i < 0 or i >= len(blocks) for i in drop):
            raise IndexError(f"block indices {sorted(drop)} out of range 0..{len(blocks) - 1}")
        kept = [b for i, b in enumerate(blocks) if i not in drop]
        parent, _, name = self.blocks_path.rpartition(".")
        setattr(get_module(self.model, parent), name, nn.ModuleList(kept))
        self._reindex(sorted(set(range(len(blocks))) - drop))

    def _reindex(self, kept_original: list[int]) -> None:
        cfg = self.config
        layer_types = getattr(cfg, "layer_types", None)
        if layer_types is not None:
            cfg.layer_types = [layer_types[i] for i in kept_original]
        cfg.num_hidden_layers = len(kept_original)
        for new_idx, block in enumerate(self.blocks()):
            for module in block.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_idx
