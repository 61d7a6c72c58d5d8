"""Efficiency measurements: peak memory, prefill latency, decode throughput, weight size."""

from __future__ import annotations

import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from bench.errors import UserError
from bench.models import kv_cache_kwarg, returned_kv_cache

STATM = Path("/proc/self/statm")
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
#: the kernel keeps one high-water mark per process: only one PeakMemory at a time may reset and read it
_HWM_LOCK = threading.Lock()
_hwm_holder: PeakMemory | None = None


def _rss_bytes() -> int:
    """Current resident set size of this process, or the peak so far where /proc is missing."""
    try:
        return int(STATM.read_text().split()[1]) * PAGE_SIZE
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _hwm_bytes() -> int | None:
    """The kernel's peak resident set size of this process (VmHWM), or None where /proc does not give it."""
    try:
        line = next(x for x in STATUS.read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def _reset_hwm() -> bool:
    """Lower VmHWM to the current RSS ("5" to clear_refs, Linux 4.0+); False where that is not permitted."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _hwm_bytes() is not None


class PeakMemory:
    """Context manager measuring the block's peak device memory and peak host memory (process RSS) at once.

    Device: the CUDA allocator's peak; on CPU the device is host memory, so the device peak is the host peak.
    Host: exact where Linux lets the process reset its RSS high-water mark (VmHWM), else RSS sampled every
    ``interval_s``. ``peak_bytes`` and ``source`` are the device peak and how it was measured.
    """

    def __init__(self, device: torch.device | str | None = None, interval_s: float = 0.005) -> None:
        self.device = torch.device(device) if device is not None else None
        self.interval_s = interval_s
        self.device_peak_bytes = 0
        self.host_peak_bytes = 0
        self.device_source = ""
        self.host_source = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def peak_bytes(self) -> int:
        return self.device_peak_bytes

    @property
    def source(self) -> str:
        """How ``peak_bytes`` was measured (the host's method on CPU, as before device and host were separate)."""
        return self.device_source if self._cuda else self.host_source

    @property
    def _cuda(self) -> bool:
        if self.device is not None:
            return self.device.type == "cuda"
        return torch.cuda.is_available()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.host_peak_bytes = max(self.host_peak_bytes, _rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        global _hwm_holder
        if self._cuda:
            self.device_source = "cuda_max_allocated"
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.device_source = "cpu: device is host memory"
        with _HWM_LOCK:  # a block inside another one samples, so the outer block's high-water mark stays whole
            if _hwm_holder is None and _reset_hwm():
                _hwm_holder = self
        if _hwm_holder is self:
            self.host_source = "process_rss_vmhwm"
        else:
            self.host_source = "process_rss_sampled"
            self.host_peak_bytes = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        global _hwm_holder
        if self._cuda:
            torch.cuda.synchronize(self.device)
            self.device_peak_bytes = torch.cuda.max_memory_allocated(self.device)
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.host_peak_bytes = max(self.host_peak_bytes, _rss_bytes())
        else:
            with _HWM_LOCK:
                self.host_peak_bytes = _hwm_bytes() or _rss_bytes()
                _hwm_holder = None
        if not self._cuda:
            self.device_peak_bytes = self.host_peak_bytes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency(
    model: torch.nn.Module,
    tokenizer_or_vocab_size: Any,
    prompt_len: int = 128,
    new_tokens: int = 32,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
) -> dict:
    """Median prefill time of 1 x prompt_len random tokens, and greedy decode speed with the KV cache.

    Decoding is a manual loop over the returned KV cache (not `generate`), so it works for any causal
    LM and never stops early at EOS; its time excludes the prefill that builds the cache.
    """
    if prompt_len < 1 or new_tokens < 1 or repeats < 1 or warmup < 0:
        raise UserError(
            f"latency needs prompt_len, new_tokens, repeats >= 1 and warmup >= 0, got "
            f"{prompt_len}, {new_tokens}, {repeats}, {warmup}"
        )
    vocab = (
        tokenizer_or_vocab_size if isinstance(tokenizer_or_vocab_size, int) else len(tokenizer_or_vocab_size)
    )
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=gen).to(device)
    was_training = model.training
    model.eval()
    prefill_s, decode_s = [], []
    cache_kw = kv_cache_kwarg(model)
    with torch.inference_mode():
        for i in range(warmup + repeats):
            _sync(device)
            t0 = time.perf_counter()
            model(input_ids=prompt, use_cache=False)
            _sync(device)
            t1 = time.perf_counter()
            out = model(input_ids=prompt, use_cache=True)
            past, token = returned_kv_cache(out), out.logits[:, -1:].argmax(-1)
            _sync(device)
            t2 = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=token, use_cache=True, **{cache_kw: past})
                past, token = returned_kv_cache(out), out.logits[:, -1:].argmax(-1)
            _sync(device)
            t3 = time.perf_counter()
            if i >= warmup:
                prefill_s.append(t1 - t0)
                decode_s.append(t3 - t2)
    model.train(was_training)
    return {
        **_host_load(device),
        "prefill_ms": statistics.median(prefill_s) * 1e3,
        "decode_tokens_per_s": new_tokens / statistics.median(decode_s),
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "warmup": warmup,
        "device": str(device),
    }


def _host_load(device: torch.device) -> dict:
    """The host's 1-minute load average and usable cores when a CPU measurement ends (other work slows it)."""
    if device.type != "cpu" or not hasattr(os, "getloadavg"):
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"load_average": os.getloadavg()[0], "cpu_count": cores}


