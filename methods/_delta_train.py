"""DeltaLLM training: KL distillation from the dense model with progressive module replacement (PMR).

Each step draws, for every block that compression changed, whether the student uses its compressed version
(probability p(t)) or the teacher's original block; p(t) rises linearly from ``pmr_start`` to 1 over the first
``pmr_warmup`` of the steps and stays 1, so the last steps train the fully compressed model. Blocks that
compression left alone are the same in both, so they are never swapped. The loss is

    L = T^2 * mean over tokens of sum_v p_teacher(v) (log p_teacher(v) - log p_student(v)),  p = softmax(logits / T),

with no hidden-state term. Only the parameters handed in train (by default the deltas A, B); AdamW, no weight
decay (it would pull every follower towards its base), gradient norm clipped at 1, the learning rate constant or
warmed up and decayed (``lr_factor``). The optimiser always works on
float32 weights: a trained parameter stored in bf16 (a model loaded in bfloat16, the default on CUDA) gets a float32
master copy that takes its gradients and AdamW's steps and is rounded back into it after each step. Stepping the bf16
weight itself would drop every update smaller than half its rounding step (about 0.2 % of its size), so a small
learning rate would train nothing.

A step takes ``batch_size`` rows; with ``micro_batch`` it runs them in slices of that many rows and accumulates the
gradients (each slice's loss weighted by its share of the rows, so the step's loss and gradient are the full
batch's). With ``autocast`` (bf16; ``delta.autocast=auto`` asks for it on CUDA only) the forwards run under autocast;
the KL is always taken in float32.
``measure`` (with ``curve_at``) pauses training at those token counts to measure the model as it stands, every
block compressed; that time is left out of tokens/s.

With ``state_path`` the run saves its whole state every ``save_every`` seconds (trained weights and their float32
masters, AdamW's moments and step counts, the PMR generator, the step, and the log so far: losses, p(t), curve
points, training seconds) to one verified safetensors file, and a run handed the same path starts from that state
instead of step 0. On the same hardware a resumed run takes exactly the steps an uninterrupted one takes. The caller
names the file by everything that decides the training, so a state is only ever read back into the run that wrote
it; the file also holds that name and is checked against it. When training ends the finished state is saved once
more and kept: a run killed after training (while the trained model is measured or evaluated, minutes on a large
suite) then resumes with nothing left to train. Whoever is done with the trained model removes the file (DeltaLLM
hands it to the harness, which removes it once the cell's record is on disk).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench import integrity
from bench.calibration import model_device


@dataclass
class TrainConfig:
    """What one distillation run does."""

    tokens: int
    batch_size: int = 1
    lr: float = 1e-3
    #: "constant", or "cosine" / "linear" decay of the learning rate to 0 at the last step
    lr_schedule: str = "constant"
    #: fraction of the steps over which the learning rate rises linearly from 0 (before any decay)
    lr_warmup: float = 0.0
    temperature: float = 1.0
    pmr_start: float = 0.1
    pmr_warmup: float = 0.5
    seed: int = 0
    max_grad_norm: float = 1.0
    #: rows per forward (gradients accumulate over a step's slices); 0 = the whole batch at once
    micro_batch: int = 0
    #: autocast dtype of the forwards on CUDA (torch.bfloat16), or None for none
    autocast: torch.dtype | None = None
    #: token counts at which ``measure`` is called during training (0 and counts past the budget are ignored)
    curve_at: tuple[int, ...] = ()
    #: where the training state is saved and resumed from (None: never saved)
    state_path: Path | None = None
    #: what the state file must say it belongs to (the caller's key of everything that decides the training)
    state_key: str = ""
    #: seconds of training between two saves of the state (<= 0: never saved)
    save_every: float = 600.0


def training_bytes(adapter, rows: int, seq_len: int, elem: int) -> int:
    """About what one forward and backward of the distillation holds beyond the two models (bytes), for ``rows`` x
    ``seq_len`` tokens a forward: per block the activations kept for the backward (about 12 hidden-wide and 4
    intermediate-wide tensors a token, in the model's dtype), and the logits of both models with their float32
    log-softmaxes and gradient (5 float32 vocabulary-wide tensors a token)."""
    hidden = adapter.embeddings().weight.shape[1]
    vocab = adapter.lm_head().weight.shape[0]
    widest = max(max(adapter.linear(0, k).in_features, adapter.linear(0, k).out_features) for k in adapter.kinds())
    tokens = rows * seq_len
    return tokens * ((12 * hidden + 4 * widest) * elem * adapter.num_blocks + 5 * vocab * 4)


def optimizer_bytes(trained: int, elem: int) -> int:
    """What training ``trained`` parameters stored with ``elem`` bytes each adds (bytes): their gradient and AdamW's
    two float32 moments, plus a float32 master copy and its gradient when they are not float32 themselves."""
    master = 0 if elem >= 4 else 4 + 4
    return trained * (elem + master + 8)


def replace_probability(step: int, steps: int, start: float, warmup: float) -> float:
    """p(t): linear from ``start`` at step 0 to 1 at step ``warmup * steps``, then 1."""
    ramp = warmup * steps
    if ramp <= 0 or step >= ramp:
        return 1.0
    return start + (1.0 - start) * step / ramp


LR_SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(step: int, steps: int, schedule: str, warmup: float) -> float:
    """The learning rate of step ``step`` (0-based) of ``steps`` as a fraction of the peak: a linear rise over the
    first ``warmup * steps`` steps (step 0 already takes a 1/n share, so no step is wasted), then ``schedule``:
    constant, or a cosine or linear decay that reaches 0 after the last step."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; one of {LR_SCHEDULES}")
    ramp = int(round(warmup * steps))
    if step < ramp:
        return (step + 1) / ramp
    if schedule == "constant":
        return 1.0
    done = (step - ramp) / max(steps - ramp, 1)  # 0 at the first step after the warm-up, < 1 at the last
    return 0.5 * (1.0 + math.cos(math.pi * done)) if schedule == "cosine" else 1.0 - done


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(teacher || student) of the next-token distributions, averaged over tokens (float32)."""
    s = F.log_softmax(student.float() / temperature, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


@contextmanager
def hybrid(adapter, teacher_blocks: nn.ModuleList, from_teacher: list[int]) -> Iterator[None]:
    """Run the student with the teacher's original blocks at positions ``from_teacher``."""
    blocks = adapter.blocks()
    own = {i: blocks[i] for i in from_teacher}
    try:
        for i in from_teacher:
            blocks[i] = teacher_blocks[i]
        yield
    finally:
        for i, block in own.items():
            blocks[i] = block


