"""SliceGPT building blocks: the gain-free norm, the sliced block, the structural edits and the parameter count.

Notation (row vectors, y = x W^T): D is the dense width, Q a D x D rotation (columns = principal directions,
by descending variance) and Q' = Q[:, :d] its first d columns. A residual stream x carried in the coordinates
of Q is x~ = x Q'. A block with the rotations Q_in (its input), Q_mid (the signal entering the MLP norm) and
Q_out (its output) computes

    x~_mid = x~ S1 + o'(attn(n(x~)))        S1 = Q_in'^T Q_mid'   (d_in x d_mid)
    x~_out = x~_mid S2 + down'(mlp(n(x~_mid)))   S2 = Q_mid'^T Q_out'  (d_mid x d_out)

with n a gain-free RMSNorm whose mean runs over the dense width D, so n(x Q) = n(x) Q exactly when nothing is
cut. One rotation for the whole stream (Q_in = Q_mid = Q_out) makes S1, S2 identities that need no storage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bench.adapters.base import get_module, set_module
from bench.budget import count_params
from bench.errors import UserError
from bench.structure import structural_op

ROLES = ("attn_in", "attn_out", "mlp_in", "mlp_out")


def _matrix(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """An uninitialised parameter matrix (filled by the method, or by loading a checkpoint)."""
    return nn.Parameter(torch.empty(rows, cols, dtype=dtype, device=device))


class RMSNormalize(nn.Module):
    """n(x) = x / sqrt(sum(x^2) / dim + eps): RMSNorm without a gain, averaging over the dense width ``dim``."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.dim = dim
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).sum(-1, keepdim=True) / self.dim + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"


class MappedNorm(RMSNormalize):
    """n(x) M: the final norm of a model whose tied head reads the embedding's coordinates.

    M = Q_L'^T diag(g) Q_0' carries the last block's coordinates (Q_L) to the embedding's (Q_0) and applies the
    final norm's gain g, so the head can stay the (rotated, sliced) embedding matrix itself.
    """

    def __init__(self, dim: int, eps: float, d_in: int, d_out: int, dtype: torch.dtype, device: torch.device):
        super().__init__(dim, eps)
        self.head_map = _matrix(d_in, d_out, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) @ self.head_map


