"""Tree-packed scoring: a context and all its choices in one row, one forward per batch of rows.

A row holds the context, then each choice's tokens but its last, one segment after the other. A custom 4-D
attention mask lets every token see the context and the earlier tokens of its own segment only, and position
ids restart after the context for each segment, so each choice is scored exactly as if it followed the context
alone (the same log-likelihoods as stock lm-eval HFLM, to float tolerance). Windowed attention layers get the
same mask cut to their window, by position. Rows are right-padded; a pad token sees only itself, so no
attention row is empty.
"""

from __future__ import annotations

import torch

FULL, SLIDING = "full_attention", "sliding_attention"


def mask_layout(model: torch.nn.Module) -> tuple[str, ...] | None:
    """The attention kinds a model's forward takes a custom mask for, from its config: one kind (a tensor is
    passed) or several (a dict by layer type, the transformers convention for mixed layers); None where a
    custom 4-D mask cannot be used (flash/flex attention, a layer kind other than full or sliding)."""
    config = model.config
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return None
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    kinds = tuple(sorted(set(types))) if types else ((SLIDING,) if window else (FULL,))
    if any(k not in (FULL, SLIDING) for k in kinds) or (SLIDING in kinds and not window):
        return None
    return kinds


def row(context: list[int], choices: list[list[int]]) -> tuple[list[int], list[int], list[int]]:
    """Tokens, position ids and segment ids (0: context, j: choice j) of one packed row."""
    tokens, positions, segments = list(context), list(range(len(context))), [0] * len(context)
    for j, choice in enumerate(choices, 1):
        tail = choice[:-1]
        tokens += tail
        positions += range(len(context), len(context) + len(tail))
        segments += [j] * len(tail)
    return tokens, positions, segments


def targets(context: list[int], choices: list[list[int]]) -> list[list[tuple[int, int]]]:
    """For each choice, (row index predicting the token, the token) for every one of its tokens."""
    out, start = [], len(context)
    for choice in choices:
        picks = [(len(context) - 1, choice[0])] + [(start + t, choice[t + 1]) for t in range(len(choice) - 1)]
        out.append(picks)
        start += len(choice) - 1
    return out


def attention_mask(positions: torch.Tensor, segments: torch.Tensor, kinds: tuple[str, ...], window: int | None,
                   dtype: torch.dtype):
    """Additive [B, 1, L, L] masks (0 where allowed, the dtype's minimum elsewhere), per kind; segments -1 are pad."""
    length = positions.shape[1]
    index = torch.arange(length)
    causal = index[None, :, None] >= index[None, None, :]
    q_seg, k_seg = segments[:, :, None], segments[:, None, :]
    allowed = causal & ((k_seg == 0) | (k_seg == q_seg)) & (k_seg >= 0) & (q_seg >= 0)
    allowed |= torch.eye(length, dtype=torch.bool)[None] & (q_seg < 0)  # a pad token sees itself
    out = {}
    for kind in kinds:
        keep = allowed
        if kind == SLIDING:
            keep = allowed & ((positions[:, :, None] - positions[:, None, :] < window) | (q_seg < 0))
        mask = torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, torch.finfo(dtype).min)
        out[kind] = mask[:, None]
    return out[kinds[0]] if len(kinds) == 1 else out
