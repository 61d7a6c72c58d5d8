"""SliceGPT: rotate the residual stream into its principal directions and delete the weakest ones (arXiv 2401.15024).

1. Computational invariance: every block norm's gain is folded into the linears that read it (W diag(g)), the
   final norm's gain into the head, and the norms become gain-free RMSNorms n, for which n(x Q) = n(x) Q.
2. Rotations from data flowing through the already-sliced model, block by block: PCA of the block input
   (-> input columns of attn_in), of the signal entering the MLP norm (-> output rows of o, input columns of
   mlp_in) and of the block output (-> output rows of down); the next block's input rotation is this output's.
   PCA: H = sum over tokens of x^T x in float64, plus damping * mean(diag H) * I; Q = eigenvectors by
   descending eigenvalue. The embedding is rotated by the first Q; residuals get S1 = Q_in'^T Q_mid' and
   S2 = Q_mid'^T Q_out' (see methods/_slicing.py for the block's maths).
3. The head is not sliced by default (the last block's output keeps all D directions, rotated). A tied head
   stays tied by default: the final norm becomes n(x) M with M = Q_L'^T diag(g) Q_0', so the head is the
   rotated, sliced embedding itself (exact at zero slicing; it reads the embedding projected on Q_0's top
   directions). ``untie=True`` gives the head its own V x D weight instead, as the paper's models have.
4. ``variant="official"`` reproduces the official TransformerCompression configuration: the head is untied (its own
   V x D copy, as ``untie=True``) and each embedding row's mean is subtracted during fusion (the block-0 signal the
   first PCA sees is centred the same way). For an RMSNorm model that centring is not an invariance: it changes the
   function slightly. The default ``variant="slimbench"`` keeps the tied head through the d x d map and the
   embedding as is: slimbench's variant, much cheaper at a matched budget on a small model.
5. ``rotation="global"`` uses one Q for the whole stream (PCA of the signal at all 2L + 1 boundaries of the
   dense model): no shortcut matrices, so far less slicing for the same budget, but one basis for every layer.
   ``pca_signal="normed"`` scales each token to unit RMS before the PCA (what the norms pass on), so tokens with
   huge residual norms do not decide the basis alone.

The budget: slicing fraction s is not a parameter fraction (shortcuts add 2 d^2 per block; an untied head adds
V D), so the solver counts every kept width d (a multiple of ``round_to``) and picks the one whose whole model
is closest to the target. Calibration windows have no padding, so every token counts in the PCA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bench import blockwise, structure
from bench.adapters.base import get_module
from bench.budget import count_params
from bench.calibration import Calibration, hooks, model_device
from bench.errors import UserError
from bench.placement import of
from bench.registry import CompressionInfo, Method, Solution, register
from methods._slicing import Plan, check_supported, kept_width, predict_params

ROTATIONS = ("block", "global")
SIGNALS = ("raw", "normed")
VARIANTS = ("slimbench", "official")


def gram(x: torch.Tensor, normed: bool = False) -> torch.Tensor:
    """sum over tokens of x^T x in float64; ``normed`` scales each token to unit RMS first (what the norms read)."""
    x = x.reshape(-1, x.shape[-1]).double()
    if normed:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).clamp(min=1e-30))
    return x.T @ x


def pca(h: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors (columns, by descending eigenvalue) and eigenvalues of H + damping * mean(diag H) * I."""
    shift = damping * h.diagonal().mean()
    vals, vecs = torch.linalg.eigh(h + shift * torch.eye(h.shape[0], dtype=h.dtype, device=h.device))
    return vecs.flip(-1), vals.flip(-1) - shift


def kept_share(vals: torch.Tensor, d: int) -> float:
    """Share of the signal's energy in the kept directions."""
    vals = vals.clamp(min=0)
    return float(vals[:d].sum() / vals.sum().clamp(min=1e-300))


@dataclass
class _Dense:
    """A block's dense weights in float64 with the norm gains folded in: W diag(g) for the *_in roles."""

    weights: dict[str, torch.Tensor]
    biases: dict[str, torch.Tensor | None]

    @classmethod
    def take(cls, adapter, b: int) -> _Dense:
        blk = adapter.block(b)
        gains = {"attn_in": adapter.norm_gain(get_module(blk, adapter.attn_norm_path)).double(),
                 "mlp_in": adapter.norm_gain(get_module(blk, adapter.mlp_norm_path)).double()}
        weights, biases = {}, {}
        for slot in adapter.slots:
            lin = adapter.linear(b, slot.kind)
            w = lin.weight.detach().double()
            weights[slot.kind] = w * gains[slot.role] if slot.role in gains else w
            biases[slot.kind] = None if lin.bias is None else lin.bias.detach().double()
        return cls(weights, biases)


