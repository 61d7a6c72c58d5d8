"""How far a compressed model has moved from its dense model on the perplexity windows.

Per predicted position: KL(P_dense || Q) of the next-token distributions, and whether both models' top-1
tokens agree. Both are paired by construction (same windows, same positions) and far less noisy than
accuracy. The dense side is a ``Reference``, computed once per model and windows and kept in the cache.

Storage: the dense model's top-k log-probabilities and their token ids per position (k = 64, float32 and
int32: 512 bytes a position, whatever the vocabulary; 4.2 MB for 16 x 511 positions). The rest of the
distribution is one bucket of mass r = 1 - sum of the top-k probabilities, so the KL computed is that of the
two distributions coarse-grained to (top-k tokens, the rest): a lower bound of the true KL (log-sum
inequality), exact when r = 0, short by r * KL(dense tail | compressed tail) otherwise.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.calibration import _load, _store

TOPK = 64
REFERENCE_VERSION = 1
_MEMORY: dict[str, Reference] = {}  # key -> reference already loaded or computed in this process


@dataclass
class Reference:
    """The dense model's top-k next-token log-probs for every predicted position of the windows, in order."""

    logp: torch.Tensor  # [positions, k] float32, sorted descending
    ids: torch.Tensor  # [positions, k] int32
    windows_sha: str
    source: str = "computed"  # computed, memory or disk: how this run got it
    seconds: float = 0.0

    def slice(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logp[start:stop], self.ids[start:stop].long()


def windows_sha(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def topk_logp(logits: torch.Tensor, k: int = TOPK) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k log-probs (descending) and ids of each row of ``logits`` [..., V]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return values, ids.to(torch.int32)


def kl_and_top1(ref_logp: torch.Tensor, ref_ids: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: KL(dense || model) over (top-k tokens, the rest) and whether the top-1 tokens agree."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    lq = logq.gather(-1, ref_ids.long()).double()
    lp = ref_logp.double()
    p = lp.exp()
    kl = (p * (lp - lq)).sum(-1)
    rest_p = (1 - p.sum(-1)).clamp_min(0)
    rest_q = (1 - lq.exp().sum(-1)).clamp_min(1e-300)
    tail = torch.where(rest_p > 0, rest_p * (rest_p.clamp_min(1e-300).log() - rest_q.log()), torch.zeros_like(rest_p))
    agree = logq.argmax(-1) == ref_ids[..., 0].long()
    return (kl + tail).clamp_min(0).float(), agree


class Tracker:
    """Fed each perplexity batch's logits in window order; summarises KL and top-1 agreement at the end."""

    def __init__(self, reference: Reference) -> None:
        self.ref = reference
        self.pos = 0
        self.kl: list[torch.Tensor] = []
        self.agree: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor, batch: torch.Tensor) -> None:
        pred = logits[:, :-1].reshape(-1, logits.shape[-1])
        logp, ids = self.ref.slice(self.pos, self.pos + len(pred))
        kl, agree = kl_and_top1(logp.to(pred.device), ids.to(pred.device), pred)
        self.kl.append(kl.cpu())
        self.agree.append(agree.cpu())
        self.pos += len(pred)

    def summary(self) -> dict:
        kl, agree = torch.cat(self.kl), torch.cat(self.agree)
        finite = torch.isfinite(kl)
        return {"kl_mean": float(kl.double().mean()), "kl_p99": float(torch.quantile(kl[finite].double(), 0.99))
                if finite.any() else float("nan"), "top1_agreement": float(agree.double().mean()),
                "positions": len(kl), "topk": self.ref.logp.shape[-1],
                "kl_note": "KL(dense || model) over the dense top-k tokens plus one bucket for the rest: a lower "
                           "bound, exact when the top-k hold all the mass",
                "reference": {"source": self.ref.source, "seconds": self.ref.seconds,
                              "windows_sha": self.ref.windows_sha}}


@dataclass
class _Collect:
    logp: list[torch.Tensor] = field(default_factory=list)
    ids: list[torch.Tensor] = field(default_factory=list)

    def __call__(self, logits: torch.Tensor, batch: torch.Tensor) -> None:
        values, ids = topk_logp(logits[:, :-1].reshape(-1, logits.shape[-1]))
        self.logp.append(values.cpu())
        self.ids.append(ids.cpu())


def reference_path(cache: Path | None, model_key: str, sha: str) -> Path | None:
    """Where the reference of a model (``model_key``) on windows ``sha`` is stored; None without a cache."""
    if cache is None:
        return None
    key = hashlib.sha256(f"{model_key}:{sha}:top{TOPK}:v{REFERENCE_VERSION}".encode()).hexdigest()[:20]
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
        ref = _MEMORY[memo_key]
        return Reference(ref.logp, ref.ids, sha, "memory", 0.0)
    t0 = time.perf_counter()
    stored = _load(path, "cpu")
    if stored is not None and stored["logp"].shape[0] == windows.shape[0] * (windows.shape[1] - 1):
        ref = Reference(stored["logp"], stored["ids"], sha, "disk", time.perf_counter() - t0)
    else:
        collect = _Collect()
        perplexity(model, windows, batch_size=batch_size, observe=collect)
        ref = Reference(torch.cat(collect.logp), torch.cat(collect.ids), sha, "computed", time.perf_counter() - t0)
        _store(path, {"logp": ref.logp, "ids": ref.ids})
    if memo_key is not None:
        _MEMORY[memo_key] = ref
    return ref