class SlicedBlock(nn.Module):
    """A decoder block with shortcut matrices on its residual connections; reuses the block's own sub-modules.

    Without a shortcut matrix the residual keeps its coordinates (one global rotation) and is zero-padded where
    the next width is larger (the last block of a model whose head is not sliced).
    """

    def __init__(self, names: dict[str, str], modules: dict[str, nn.Module], widths: tuple[int, int, int],
                 shortcuts: bool, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.names = dict(names)
        for role, module in modules.items():
            self.add_module(self.names[role], module)
        self.d_in, self.d_mid, self.d_out = widths
        self.attn_shortcut = _matrix(self.d_in, self.d_mid, dtype, device) if shortcuts else None
        self.mlp_shortcut = _matrix(self.d_mid, self.d_out, dtype, device) if shortcuts else None

    def sub(self, role: str) -> nn.Module:
        return self._modules[self.names[role]]

    @staticmethod
    def carry(x: torch.Tensor, shortcut: torch.Tensor | None, width: int) -> torch.Tensor:
        """The residual in the next coordinates: x S, or x zero-padded to ``width`` under one global rotation."""
        if shortcut is not None:
            return x @ shortcut
        return nn.functional.pad(x, (0, width - x.shape[-1]))

    def attention(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        out = self.sub("attn")(hidden_states=self.sub("attn_norm")(x), **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args:
            raise TypeError("SlicedBlock takes the hidden states positionally and everything else by keyword")
        x = self.carry(hidden_states, self.attn_shortcut, self.d_mid) + self.attention(hidden_states, **kwargs)
        return self.carry(x, self.mlp_shortcut, self.d_out) + self.sub("mlp")(self.sub("mlp_norm")(x))


# -- what the adapter must describe -------------------------------------------------------------------


def norm_eps(norm: nn.Module) -> float:
    """The epsilon of an RMSNorm module (Hugging Face names it variance_epsilon or eps)."""
    for attr in ("variance_epsilon", "eps"):
        value = getattr(norm, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
    raise UserError(f"slicegpt cannot read the epsilon of {type(norm).__name__}; the adapter must expose it")


@torch.no_grad()
def is_rms_norm(adapter, norm: nn.Module) -> bool:
    """Whether ``norm`` computes n(x) * gain (no mean subtraction, no bias), checked on random inputs."""
    weight = getattr(norm, "weight", None)
    if weight is None or weight.dim() != 1 or any(p is not weight for p in norm.parameters()):
        return False
    x = torch.randn(8, weight.numel(), generator=torch.Generator().manual_seed(0))
    x[4:] *= 1e-3  # rows whose mean square is near eps, so a wrong eps shows
    x = x.to(device=weight.device, dtype=weight.dtype)
    expected = RMSNormalize(weight.numel(), norm_eps(norm))(x).float() * adapter.norm_gain(norm)
    tol = 1e-5 if weight.dtype == torch.float32 else 2e-2
    return torch.allclose(norm(x).float(), expected, rtol=tol, atol=tol)


def check_supported(adapter) -> None:
    """Raise UserError unless SliceGPT's computational invariance holds for the adapter's family."""
    family = adapter.family
    if adapter.attn_post_norm_path or adapter.mlp_post_norm_path:
        raise UserError(
            f"slicegpt does not support the {family} family: its post-norms RMS-normalise each attention/MLP output "
            "over the full width before the residual add, so o and down cannot be rotated and sliced (the "
            "rotation would need an extra D x D' matrix per branch); use another method for this family")
    roles = adapter.roles()
    missing = [r for r in ROLES if r not in roles]
    outs = [s for s in adapter.slots if s.role in ("attn_out", "mlp_out")]
    if missing or len(outs) != 2:
        raise UserError(f"slicegpt does not support the {family} family: its adapter must give one attn_out and "
                        f"one mlp_out linear and the roles {', '.join(ROLES)} (missing {missing or 'none'})")
    for path in (adapter.attn_path, adapter.mlp_path, adapter.attn_norm_path, adapter.mlp_norm_path):
        if "." in path:
            raise UserError(f"slicegpt does not support the {family} family: sub-module path {path!r} is nested")
    for b in range(adapter.num_blocks):
        for slot in adapter.slots:
            if type(adapter.linear(b, slot.kind)) is not nn.Linear:
                raise UserError(f"slicegpt needs plain linears; {adapter.linear_name(b, slot.kind)} is "
                                f"{type(adapter.linear(b, slot.kind)).__name__}: apply slicegpt to a dense model")
    blk = adapter.block(0)
    for norm in (get_module(blk, adapter.attn_norm_path), get_module(blk, adapter.mlp_norm_path), adapter.final_norm()):
        if not is_rms_norm(adapter, norm):
            raise UserError(f"slicegpt does not support the {family} family: {type(norm).__name__} is not an RMSNorm "
                            "(x / rms(x) * gain); a mean-subtracting LayerNorm needs a mean-free residual first")


# -- widths and the count ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Widths and bookkeeping of one sliced model; enough to count its parameters and to rebuild it."""

    dense: int  # D
    width: int  # d: the kept width of every sliced boundary
    head_width: int  # width the last block hands to the final norm: d, or D when the head is not sliced
    shortcuts: bool  # one rotation per boundary needs shortcut matrices; one global rotation does not
    tied_map: bool  # a tied head stays tied; the final norm gets a head_width x d map
    untie: bool  # a tied head gets its own weight

    def widths(self, block: int, n_blocks: int) -> tuple[int, int, int]:
        """(d_in, d_mid, d_out) of ``block``."""
        last = block == n_blocks - 1
        return self.width, self.width, self.head_width if last else self.width


def kept_width(dense: int, slicing: float, round_to: int) -> int:
    """(1 - s) D rounded down to a multiple of ``round_to`` (at least one multiple); s = 0 keeps D exactly."""
    if slicing == 0:
        return dense
    return max(round_to, int((1.0 - slicing) * dense / round_to + 1e-9) * round_to)


def predict_params(adapter, plan: Plan) -> int:
    """Unique stored parameters of the model after slicing with ``plan``, from the dense modules' shapes."""
    total = count_params(adapter.model)
    emb, head = adapter.embeddings(), adapter.lm_head()
    total += emb.weight.shape[0] * (plan.width - emb.weight.shape[1])
    n = adapter.num_blocks
    for b in range(n):
        d_in, d_mid, d_out = plan.widths(b, n)
        target = {"attn_in": d_in, "attn_out": d_mid, "mlp_in": d_mid, "mlp_out": d_out}
        for slot in adapter.slots:
            lin = adapter.linear(b, slot.kind)
            width = target[slot.role]
            if slot.role.endswith("_in"):
                total += lin.out_features * (width - lin.in_features)
            else:
                total += (width - lin.out_features) * (lin.in_features + (lin.bias is not None))
        blk = adapter.block(b)
        total -= count_params(nn.ModuleList([get_module(blk, adapter.attn_norm_path),
                                             get_module(blk, adapter.mlp_norm_path)]))
        if plan.shortcuts:
            total += d_in * d_mid + d_mid * d_out
    total -= count_params(adapter.final_norm())
    if plan.tied_map:
        total += plan.head_width * plan.width
    elif adapter.tied_embeddings():  # untied now: a new head weight next to the embedding
        total += head.out_features * plan.head_width
    else:
        total += head.out_features * (plan.head_width - head.in_features)
    return total


# -- structural edits (replayable on the dense skeleton) -------------------------------------------------


def _empty_linear(ref: nn.Linear, in_f: int, out_f: int) -> nn.Linear:
    w = ref.weight
    return nn.utils.skip_init(nn.Linear, in_f, out_f, bias=ref.bias is not None, device=w.device, dtype=w.dtype)


@structural_op("slicegpt_block")
def slice_block(model: nn.Module, adapter, block: int, d_in: int, d_mid: int, d_out: int,
                shortcuts: bool) -> SlicedBlock:
    """Replace block ``block`` by a :class:`SlicedBlock` of the given widths with empty (unfilled) weights."""
    old = adapter.block(block)
    target = {"attn_in": ("in", d_in), "attn_out": ("out", d_mid), "mlp_in": ("in", d_mid), "mlp_out": ("out", d_out)}
    for slot in adapter.slots:
        lin = adapter.linear(block, slot.kind)
        side, width = target[slot.role]
        new = _empty_linear(lin, width, lin.out_features) if side == "in" else _empty_linear(lin, lin.in_features, width)
        adapter.set_linear(block, slot.kind, new)
    names = {"attn": adapter.attn_path, "mlp": adapter.mlp_path,
             "attn_norm": adapter.attn_norm_path, "mlp_norm": adapter.mlp_norm_path}
    modules = {role: get_module(old, path) for role, path in names.items()}
    for role in ("attn_norm", "mlp_norm"):
        norm = modules[role]
        modules[role] = RMSNormalize(norm.weight.numel(), norm_eps(norm))
    ref = adapter.linear(block, adapter.slots[0].kind).weight
    new = SlicedBlock(names, modules, (d_in, d_mid, d_out), shortcuts, ref.dtype, ref.device)
    adapter.blocks()[block] = new
    return new


@structural_op("slicegpt_ends")
def slice_ends(model: nn.Module, adapter, embed_width: int, head_width: int, head_map: bool, untie: bool) -> None:
    """Embedding -> V x embed_width; final norm -> gain-free (plus the tied-head map); head -> its input width."""
    emb, head, norm = adapter.embeddings(), adapter.lm_head(), adapter.final_norm()
    tied = adapter.tied_embeddings()
    if head_map != (tied and not untie):
        raise ValueError("slicegpt_ends: the head map exists exactly when a tied head stays tied")
    w = emb.weight
    emb.weight = nn.Parameter(torch.empty(w.shape[0], embed_width, dtype=w.dtype, device=w.device))
    emb.embedding_dim = embed_width
    dim, eps = norm.weight.numel(), norm_eps(norm)
    if head_map:
        new_norm = MappedNorm(dim, eps, head_width, embed_width, w.dtype, w.device)
        head.weight = emb.weight
        head.in_features = embed_width
    else:
        new_norm = RMSNormalize(dim, eps)
        set_module(model, adapter.lm_head_path, _empty_linear(head, head_width, head.out_features))
        if tied:
            model.config.tie_word_embeddings = False
    set_module(model, adapter.final_norm_path, new_norm)
