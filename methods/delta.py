"""DeltaLLM: consecutive blocks share weights, a follower block stores only a low-rank delta (arXiv 2501.18596).

Blocks are cut into consecutive groups of ``group_size`` (the first and last block stay alone when ``keep_ends``):
the group's first block is the base, the others follow it. For every shared linear kind a follower computes

    y = W_base x + A (B x) + b_follower,        A: out x r,  B: r x in,

where W_base is the base block's own nn.Linear, held by reference (one module, stored and counted once) and W is
never materialised. The follower keeps its own bias (if the family has one) inside A's module; the base's bias is
not used by the follower. Norms stay per block. A B starts as the rank-r truncated SVD of W_follower - W_base and is
then distilled from the dense model with progressive module replacement (see ``methods/_delta_train.py``).

Training data (``train_data``): "calibration" cycles the calibration windows (the default, so earlier results stay
as they were); "corpus" packs real English text of its own (:mod:`bench.corpus`, disjoint from the calibration and
perplexity text) into rows of ``train_seq_len`` tokens, as the paper trains on a separate corpus. ``curve_at`` records
what training buys: at each token count the held-out KL to the dense model and the perplexity, both on the
``eval_windows`` held-out calibration windows. Those windows are never trained on in either mode and need no second
tokenisation; the suite's perplexity windows stay untouched until the final evaluation.

Budget: each shared follower linear saves out*in - r*(out + in) parameters, so a kind is shared only where
r*(out + in) < out*in. The solver keeps one rank r for all shared kinds and tries the MLP kinds alone first (the
paper: MLP weights compress with less loss), then all ``shared`` kinds; within the first stage that reaches the
target it takes the smallest r whose counted parameters are at or just above (1 - ratio) * P_dense.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench import blockwise, integrity, structure
from bench.adapters.base import get_module, set_module
from bench.budget import count_params
from bench.calibration import Calibration, block_grams
from bench.corpus import DEFAULT_SOURCE, packed_rows, source, source_files
from bench.errors import UserError
from bench.evaluate.perplexity import perplexity
from bench.placement import gib, module_bytes, of
from bench.registry import KEYED_WHEN_SET, OPERATIONAL, CompressionInfo, Method, Solution, register
from methods import _delta_train as training
from methods._whiten import whitening_workspace


class DeltaLinear(nn.Module):
    """y = base(x) without its bias + up(down(x)): a shared base weight plus a rank-r delta A B (and own bias)."""

    def __init__(self, base: nn.Linear, down: nn.Linear, up: nn.Linear):
        super().__init__()
        self.base = base
        self.down = down
        self.up = up
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.rank = down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.base.weight) + self.up(self.down(x))


@structure.structural_op("delta_share")
def _delta_share(model: nn.Module, adapter, base: str, module: str, rank: int) -> DeltaLinear:
    """Replace linear ``module`` by a DeltaLinear on the (shared) linear ``base`` with an uninitialised rank-r delta."""
    ref, shared = get_module(model, module), get_module(model, base)
    if not isinstance(shared, nn.Linear) or (shared.out_features, shared.in_features) != (ref.out_features,
                                                                                          ref.in_features):
        raise ValueError(f"{base} cannot be the base of {module}: it must be an nn.Linear of the same shape")
    w = ref.weight
    down = nn.Linear(ref.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
    up = nn.Linear(rank, ref.out_features, bias=ref.bias is not None, device=w.device, dtype=w.dtype)
    new = DeltaLinear(shared, down, up)
    set_module(model, module, new)
    return new


def block_groups(num_blocks: int, group_size: int, keep_ends: bool) -> list[list[int]]:
    """Consecutive groups [base, follower, ...]; with ``keep_ends`` the first and last block stay alone."""
    lo, hi = (1, num_blocks - 1) if keep_ends else (0, num_blocks)
    return [list(range(s, min(s + group_size, hi))) for s in range(lo, hi, group_size)]


def saved_params(out_f: int, in_f: int, rank: int) -> int:
    """Parameters one follower linear saves as a rank-r delta: out*in - r*(out + in) (its bias is kept)."""
    return out_f * in_f - rank * (out_f + in_f)


@dataclass
class Plan:
    """Which follower linears become deltas on which base, at what rank, and the parameters that leaves."""

    rank: int
    kinds: list[str]
    groups: list[list[int]]
    params: int


def plan(adapter, kinds: list[str], rank: int, groups: list[list[int]], dense: int) -> Plan:
    """Share the ``kinds`` that save parameters at ``rank`` (r*(out+in) < out*in in every follower), and count."""
    followers = [(g[0], f) for g in groups for f in g[1:]]
    kept, removed = [], 0
    for kind in kinds:
        saves = []
        for b, f in followers:
            base, fol = adapter.linear(b, kind), adapter.linear(f, kind)
            if base.weight.shape != fol.weight.shape:
                raise UserError(f"delta: {kind} of blocks {b} and {f} differ in shape; they cannot share a base")
            saves.append(saved_params(fol.out_features, fol.in_features, rank))
        if saves and min(saves) > 0:
            kept.append(kind)
            removed += sum(saves)
    return Plan(rank=rank, kinds=kept, groups=groups, params=dense - removed)


def max_rank(adapter, kinds: list[str]) -> int:
    """The largest rank at which any of ``kinds`` can still save parameters."""
    sizes = [adapter.linear(0, k) for k in kinds]
    return max((m.out_features * m.in_features // (m.out_features + m.in_features) for m in sizes), default=0)


@register
class DeltaLLM(Method):
    name = "delta"
    title = "DeltaLLM (shared base weights + low-rank deltas, distilled)"
    paper = "arXiv 2501.18596"
    summary = ("Consecutive blocks share their linears' weights; each follower stores a low-rank delta initialised by "
               "SVD of its difference to the base and trained by distillation with progressive module replacement.")

    @dataclass
    class Knobs:
        #: blocks per group: one base and group_size - 1 followers
        group_size: int = 2
        #: the first and last block stay unshared
        keep_ends: bool = True
        #: linear kinds that may be shared (adapter kinds; empty = all); the solver tries the MLP ones alone first
        shared: list[str] = field(default_factory=list)
        #: distillation tokens (windows of the calibration data, cycled); 0 = the SVD-initialised, untrained model
        train_tokens: int = 16384
        #: AdamW learning rate of the deltas
        lr: float = 1e-3
        #: learning-rate schedule: "constant" (the peak throughout), "cosine" or "linear" (decay to 0 at the end)
        lr_schedule: str = field(default="constant", metadata=KEYED_WHEN_SET)
        #: fraction of the steps over which the learning rate rises linearly to ``lr`` first
        lr_warmup: float = field(default=0.0, metadata=KEYED_WHEN_SET)
        #: calibration windows per training step
        batch_size: int = 1
        #: softmax temperature of the KL distillation loss (scaled by T^2)
        temperature: float = 1.0
        #: progressive module replacement: replacement probability at step 0 ...
        pmr_start: float = 0.1
        #: ... rising linearly to 1 over this fraction of the steps, then 1
        pmr_warmup: float = 0.5
        #: also train the shared base weights directly (the paper's LoRA-on-base variant is not implemented)
        train_base: bool = False
        #: delta init: "svd" of W_f - W_base (the paper) or "whitened" (SVD-LLM's activation-aware SVD on the calibration)
        init: str = "svd"
        #: calibration windows held out of training to measure the KL of the untrained and the trained model
        eval_windows: int = 2
        #: what the deltas train on: "calibration" (its windows, cycled) or "corpus" (packed text of bench.corpus)
        train_data: str = "calibration"
        #: the packaged corpus for train_data=corpus (see bench.corpus.SOURCES)
        corpus: str = DEFAULT_SOURCE
        #: tokens per training row for train_data=corpus; 0 = the calibration windows' length
        train_seq_len: int = 0
        #: rows per forward within a step of batch_size rows (gradients accumulate); 0 = the whole batch
        micro_batch: int = 0
        #: "auto" (bf16 autocast on CUDA, none on CPU), "bf16" or "off"; the KL is always taken in float32. AdamW
        #: steps float32 masters of the deltas whatever the model's dtype (bf16 ones are rounded back each step)
        autocast: str = "auto"
        #: token counts (16k, 1M, ... accepted) at which to measure held-out KL and perplexity; 0 = before training
        curve_at: list[str] = field(default_factory=list)
        #: seconds of training between saves of its state to the run's cache, from which a rerun of the same cell
        #: (killed, preempted, retried) resumes; 0 = never saved. Not part of the cell's key: it changes no result
        save_every: float = field(default=600.0, metadata=OPERATIONAL)

    def _kinds(self, adapter) -> list[str]:
        k = self.knobs
        if k.init not in ("svd", "whitened"):
            raise UserError(f"delta.init must be 'svd' or 'whitened', not {k.init!r}")
        if k.train_data not in ("calibration", "corpus"):
            raise UserError(f"delta.train_data must be 'calibration' or 'corpus', not {k.train_data!r}")
        if k.train_data == "corpus" and k.train_tokens:
            source_files(source(k.corpus))  # an unknown corpus or one not installed is refused before any work
        if k.autocast not in ("auto", "bf16", "off"):
            raise UserError(f"delta.autocast must be 'auto', 'bf16' or 'off', not {k.autocast!r}")
        if k.lr_schedule not in training.LR_SCHEDULES:
            raise UserError(f"delta.lr_schedule must be one of {', '.join(training.LR_SCHEDULES)}, not {k.lr_schedule!r}")
        if not 0.0 <= k.lr_warmup < 1.0:
            raise UserError(f"delta.lr_warmup is a fraction of the steps in [0, 1), not {k.lr_warmup}")
        if k.group_size < 2:
            raise UserError("delta.group_size must be >= 2 (a base and at least one follower)")
        unknown = sorted(set(k.shared) - set(adapter.kinds()))
        if unknown:
            raise UserError(f"delta.shared: {adapter.family} blocks have no linear {unknown}; kinds: {adapter.kinds()}")
        return [s for s in adapter.kinds() if not k.shared or s in k.shared]

    # the SVD initialisation's whitened factorisation; the distillation's teacher and logits come on top when
    # training (it runs resident, never offloaded)
    device_workspace = whitening_workspace

    def solve(self, adapter, ratio: float) -> Solution:
        """Shared kinds (MLP first) and one rank r whose counted parameters are at or just above the target."""
        kinds = self._kinds(adapter)
        groups = block_groups(adapter.num_blocks, self.knobs.group_size, self.knobs.keep_ends)
        dense = count_params(adapter.model)
        if not 0 <= ratio < 1:
            raise UserError(f"delta: ratio must be in [0, 1), not {ratio}")
        target = (1 - ratio) * dense
        mlp = [k for k in kinds if adapter.role_of(k).startswith("mlp")]
        stages = [s for s in (mlp, kinds) if s]
        best = None
        for i, stage in enumerate(stages):
            if i and stage == stages[i - 1]:
                continue
            if plan(adapter, stage, 1, groups, dense).params > target:
                continue  # even rank 1 does not reach the target with these kinds
            # parameters grow with r: the smallest r whose count is >= target is the closest one at or above it
            lo, hi = 1, max_rank(adapter, stage) + 1
            while lo < hi:
                mid = (lo + hi) // 2
                if plan(adapter, stage, mid, groups, dense).params >= target:
                    hi = mid
                else:
                    lo = mid + 1
            best = plan(adapter, stage, lo, groups, dense)
            break
        if best is None:
            reach = plan(adapter, kinds, 1, groups, dense).params
            raise UserError(f"delta: ratio {ratio} is out of reach; sharing {kinds} at rank 1 in groups of "
                            f"{self.knobs.group_size} removes at most {1 - reach / dense:.4f} of the parameters")
        followers = sum(len(g) - 1 for g in groups)
        notes = (f"{followers} follower blocks share {best.kinds or 'nothing'} with their base at rank {best.rank}; "
                 f"counted ratio {1 - best.params / dense:.4f}")
        return Solution(knobs={"rank": best.rank, "kinds": best.kinds, "groups": best.groups},
                        predicted_params=best.params, notes=notes)

    def compress(self, model: nn.Module, adapter, calibration: Calibration, solution: Solution) -> CompressionInfo:
        """SVD-initialise the deltas of the solved plan, then distil (unless train_tokens=0); details say how well."""
        k = self.knobs
        n_eval = max(0, min(k.eval_windows, calibration.n_samples - 1))  # at least one window left to train on
        self._kinds(adapter)
        n_train = calibration.n_samples - n_eval
        heldout, train_windows = calibration.tokens[n_train:], calibration.tokens[:n_train]
        needs_teacher = k.train_tokens > 0 or n_eval > 0
        if k.train_tokens > 0 and next(model.parameters()).dtype == torch.float16:
            raise UserError("delta: distillation in float16 overflows without loss scaling (its KL turns non-finite); "
                            "use --dtype bfloat16 or float32, or set delta.train_tokens=0")
        if needs_teacher and of(calibration, model).offload:
            raise UserError("delta: distillation needs the student and a dense teacher copy on the device at once "
                            "(twice the model's bytes), which offloading cannot give; run on a device that holds "
                            "both, or set delta.train_tokens=0 delta.eval_windows=0 for the SVD initialisation alone")
        if needs_teacher:
            self._check_room(model, adapter, calibration, solution)
        teacher = copy.deepcopy(model).eval() if needs_teacher else None
        if teacher is not None:
            teacher.requires_grad_(False)
        deltas = []
        if k.init == "whitened":  # statistics of the training windows only, so the held-out KL stays held out
            sub = Calibration(tokens=train_windows, seed=calibration.seed, batch_size=calibration.batch_size,
                              placement=calibration.placement)
            for step in block_grams(model, adapter, sub, solution.knobs["groups"]):  # a base and its followers
                grams = {(b, role): g for b in step.blocks for role, g in step.stats[b]["grams"].items()}
                groups = [g for g in solution.knobs["groups"] if g[0] in step.blocks]
                deltas += share(model, adapter, solution.knobs | {"groups": groups}, grams)
        else:
            placement = of(calibration, model)
            for g in solution.knobs["groups"]:
                with blockwise.at_work(placement, adapter, g):
                    deltas += share(model, adapter, solution.knobs | {"groups": [g]}, None)
        details: dict = {"init": k.init, "rank": solution.knobs["rank"], "kinds": solution.knobs["kinds"],
                         "groups": solution.knobs["groups"], "deltas": len(deltas), "loss": "KL(teacher || student)"}
        if teacher is None:
            return CompressionInfo(train_tokens=0, details=details)
        rows, data_info = train_windows, {"train_data": "calibration", "rows": int(train_windows.shape[0]),
                                          "seq_len": int(train_windows.shape[1])}
        if k.train_data == "corpus" and k.train_tokens > 0:
            rows, data_info = self._corpus_rows(calibration, k)
        probe = rows[: max(n_eval, 1)]  # windows trained on, to see the training loss fall
        bs = calibration.batch_size
        kl = {"heldout_untrained": training.eval_kl(model, teacher, heldout, bs) if n_eval else None,
              "train_untrained": training.eval_kl(model, teacher, probe, bs)}
        curve_at = sorted({parse_tokens(v) for v in k.curve_at})
        if curve_at and not n_eval:
            raise UserError("delta.curve_at measures on held-out calibration windows: set delta.eval_windows >= 1")
        measure = None
        if curve_at:
            dense_ppl = perplexity(teacher, heldout, bs)["perplexity"]

            def measure() -> dict:
                return {"kl_heldout": training.eval_kl(model, teacher, heldout, bs),
                        "ppl": perplexity(model, heldout, bs)["perplexity"]}

            details["curve_dense_ppl"] = dense_ppl
            points = [{"tokens": 0, "seconds": 0.0, **measure()}]  # before any training
        tokens, seconds, state_path = 0, 0.0, None
        if k.train_tokens > 0:
            params = [p for d in deltas for p in (d.down.weight, d.up.weight)]
            if k.train_base:
                params += list({id(d.base.weight): d.base.weight for d in deltas}.values())
            changed = sorted({b for g in solution.knobs["groups"] for b in (g if k.train_base else g[1:])})
            device = next(model.parameters()).device
            amp = {"auto": torch.bfloat16 if device.type == "cuda" else None, "bf16": torch.bfloat16,
                   "off": None}[k.autocast]
            state_path, state_key = self._state_file(calibration, solution, rows, params)
            cfg = training.TrainConfig(tokens=k.train_tokens, batch_size=k.batch_size, lr=k.lr,
                                       lr_schedule=k.lr_schedule, lr_warmup=k.lr_warmup,
                                       temperature=k.temperature, pmr_start=k.pmr_start, pmr_warmup=k.pmr_warmup,
                                       seed=calibration.seed, micro_batch=k.micro_batch, autocast=amp,
                                       curve_at=tuple(curve_at), state_path=state_path, state_key=state_key,
                                       save_every=k.save_every)
            log = training.train(model, adapter, teacher, rows, params, changed, cfg, measure, calibration.report)
            tokens, seconds = log["tokens"], log["seconds"]
            if measure is not None:
                points += log.pop("points")
            details["train"] = log
            details["train_data"] = data_info
            kl["heldout_trained"] = training.eval_kl(model, teacher, heldout, bs) if n_eval else None
            kl["train_trained"] = training.eval_kl(model, teacher, probe, bs)
            if measure is not None and points[-1]["tokens"] != tokens:  # the end of training is the last point
                points.append({"tokens": tokens, "seconds": log["seconds"], "kl_heldout": kl["heldout_trained"],
                               "ppl": perplexity(model, heldout, bs)["perplexity"]})
        if measure is not None:
            details["curve"] = points
            details["curve_skipped"] = [t for t in curve_at if t > tokens]
        details["kl"] = kl
        details["kl_windows"] = {"heldout": n_eval, "train_probe": int(probe.shape[0])}
        # the finished training state stays until the cell's record is on disk: a run killed while evaluating resumes
        return CompressionInfo(train_tokens=tokens, train_seconds=seconds, details=details,
                               scratch=[state_path] if state_path is not None else [])

    def _check_room(self, model: nn.Module, adapter, calibration: Calibration, solution: Solution) -> None:
        """Refuse, before the teacher is copied, a distillation the device budget cannot hold beside the model."""
        placement, k = of(calibration, model), self.knobs
        if placement.budget_bytes is None:
            return
        teacher = module_bytes(model)
        rows = k.micro_batch if 0 < k.micro_batch < k.batch_size else k.batch_size
        seq = (k.train_seq_len or calibration.seq_len) if k.train_data == "corpus" else calibration.seq_len
        elem = next(model.parameters()).element_size()
        train = optim = 0
        if k.train_tokens > 0:
            train = training.training_bytes(adapter, rows, seq, elem)
            optim = training.optimizer_bytes(trained_params(adapter, solution.knobs, k.train_base), elem)
        left = placement.budget_bytes - teacher - placement.resident  # the student is the resident model itself
        if teacher + train + optim > left:
            raise UserError(
                f"delta: distillation needs {gib(teacher + train + optim)} on {placement.device} beside the model (a "
                f"dense teacher copy {gib(teacher)}, activations and logits of {rows} x {seq} tokens a forward about "
                f"{gib(train)}, gradients, float32 masters and AdamW moments of the trained weights {gib(optim)}), "
                f"but {gib(max(left, 0))} of the {gib(placement.budget_bytes)} budget is left; use a larger device, a "
                "smaller delta.micro_batch or delta.train_seq_len, or delta.train_tokens=0 delta.eval_windows=0 for "
                "the SVD initialisation alone")

    def _state_file(self, calibration: Calibration, solution: Solution, rows: torch.Tensor,
                    params: list[nn.Parameter]) -> tuple[Path | None, str]:
        """Where this cell's training state is saved, and its key: a digest of everything that decides the training
        (the dense model, the calibration windows, the training rows, the plan, every result knob, the weights'
        dtype and the device), so a state is only resumed by the run that wrote it. None without a disk cache."""
        if calibration.cache_dir is None or not calibration.model_key or self.knobs.save_every <= 0:
            return None, ""
        spec = {"model": calibration.model_key, "calibration": integrity.tensors_sha256({"t": calibration.tokens}),
                "rows": integrity.tensors_sha256({"t": rows}),
                "plan": solution.knobs, "knobs": self.result_knobs(), "dtype": str(params[0].dtype) if params else "",
                "device": params[0].device.type if params else "", "version": training.STATE_VERSION}
        key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:24]
        return Path(calibration.cache_dir) / f"delta-train-{key}.safetensors", key

    @staticmethod
    def _corpus_rows(calibration: Calibration, k) -> tuple[torch.Tensor, dict]:
        """Enough packed corpus rows for ``k.train_tokens`` in whole steps of ``k.batch_size`` rows."""
        if calibration.tokenizer is None:
            raise UserError("delta.train_data=corpus needs the model's tokenizer (the runner hands it over)")
        seq_len = k.train_seq_len or calibration.seq_len
        if seq_len < 2:
            raise UserError(f"delta.train_seq_len must be >= 2 (or 0 for the calibration length), not {seq_len}")
        steps = max(1, math.ceil(k.train_tokens / (k.batch_size * seq_len)))
        t0 = time.perf_counter()
        rows, info = packed_rows(calibration.tokenizer, seq_len, steps * k.batch_size, calibration.seed, k.corpus,
                                 None if calibration.cache_dir is None else Path(calibration.cache_dir))
        return rows, {"train_data": "corpus", **info, "prepare_seconds": round(time.perf_counter() - t0, 3)}


def trained_params(adapter, knobs: dict, train_base: bool = False) -> int:
    """Parameters the distillation trains for a solved plan: every follower's r x (in + out) delta (and, with
    ``train_base``, each group's shared base linears)."""
    total = 0
    for g in knobs["groups"]:
        for kind in knobs["kinds"]:
            m = adapter.linear(g[0], kind)
            rank = min(int(knobs["rank"]), m.out_features, m.in_features)
            total += (len(g) - 1) * rank * (m.in_features + m.out_features)
            if train_base and len(g) > 1:
                total += m.weight.numel()
    return total