class _Filler:
    """Writes one block's rotated, sliced weights role by role, as the rotations become known."""

    def __init__(self, adapter, b: int, dense: _Dense, block: nn.Module):
        self.adapter, self.b, self.dense, self.block = adapter, b, dense, block

    def _set(self, kind: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        lin = self.adapter.linear(self.b, kind)
        lin.weight.copy_(weight)
        if lin.bias is not None:
            lin.bias.copy_(bias)

    def _kinds(self, role: str) -> list[str]:
        return [s.kind for s in self.adapter.slots if s.role == role]

    def inputs(self, role: str, q: torch.Tensor) -> None:
        """Linears reading the (normed) stream: W diag(g) Q' (their biases are untouched)."""
        for kind in self._kinds(role):
            self._set(kind, self.dense.weights[kind] @ q, self.dense.biases[kind])

    def outputs(self, role: str, q: torch.Tensor) -> None:
        """Linears writing the stream: Q'^T W and b Q'."""
        for kind in self._kinds(role):
            b = self.dense.biases[kind]
            self._set(kind, q.T @ self.dense.weights[kind], None if b is None else b @ q)

    def shortcut(self, name: str, q_from: torch.Tensor, q_to: torch.Tensor) -> None:
        param = getattr(self.block, name)
        if param is not None:
            param.copy_(q_from.T @ q_to)

    def out_linear(self, role: str) -> tuple[nn.Linear, torch.Tensor, torch.Tensor | None]:
        """The dense weight and bias of the role's single output linear, and that linear (for an input hook)."""
        kind = self._kinds(role)[0]
        return self.adapter.linear(self.b, kind), self.dense.weights[kind], self.dense.biases[kind]


def _branch_out(fill: _Filler, role: str, run, lifted: torch.Tensor) -> torch.Tensor:
    """lifted + W u + b: the dense-width signal after a branch, with u the input of its output linear."""
    lin, w, bias = fill.out_linear(role)
    seen: list[torch.Tensor] = []
    with hooks([lin.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))]):
        run()
    out = lifted.float() + seen[0].float() @ w.T.float()
    return out if bias is None else out + bias.float()


def attn_signals(block: nn.Module, fill: _Filler, xs: list[torch.Tensor], kws: list[dict],
                 q_in: torch.Tensor) -> list[torch.Tensor]:
    """Z = x~ Q_in'^T + o(attn(n(x~))) per batch, at the dense width: what enters the MLP norm, un-rotated."""
    return [_branch_out(fill, "attn_out", lambda x=x, kw=kw: block.attention(x, **kw), x.float() @ q_in.T.float())
            for x, kw in zip(xs, kws, strict=True)]


def mlp_signals(block: nn.Module, fill: _Filler, zs: list[torch.Tensor], q_mid: torch.Tensor) -> list[torch.Tensor]:
    """Y = z~ Q_mid'^T + down(mlp(n(z~))) per batch, at the dense width: the block output, un-rotated."""
    mlp, norm = block.sub("mlp"), block.sub("mlp_norm")
    return [_branch_out(fill, "mlp_out", lambda z=z: mlp(norm(z)), z.float() @ q_mid.T.float()) for z in zs]


