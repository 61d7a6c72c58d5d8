"""How far a compressed model has moved from its dense model on the perplexity windows.

Per predicted position: KL(P_dense || Q) of the next-token distributions, and whether both models' top-1
tokens agree. Both are paired by construction (same windows, same positions) and far less noisy than
accuracy. The dense side is a ``Reference``, computed once per model and windows and kept in the cache.

Storage: per position, the dense model's top-k log-probabilities with their token ids (k = 64) and m = 32
tokens drawn (seeded) from the rest of its distribution with their log-probabilities: float32 and int32, 768
bytes a position whatever the vocabulary (6.3 MB for 16 x 511 positions). The KL splits into the top-k terms,
exact, and the tail term sum over the rest of p log(p / q) = r E[log p - log q] (r the mass outside the top-k,
the expectation over the dense tail), estimated without bias by the mean over the m drawn tokens. SmolLM2 leaves
r = 0.11 outside its top 64, where the top-k terms alone miss 14-16 % of the KL.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.calibration import _load, _release, _store

TOPK = 64
TAIL_SAMPLES = 32
REFERENCE_VERSION = 2
_MEMORY: dict[str, Reference] = {}  # key -> reference already loaded or computed in this process


@dataclass
class Reference:
    """The dense model's top-k next-token log-probs for every predicted position of the windows, in order."""

    logp: torch.Tensor  # [positions, k] float32, sorted descending
    ids: torch.Tensor  # [positions, k] int32
    tail_logp: torch.Tensor  # [positions, m] float32: log p of tokens drawn from the dense tail
    tail_ids: torch.Tensor  # [positions, m] int32
    windows_sha: str
    source: str = "computed"  # computed, memory or disk: how this run got it
    seconds: float = 0.0
    #: when computed here: the dense model's own perplexity result and closeness summary from the same forward,
    #: so that the dense cell does not run the windows a second time (never stored on disk)
    dense_eval: dict | None = None

    def slice(self, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[start:stop] for t in (self.logp, self.ids, self.tail_logp, self.tail_ids))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"logp": self.logp, "ids": self.ids, "tail_logp": self.tail_logp, "tail_ids": self.tail_ids}