def parse_tokens(value: int | str) -> int:
    """A token count: an int, or a string such as "16384", "16k" or "1.5M"."""
    text = str(value).strip().lower().replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(text[-1:], 1)
    try:
        number = float(text[:-1] if scale > 1 else text)
    except ValueError:
        raise UserError(f"delta.curve_at: {value!r} is not a token count (e.g. 16384, 16k, 1M)") from None
    if not math.isfinite(number) or number < 0:
        raise UserError(f"delta.curve_at: {value!r} is not a token count (e.g. 16384, 16k, 1M)")
    return int(round(number * scale))


@torch.no_grad()
def share(model: nn.Module, adapter, knobs: dict, grams: dict | None = None) -> list[DeltaLinear]:
    """Replace every follower linear of the plan by a DeltaLinear whose A B is the rank-r SVD of W_f - W_base.

    ``grams`` ({(block, role): G} of the dense model) makes it the activation-aware SVD of the follower's input.
    """
    out = []
    for g in knobs["groups"]:
        for f in g[1:]:
            for kind in knobs["kinds"]:
                fol = adapter.linear(f, kind)
                w_f, b_f = fol.weight.detach().clone(), None if fol.bias is None else fol.bias.detach().clone()
                rank = min(int(knobs["rank"]), fol.out_features, fol.in_features)
                delta = structure.apply(model, adapter, "delta_share", base=adapter.linear_name(g[0], kind),
                                        module=adapter.linear_name(f, kind), rank=rank)
                gram = None if grams is None else grams[(f, adapter.role_of(kind))]
                a, b = svd_factors(w_f - delta.base.weight, rank, gram)
                delta.up.weight.copy_(a)
                delta.down.weight.copy_(b)
                if b_f is not None:
                    delta.up.bias.copy_(b_f)
                out.append(delta)
    return out


def svd_factors(diff: torch.Tensor, rank: int, gram: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r A B of ``diff`` split evenly: A = U_r S_r^(1/2), B = S_r^(1/2) V_r^T (float64 on CPU).

    With the input Gram G = sum x x^T (``gram``) it minimises ||(diff - A B) X||_F instead, as SVD-LLM does:
    L = cholesky(G + eps I), SVD of diff L = U S V^T, A = U_r S_r^(1/2), B = S_r^(1/2) V_r^T L^(-1).
    """
    work = diff.double() if diff.device.type == "cpu" else diff.float()
    chol = None
    if gram is not None:
        g = gram.to(work)
        g = g + 1e-5 * g.diagonal().mean().clamp(min=1e-12) * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
        chol = torch.linalg.cholesky(g)
        work = work @ chol
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    root = s[:rank].sqrt()
    a, b = u[:, :rank] * root, root[:, None] * vh[:rank]
    if chol is not None:
        b = torch.linalg.solve_triangular(chol, b, upper=False, left=False)  # B L = S^(1/2) V^T
    return a.to(diff.dtype), b.to(diff.dtype)
