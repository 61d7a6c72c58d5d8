"""Tree-packed scoring: contexts with all their choices packed into rows, one forward per batch of rows.

A group is one context and its choices. In a row, a group holds its context, then each choice's tokens but its
last, one segment after the other; several groups share a row back to back (first-fit decreasing into rows of
a fixed capacity), so rows need almost no padding. A custom 4-D attention mask lets every token see only its
own group's context and the earlier tokens of its own segment, and position ids restart after the context for
each segment, so each choice is scored exactly as if it followed its context alone (the log-likelihoods of
stock lm-eval HFLM, to float tolerance). Windowed attention layers get the same mask cut to their window, by
position. Rows are right-padded; a pad token sees only itself, so no attention row is empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

FULL, SLIDING = "full_attention", "sliding_attention"

Group = tuple[list[int], list[list[int]]]  # a context and its choices


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


def group_length(context: list[int], choices: list[list[int]]) -> int:
    return len(context) + sum(len(c) - 1 for c in choices)


def fill_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group indices packed first-fit decreasing into rows of at most ``capacity`` tokens (a longer group gets
    a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[slot].append(i)
            room[slot] -= lengths[i]
    return rows


@dataclass
class Row:
    """One packed row: tokens, position ids, group (doc) and segment ids (0: context, j: choice j), and for each
    group and choice the (index in the row that predicts it, token) of every choice token."""

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    docs: list[int] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)
    picks: list[list[list[tuple[int, int]]]] = field(default_factory=list)

    def add(self, context: list[int], choices: list[list[int]]) -> None:
        doc, start = len(self.picks), len(self.tokens)
        self._extend(context, range(len(context)), doc, 0)
        picks = []
        for j, choice in enumerate(choices, 1):
            at = len(self.tokens)
            picks.append([(start + len(context) - 1, choice[0])] + [(at + t, choice[t + 1])
                                                                  for t in range(len(choice) - 1)])
            self._extend(choice[:-1], range(len(context), len(context) + len(choice) - 1), doc, j)
        self.picks.append(picks)

    def _extend(self, tokens: list[int], positions: range, doc: int, segment: int) -> None:
        self.tokens += tokens
        self.positions += positions
        self.docs += [doc] * len(tokens)
        self.segments += [segment] * len(tokens)


def tensors(rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, positions, docs (-1 at padding) and segments of right-padded rows, [rows, longest]."""
    width = max(len(r.tokens) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    docs = torch.full((len(rows), width), -1, dtype=torch.long)
    segments = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.tokens)
        ids[b, :n], positions[b, :n] = torch.tensor(r.tokens), torch.tensor(r.positions)
        docs[b, :n], segments[b, :n] = torch.tensor(r.docs), torch.tensor(r.segments)
    return ids, positions, docs, segments


def attention_mask(positions: torch.Tensor, docs: torch.Tensor, segments: torch.Tensor, kinds: tuple[str, ...],
                   window: int | None, dtype: torch.dtype):
    """Additive [B, 1, L, L] masks (0 where allowed, the dtype's minimum elsewhere), one per kind (a dict when
    several); docs -1 mark padding."""
    length = positions.shape[1]
    index = torch.arange(length)
    causal = index[None, :, None] >= index[None, None, :]
    q_doc, k_doc = docs[:, :, None], docs[:, None, :]
    q_seg, k_seg = segments[:, :, None], segments[:, None, :]
    allowed = causal & (q_doc == k_doc) & (k_doc >= 0) & ((k_seg == 0) | (k_seg == q_seg))
    allowed |= torch.eye(length, dtype=torch.bool)[None] & (q_doc < 0)  # a pad token sees itself
    out = {}
    for kind in kinds:
        keep = allowed
        if kind == SLIDING:
            keep = allowed & ((positions[:, :, None] - positions[:, None, :] < window) | (q_doc < 0))
        out[kind] = torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, torch.finfo(dtype).min)[:, None]
    return out[kinds[0]] if len(kinds) == 1 else out