def windows_sha(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def summarise(logits: torch.Tensor, k: int = TOPK, m: int = TAIL_SAMPLES, seed: int = 0,
              normalised: bool = False) -> tuple[torch.Tensor, ...]:
    """Per row of ``logits`` [n, V] (log-probs already when ``normalised``): top-k log-probs (descending) and
    ids, and m ids drawn from the rest of the distribution (with replacement, seeded) with their log-probs."""
    logp = logits if normalised else torch.log_softmax(logits.float(), dim=-1)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    rest = logp.exp().scatter(-1, ids, 0.0)
    has_rest = rest.sum(-1, keepdim=True) > 0
    rest = torch.where(has_rest, rest, torch.ones_like(rest))  # no tail: any draw, weighted by r = 0 below
    gen = torch.Generator(device=logits.device).manual_seed(seed)
    tail_ids = torch.multinomial(rest, m, replacement=True, generator=gen)
    return values, ids.to(torch.int32), logp.gather(-1, tail_ids), tail_ids.to(torch.int32)


def kl_and_top1(ref_logp: torch.Tensor, ref_ids: torch.Tensor, tail_logp: torch.Tensor, tail_ids: torch.Tensor,
                logits: torch.Tensor, normalised: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: KL(dense || model), exact over the dense top-k plus the sampled tail estimate, and whether
    the top-1 tokens agree. ``logits`` are the model's (log-probs already when ``normalised``)."""
    logq = logits if normalised else torch.log_softmax(logits.float(), dim=-1)
    lp = ref_logp.double()
    p = lp.exp()
    kl = (p * (lp - logq.gather(-1, ref_ids.long()).double())).sum(-1)
    rest = (1 - p.sum(-1)).clamp_min(0)
    tail = (tail_logp.double() - logq.gather(-1, tail_ids.long()).double()).mean(-1)
    agree = logq.argmax(-1) == ref_ids[..., 0].long()
    return (kl + rest * tail).float(), agree


class Tracker:
    """Fed each perplexity batch's logits in window order; summarises KL and top-1 agreement at the end."""

    def __init__(self, reference: Reference) -> None:
        self.ref = reference
        self.pos = 0
        self.kl: list[torch.Tensor] = []
        self.agree: list[torch.Tensor] = []
        self.window_len = 0  # predicted positions per window, so the summary can pair models window by window

    def __call__(self, logp: torch.Tensor, batch: torch.Tensor) -> None:
        for row in logp:  # row by row: each row's [:-1] is a view, the batch's would be copied to flatten it
            pred = row[:-1]
            ref = [t.to(pred.device) for t in self.ref.slice(self.pos, self.pos + len(pred))]
            kl, agree = kl_and_top1(*ref, pred, normalised=True)
            self.kl.append(kl.cpu())
            self.agree.append(agree.cpu())
            self.pos += len(pred)
            self.window_len = len(pred)

    def summary(self) -> dict:
        kl, agree = torch.cat(self.kl), torch.cat(self.agree)
        finite = torch.isfinite(kl)
        windows = len(kl) // self.window_len if self.window_len else 0
        return {"kl_mean": float(kl.double().mean()), "kl_p99": float(torch.quantile(kl[finite].double(), 0.99))
                if finite.any() else float("nan"), "top1_agreement": float(agree.double().mean()),
                "positions": len(kl), "topk": self.ref.logp.shape[-1], "tail_samples": self.ref.tail_ids.shape[-1],
                # each window's mean, in window order (all windows are equally long): paired SEs in `bench compare`
                "window_kl": kl.double().view(windows, -1).mean(-1).tolist() if windows else [],
                "window_top1": agree.double().view(windows, -1).mean(-1).tolist() if windows else [],
                "kl_note": "KL(dense || model): exact over the dense top-k tokens, the rest estimated without bias "
                           "from tokens drawn from the dense tail",
                "reference": {"source": self.ref.source, "seconds": self.ref.seconds,
                              "windows_sha": self.ref.windows_sha}}


@dataclass
class _Collect:
    """Builds the reference batch by batch and, on the same logits, the dense model's closeness to its own
    reference (KL about 0 up to rounding, top-1 agreement 1), so the dense cell can report it without a pass."""

    parts: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    kl: list[torch.Tensor] = field(default_factory=list)
    agree: list[torch.Tensor] = field(default_factory=list)

    window_len: int = 0

    def __call__(self, logp: torch.Tensor, batch: torch.Tensor) -> None:
        self.window_len = logp.shape[1] - 1
        pred = logp[:, :-1].reshape(-1, logp.shape[-1])
        summary = summarise(pred, seed=len(self.parts), normalised=True)
        self.parts.append(tuple(t.cpu() for t in summary))
        kl, agree = kl_and_top1(*summary, pred, normalised=True)
        self.kl.append(kl.cpu())
        self.agree.append(agree.cpu())

    def reference(self, sha: str, seconds: float, ppl: dict) -> Reference:
        ref = Reference(*(torch.cat(parts) for parts in zip(*self.parts, strict=True)), sha, "computed", seconds)
        own = Tracker(ref)
        own.kl, own.agree, own.window_len = self.kl, self.agree, self.window_len
        ref.dense_eval = {"perplexity": ppl, "closeness": own.summary()}
        return ref


def reference_path(cache: Path | None, model_key: str, sha: str) -> Path | None:
    """Where the reference of a model (``model_key``) on windows ``sha`` is stored; None without a cache."""
    if cache is None:
        return None
    key = hashlib.sha256(f"{model_key}:{sha}:top{TOPK}:tail{TAIL_SAMPLES}:v{REFERENCE_VERSION}".encode()).hexdigest()[:20]
    return cache / "reference" / f"{key}.safetensors"


def dense_reference(model: torch.nn.Module, windows: torch.Tensor, batch_size: int, cache: Path | None,
                    model_key: str) -> Reference:
    """The dense model's reference on ``windows``: from this process's memory, the cache folder, or computed
    (one forward pass over the windows) and stored. ``model`` must be the dense model."""
    import time

    from bench.evaluate.perplexity import perplexity

    sha = windows_sha(windows)
    path = reference_path(cache, model_key, sha)
    memo_key = str(path) if path else None  # no cache (--no-cache): recomputed every time
    if memo_key in _MEMORY:
        return dataclasses.replace(_MEMORY[memo_key], source="memory", seconds=0.0, dense_eval=None)
    t0 = time.perf_counter()
    stored = _load(path, "cpu")
    names = ("logp", "ids", "tail_logp", "tail_ids")
    if stored is not None and set(names) <= set(stored) and len(stored["logp"]) == windows.shape[0] * (windows.shape[1] - 1):
        ref = Reference(*(stored[n] for n in names), sha, "disk", time.perf_counter() - t0)
    else:
        try:
            collect = _Collect()
            ppl = perplexity(model, windows, batch_size=batch_size, observe=collect)
            ref = collect.reference(sha, time.perf_counter() - t0, ppl)
            _store(path, ref.tensors(), ref.seconds)  # verified store; releases the claim _load took
        finally:
            _release(path)
    if memo_key is not None:
        _MEMORY[memo_key] = ref
    return ref