@register
class SliceGPT(Method):
    name = "slicegpt"
    title = "SliceGPT (PCA rotation and slicing of the residual stream)"
    paper = "arXiv 2401.15024"
    summary = ("Rotates each layer boundary of the residual stream into its principal directions and deletes the "
               "weakest; the kept width is solved from the whole-model budget, shortcut matrices counted.")

    @dataclass
    class Knobs:
        slicing: float | None = None  # explicit slicing fraction s of the hidden width; overrides the solver
        damping: float = 0.01  # PCA damping, times mean(diag H)
        round_to: int = 8  # kept widths are multiples of this
        slice_head: bool = False  # slice the last block's output (the head's input) too
        untie: bool = False  # give a tied LM head its own weight (the paper's form) instead of a d x d map
        rotation: str = "block"  # "block": one rotation per boundary + shortcuts (paper); "global": one for all
        pca_signal: str = "raw"  # "raw": PCA of the residual stream (paper); "normed": of each token at unit RMS
        #: "slimbench": tied head kept via a d x d map; "official": untied head + embedding rows centred (official code)
        variant: str = "slimbench"

    # -- planning ------------------------------------------------------------------------------------
    def _check(self, adapter) -> None:
        k = self.knobs
        if k.rotation not in ROTATIONS:
            raise UserError(f"slicegpt.rotation={k.rotation!r}: choose one of {', '.join(ROTATIONS)}")
        if k.variant not in VARIANTS:
            raise UserError(f"slicegpt.variant={k.variant!r}: choose one of {', '.join(VARIANTS)}")
        if k.variant == "official" and (k.rotation != "block" or k.pca_signal != "raw"):
            raise UserError("slicegpt.variant=official uses the official per-block rotations of the raw stream: "
                            "drop slicegpt.rotation / slicegpt.pca_signal")
        if k.pca_signal not in SIGNALS:
            raise UserError(f"slicegpt.pca_signal={k.pca_signal!r}: choose one of {', '.join(SIGNALS)}")
        if k.round_to < 1 or k.damping < 0:
            raise UserError("slicegpt needs round_to >= 1 and damping >= 0")
        if k.slicing is not None and not 0.0 <= k.slicing < 1.0:
            raise UserError(f"slicegpt.slicing={k.slicing} must lie in [0, 1)")
        check_supported(adapter)

    @property
    def _untie(self) -> bool:
        return self.knobs.untie or self.knobs.variant == "official"

    def plan(self, adapter, width: int) -> Plan:
        """The widths and bookkeeping for kept width ``width``."""
        dense = adapter.embeddings().weight.shape[1]
        tied = adapter.tied_embeddings()
        return Plan(dense=dense, width=width, head_width=width if self.knobs.slice_head else dense,
                    shortcuts=self.knobs.rotation == "block", tied_map=tied and not self._untie,
                    untie=tied and self._untie)

    def device_workspace(self, adapter, tokens: int) -> int:
        """Float32 copies of the block's signals (attention and MLP outputs of every calibration token), beside the
        engine's activations. Sized from an H100 run (Llama-2-13B shape, offloaded): peak 23.8 GB, the fit estimate
        with this term 23.7 GB, without it 13.0 GB."""
        return 2 * tokens * adapter.embeddings().weight.shape[1] * 4

    def solve(self, adapter, ratio: float) -> Solution:
        """Kept width d whose counted whole model is closest to ``ratio`` (ties -> less slicing)."""
        self._check(adapter)
        k = self.knobs
        dense_params = count_params(adapter.model)
        D = adapter.embeddings().weight.shape[1]
        achieved = lambda d: 1.0 - predict_params(adapter, self.plan(adapter, d)) / dense_params  # noqa: E731
        if k.slicing is not None:
            d = kept_width(D, k.slicing, k.round_to)
            how = f"slicing {k.slicing} given"
        else:
            widths = sorted({*range(k.round_to, D + 1, k.round_to), D})
            ratios = {d: achieved(d) for d in widths}
            if ratio > ratios[widths[0]] + 1e-12:
                raise UserError(f"ratio {ratio} is beyond slicegpt on this model: keeping {widths[0]} of {D} "
                                f"directions removes only {ratios[widths[0]]:.4f}; ask for a smaller ratio")
            if ratio < ratios[D] - 1e-12:
                raise UserError(f"ratio {ratio} is below what slicegpt can give here: even unsliced the "
                                f"result removes {ratios[D]:.4f}")
            d = min(widths, key=lambda w: (abs(ratios[w] - ratio), -w))
            how = f"closest of widths {widths[0]}..{D} step {k.round_to}; zero slicing gives {ratios[D]:.4f}"
        plan = self.plan(adapter, d)
        predicted = predict_params(adapter, plan)
        head = "tied + d x d map" if plan.tied_map else ("untied (new V x D weight)" if plan.untie else "own weight")
        notes = (f"kept width {d} of {D} (slicing {1 - d / D:.4f}), {k.rotation} rotation, head {head}: achieved "
                 f"ratio {1 - predicted / dense_params:.4f} vs target {ratio:.4f} ({how})")
        return Solution(knobs={"width": d, "slicing": 1 - d / D}, predicted_params=predicted, notes=notes)

    # -- compression ---------------------------------------------------------------------------------
    @torch.no_grad()
    def compress(self, model: nn.Module, adapter, calibration: Calibration, solution: Solution) -> CompressionInfo:
        """Fold the norms, rotate and slice boundary by boundary, fill the head; see the module docstring."""
        self._check(adapter)
        plan = self.plan(adapter, int(solution.knobs["width"]))
        n = adapter.num_blocks
        placement = of(calibration, model)
        work = placement.device  # the ends are small: their maths runs on the work device, results copied home
        final_gain = adapter.norm_gain(adapter.final_norm()).double().to(work)
        emb_dense = adapter.embeddings().weight.detach().to(work)
        head_dense = adapter.lm_head().weight.detach().to(work)
        if self.knobs.rotation == "global":
            q_global, vals = self._global_rotation(model, adapter, calibration)
            xs, kwargs, q0 = [], [], q_global
        else:
            q_global = None
            cap = blockwise.capture(model, adapter, list(calibration.batches(work)), placement)
            xs, kwargs = cap.inputs, cap.kwargs
            del cap  # the embeddings' outputs live on only as xs, replaced block by block
            if self.knobs.variant == "official":  # the block-0 signal is the (scaled) embedding row: centre it too
                xs = [x - x.mean(-1, keepdim=True) for x in xs]
            q0, vals = self._pca(xs)
        kept = [kept_share(vals, plan.width)]

        structure.apply(model, adapter, "slicegpt_ends", embed_width=plan.width, head_width=plan.head_width,
                        head_map=plan.tied_map, untie=plan.untie)
        q0s = q0[:, : plan.width]
        emb = emb_dense.double()
        if self.knobs.variant == "official":  # official fusion: each embedding row's mean subtracted
            emb = emb - emb.mean(-1, keepdim=True)
        adapter.embeddings().weight.copy_(emb @ q0s)
        xs = [(x.float() @ q0s.float()).to(x.dtype) for x in xs]

        q_in = q0
        for b in range(n):
            d_in, d_mid, d_out = plan.widths(b, n)
            with blockwise.at_work(placement, adapter, [b]):  # the sliced block goes home at the end
                dense = _Dense.take(adapter, b)
                block = structure.apply(model, adapter, "slicegpt_block", block=b, d_in=d_in, d_mid=d_mid, d_out=d_out,
                                        shortcuts=plan.shortcuts)
                fill = _Filler(adapter, b, dense, block)
                qi = q_in[:, :d_in]
                fill.inputs("attn_in", qi)
                if q_global is not None:
                    q_mid = q_out = q_global
                else:
                    zs = attn_signals(block, fill, xs, kwargs[b], qi)
                    q_mid, vals = self._pca(zs)
                    kept.append(kept_share(vals, d_mid))
                qm = q_mid[:, :d_mid]
                fill.shortcut("attn_shortcut", qi, qm)
                fill.outputs("attn_out", qm)
                fill.inputs("mlp_in", qm)
                if q_global is None:
                    zs = [(z @ qm.float()).to(x.dtype) for z, x in zip(zs, xs, strict=True)]
                    ys = mlp_signals(block, fill, zs, qm)
                    q_out, vals = self._pca(ys)
                    kept.append(kept_share(vals, d_out))
                    xs = [(y @ q_out[:, :d_out].float()).to(x.dtype) for y, x in zip(ys, xs, strict=True)]
                qo = q_out[:, :d_out]
                fill.shortcut("mlp_shortcut", qm, qo)
                fill.outputs("mlp_out", qo)
                q_in = q_out

        scaled = final_gain[:, None] * q_in[:, : plan.head_width]  # diag(g) Q_L'
        if plan.tied_map:
            adapter.final_norm().head_map.copy_(scaled.T @ q0s)
        else:
            adapter.lm_head().weight.copy_(head_dense.double() @ scaled)
        details = {"slicing": 1 - plan.width / plan.dense, "kept_width": plan.width, "dense_width": plan.dense,
                   "head_width": plan.head_width, "rotation": self.knobs.rotation,
                   "head": "tied+map" if plan.tied_map else ("untied" if plan.untie else "own"),
                   "kept_energy": kept, "damping": self.knobs.damping, "variant": self.knobs.variant,
                   "embedding_centred": self.knobs.variant == "official"}
        return CompressionInfo(details=details)

    def _pca(self, signals: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return pca(sum(gram(x, self.knobs.pca_signal == "normed") for x in signals), self.knobs.damping)

    def _global_rotation(self, model: nn.Module, adapter, calib: Calibration) -> tuple[torch.Tensor, torch.Tensor]:
        """One Q for the whole stream: PCA of the signal at every norm's input (all 2L + 1 boundaries), dense model."""
        acc: list[torch.Tensor] = []
        norms = [get_module(blk, p) for blk in adapter.blocks() for p in (adapter.attn_norm_path, adapter.mlp_norm_path)]
        norms.append(adapter.final_norm())

        def hook(_module, args):
            x = args[0]
            g = gram(x, self.knobs.pca_signal == "normed")
            acc[:] = [acc[0] + g] if acc else [g]

        model.eval()
        with hooks([m.register_forward_pre_hook(hook) for m in norms]), \
                blockwise.streaming(model, adapter, of(calib, model)):
            for batch in calib.batches(model_device(model)):
                model(input_ids=batch, use_cache=False)
        return pca(acc[0], self.knobs.damping)