@torch.no_grad()
def eval_kl(model: nn.Module, teacher: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Mean per-token KL(teacher || model) at temperature 1 over ``windows``."""
    device = model_device(model)
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size].to(device)
        loss = distill_kl(model(input_ids=ids, use_cache=False).logits, teacher(input_ids=ids, use_cache=False).logits)
        total, count = total + loss.item() * ids.numel(), count + ids.numel()
    return total / max(count, 1)


def autocast_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype the forwards actually autocast to: ``dtype`` on CUDA or CPU, None elsewhere or without one."""
    return dtype if device.type in ("cuda", "cpu") else None


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device`` (see :func:`autocast_dtype`; a no-op when that is None)."""
    dtype = autocast_dtype(device, dtype)
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


REPORT_EVERY = 30.0  # seconds between progress reports


def progress_line(tokens: int, total: int, seconds: float, loss: float) -> str:
    """``training 123,456 / 1,000,000 tokens (12 %), 203 tokens/s, ~1:11:58 left, loss 1.234``."""
    rate = tokens / seconds if seconds > 0 else 0.0
    left = int((total - tokens) / rate) if rate > 0 else 0
    eta = f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
    return (f"training {tokens:,} / {total:,} tokens ({100 * tokens / max(total, 1):.0f} %), {rate:,.0f} tokens/s, "
            f"~{eta} left, loss {loss:.3f}")


def train(model: nn.Module, adapter, teacher: nn.Module, windows: torch.Tensor, params: list[nn.Parameter],
          changed: list[int], cfg: TrainConfig, measure: Callable[[], dict] | None = None,
          report: Callable[[str], None] | None = None) -> dict:
    """Distil ``params`` of ``model`` from ``teacher`` on ``windows`` (cycled) with PMR over the ``changed`` blocks.

    ``report`` receives a progress line (:func:`progress_line`) every ``REPORT_EVERY`` seconds.
    Returns the log: steps, tokens trained on, seconds, tokens/s, and the loss and p(t) of every step; with
    ``measure``, ``points``: ``measure()``'s dict plus tokens and training seconds at each of ``cfg.curve_at``.
    """
    model.eval()  # no dropout: the student must be the model that is evaluated
    device = model_device(model)
    teacher_blocks = type(adapter)(teacher).blocks()
    per_step = cfg.batch_size * windows.shape[1]
    steps = max(1, math.ceil(cfg.tokens / per_step))
    gen = torch.Generator().manual_seed(cfg.seed)
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    # float32 masters for parameters stored in a narrower dtype (see the module's docstring)
    copies = [(p, p.detach().float().requires_grad_(True)) for p in params if p.dtype != torch.float32]
    master = {id(p): m for p, m in copies}
    weights = [master.get(id(p), p) for p in params]
    opt = torch.optim.AdamW(weights, lr=cfg.lr, weight_decay=0.0)
    losses, probs, tokens, points = [], [], 0, []
    first, before, resumed = 0, 0.0, []  # where a resumed run starts, its training seconds so far, its resumes
    saving = cfg.state_path is not None and cfg.save_every > 0
    if saving:
        state = load_state(cfg.state_path, cfg.state_key, weights, opt, gen, steps)
        if state is not None:
            first, tokens, before = state["step"], state["tokens"], state["seconds"]
            losses, probs, points, resumed = state["losses"], state["probs"], state["points"], state["resumed"]
            resumed.append({"step": first, "tokens": tokens, "seconds": round(before, 3)})
            with torch.no_grad():
                for param, copy in copies:
                    param.copy_(copy)
            if report is not None:
                report(f"training already complete ({tokens:,} tokens), its state read back from {cfg.state_path}"
                       if first == steps else f"resuming training at {tokens:,} tokens from {cfg.state_path}")
    pending = sorted({t for t in cfg.curve_at if tokens < t}) if measure is not None else []
    micro = cfg.micro_batch if 0 < cfg.micro_batch < cfg.batch_size else cfg.batch_size
    amp = autocast_context(device, cfg.autocast)
    paused = 0.0  # seconds spent measuring the curve, not training
    start = last_report = last_save = time.perf_counter()
    total = steps * per_step
    saves = 0
    try:
        with torch.enable_grad():
            for step in range(first, steps):
                p = replace_probability(step, steps, cfg.pmr_start, cfg.pmr_warmup)
                replaced = [b for b, u in zip(changed, torch.rand(len(changed), generator=gen).tolist(), strict=True)
                            if u < p]
                if not replaced and changed:  # a step with no compressed block would train nothing
                    replaced = [changed[int(torch.randint(len(changed), (1,), generator=gen))]]
                rows = [(step * cfg.batch_size + j) % windows.shape[0] for j in range(cfg.batch_size)]
                ids = windows[rows].to(device)
                opt.zero_grad(set_to_none=True)
                loss = 0.0
                for part in ids.split(micro):
                    with torch.no_grad(), amp:
                        target = teacher(input_ids=part, use_cache=False).logits
                    with hybrid(adapter, teacher_blocks, [b for b in changed if b not in replaced]), amp:
                        logits = model(input_ids=part, use_cache=False).logits
                    part_loss = distill_kl(logits, target, cfg.temperature)
                    if micro < cfg.batch_size:
                        part_loss = part_loss * (part.shape[0] / ids.shape[0])
                    part_loss.backward()
                    loss += part_loss.item()
                    _to_masters(copies)  # each slice's gradient summed in float32, not in the parameter's dtype
                torch.nn.utils.clip_grad_norm_(weights, cfg.max_grad_norm)
                for group in opt.param_groups:  # set from the step alone, so a resumed run takes the same rates
                    group["lr"] = cfg.lr * lr_factor(step, steps, cfg.lr_schedule, cfg.lr_warmup)
                opt.step()
                with torch.no_grad():
                    for param, copy in copies:
                        param.copy_(copy)
                losses.append(loss)
                probs.append(p)
                tokens += ids.numel()
                while pending and tokens >= pending[0]:
                    pending.pop(0)
                    t0 = time.perf_counter()
                    point = {"tokens": tokens, "seconds": before + t0 - start - paused, **measure()}
                    points.append(point)
                    paused += time.perf_counter() - t0
                if report is not None and time.perf_counter() - last_report >= REPORT_EVERY:
                    last_report = time.perf_counter()
                    report(progress_line(tokens, total, before + last_report - start - paused, loss))
                if saving and step + 1 < steps and time.perf_counter() - last_save >= cfg.save_every:
                    log_so_far = {"step": step + 1, "tokens": tokens, "losses": losses, "probs": probs,
                                  "points": points, "resumed": resumed,
                                  "seconds": before + time.perf_counter() - start - paused}
                    saves += save_state(cfg.state_path, cfg.state_key, weights, opt, gen, log_so_far)
                    last_save = time.perf_counter()
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    seconds = before + (time.perf_counter() - start - paused if first < steps else 0.0)
    if saving and first < steps:  # the finished state, kept until the caller is done with the trained model
        saves += save_state(cfg.state_path, cfg.state_key, weights, opt, gen,
                            {"step": steps, "tokens": tokens, "losses": losses, "probs": probs, "points": points,
                             "resumed": resumed, "seconds": seconds})
    log = {"steps": steps, "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
           "batch_windows": cfg.batch_size, "micro_batch": micro, "seq_len": int(windows.shape[1]), "lr": cfg.lr,
           "lr_schedule": {"shape": cfg.lr_schedule, "warmup": cfg.lr_warmup},
           "autocast": str(autocast_dtype(device, cfg.autocast) or "off").replace("torch.", ""),
           "param_dtype": str(params[0].dtype).replace("torch.", "") if params else None,
           "master_copies": len(copies), "state_saves": saves, "resumed": resumed,
           "temperature": cfg.temperature, "pmr": {"start": cfg.pmr_start, "warmup": cfg.pmr_warmup},
           "loss_first": losses[0], "loss_last": losses[-1], "curve": curve(losses, probs)}
    if measure is not None:
        log["points"] = points
    return log


STATE_VERSION = 1


def save_state(path: Path, key: str, weights: list[torch.Tensor], opt: torch.optim.Optimizer, gen: torch.Generator,
               log: dict) -> bool:
    """Write the training state (see the module's docstring) atomically; False when the disk refuses."""
    tensors = {"generator": gen.get_state()}
    for i, w in enumerate(weights):
        tensors[f"weight.{i}"] = w.detach()
        for name, value in opt.state.get(w, {}).items():
            tensors[f"adam.{i}.{name}"] = value if torch.is_tensor(value) else torch.tensor(float(value))
    meta = {"version": STATE_VERSION, "key": key, **log}
    tensors["log"] = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)  # under the digest
    return integrity.save_tensors(path, tensors)


def load_state(path: Path, key: str, weights: list[torch.Tensor], opt: torch.optim.Optimizer, gen: torch.Generator,
               steps: int) -> dict | None:
    """Put a saved state back into ``weights``, ``opt`` and ``gen``; its log, or None when there is none to use.

    A file that fails its digest is quarantined by :func:`bench.integrity.load_tensors`; one that is whole but not
    this run's (another key, version or shape) is quarantined here, so a stale state is never trained on."""
    tensors = integrity.load_tensors(path)
    if tensors is None:
        return None
    try:
        log = json.loads(bytes(tensors.pop("log").tolist()).decode())
    except (KeyError, ValueError):
        integrity.quarantine(path, "no readable training log in it")
        return None
    shapes = [tuple(tensors.get(f"weight.{i}", torch.empty(0)).shape) for i in range(len(weights))]
    why = ("another state version" if log.get("version") != STATE_VERSION else
           "another run's state (key mismatch)" if log.get("key") != key else
           "other weight shapes" if shapes != [tuple(w.shape) for w in weights] else
           "a step beyond this run's" if not 0 < log.get("step", 0) <= steps else "")
    if why:
        integrity.quarantine(path, why)
        return None
    with torch.no_grad():
        for i, w in enumerate(weights):
            w.copy_(tensors[f"weight.{i}"])
    state = {}
    for i, w in enumerate(weights):
        entry = {name.split(".", 2)[2]: value.to(w.device) for name, value in tensors.items()
                 if name.startswith(f"adam.{i}.")}
        if entry:
            state[i] = entry
    saved = opt.state_dict()
    opt.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    gen.set_state(tensors["generator"])
    return log


def _to_masters(copies: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    """Add each parameter's gradient, in float32, to its master copy's, and clear the parameter's."""
    for p, m in copies:
        if p.grad is not None:
            g = p.grad.float()
            m.grad = g if m.grad is None else m.grad.add_(g)
            p.grad = None


def curve(losses: list[float], probs: list[float], points: int = 50) -> list[list[float]]:
    """[step, p(t), loss] at up to ``points`` evenly spaced steps, the last step included."""
    n, k = len(losses), min(points, len(losses))
    picks = sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})
    return [[i, probs[i], losses[i]] for i in picks]