#: slowest over fastest repeat beyond which a latency figure is not compared (stored runs agree within 1.45x)
SPREAD_LIMIT = 1.5
#: a CPU measurement whose host load average exceeded this many times its cores ran beside other work
LOAD_LIMIT = 1.5


def latency_doubt(detail: dict | None) -> str | None:
    """Why a latency measurement should not be compared with others, or None: its repeats disagree, or (on CPU)
    the host ran other work beside it. Only the record's figures are read, so old records are judged too."""
    if not detail:
        return None
    reasons = []
    for name in ("prefill", "decode"):
        xs = [x for x in detail.get(f"{name}_s") or [] if x > 0]
        if len(xs) > 1 and max(xs) / min(xs) > SPREAD_LIMIT:
            reasons.append(f"{name} repeats {max(xs) / min(xs):.1f}x apart")
    load, cores = detail.get("load_average"), detail.get("cpu_count")
    if load is not None and cores and load > LOAD_LIMIT * cores:
        reasons.append(f"load average {load:.1f} on {cores} cores")
    return "; ".join(reasons) or None


def other_hardware(environment: dict, reference: dict, reference_name: str = "the dense record") -> str | None:
    """Why a record's speed and memory cannot stand beside a reference record's (called ``reference_name`` in the
    reason): they ran on different hardware (another device type, or both devices named and the names differ), or
    None. An unnamed device is not taken as different: records from before names were kept are judged by their
    device type alone."""
    mine, theirs = environment.get("hardware") or {}, reference.get("hardware") or {}
    kind, ref_kind = mine.get("device"), theirs.get("device")
    name, ref_name = mine.get("device_name"), theirs.get("device_name")
    if (kind and ref_kind and kind != ref_kind) or (name and ref_name and name != ref_name):
        return f"measured on {name or kind}, {reference_name} on {ref_name or ref_kind}"
    return None


def weight_stats(model: torch.nn.Module) -> dict:
    """Unique parameter count and bytes of all distinct parameter and buffer storages (tied counted once)."""
    seen_params: set[int] = set()
    seen_all: set[int] = set()
    unique_params = 0
    weight_bytes = 0
    for is_param, tensors in ((True, model.parameters()), (False, model.buffers())):
        for t in tensors:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if is_param and ptr not in seen_params:
                seen_params.add(ptr)
                unique_params += t.numel()
            if ptr not in seen_all:
                seen_all.add(ptr)
                weight_bytes += storage.nbytes()
    return {"unique_params": unique_params, "weight_bytes": weight_bytes}


def dir_size(path: str | Path) -> int:
    """Total bytes of all files under a folder."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
