"""Perplexity of a causal LM over fixed token windows (the same windows for every method)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from bench.errors import UserError


def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
    observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> dict:
    """exp(mean next-token NLL) over `windows` [n, L]; each window scores its tokens 1..L-1.

    Returns `perplexity`, `nll` (mean per predicted token, nats), `tokens`, `windows` and `window_nll` (each
    window's mean NLL, in window order: two models scored on the same windows pair by window). A
    model that produces NaN or inf logits yields NaN or inf rather than an exception.
    `progress(k)` is called after each batch with the number of windows just scored; `observe(logp, batch)`
    sees each batch's next-token log-probabilities (float32, log-softmax of the logits, computed once for both)
    in window order: closeness to the dense model rides on this same forward.
    """
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise UserError(f"perplexity needs windows of shape [n >= 1, L >= 2], got {tuple(windows.shape)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_window: list[torch.Tensor] = []
    try:
        with torch.inference_mode():
            for start in range(0, len(windows), batch_size):
                batch = windows[start : start + batch_size].to(device)
                logp = torch.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), dim=-1)
                if observe is not None:
                    observe(logp, batch)
                token_nll = -logp[:, :-1].gather(-1, batch[:, 1:, None]).squeeze(-1)
                per_window.append(token_nll.double().sum(-1).cpu())
                if progress is not None:
                    progress(len(batch))
    finally:
        model.train(was_training)
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    sums = torch.cat(per_window)
    mean_nll = sums.sum().item() / tokens
    return {
        "perplexity": _safe_exp(mean_nll),
        "nll": mean_nll,
        "tokens": tokens,
        "windows": int(windows.shape[0]),
        "window_nll": (sums / (windows.shape[1] - 1)).tolist(),
    }


def _safe_exp(x: float) -> float:
    """exp that returns inf on overflow and NaN for NaN."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
