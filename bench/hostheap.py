"""Keep freed host memory for reuse during compression and evaluation (Linux, glibc).

glibc's allocator serves every request above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps
it when freed. A CPU forward of a language model allocates and frees tensors of that size many times per step (one
512-token window's logits over SmolLM2's 49,152-token vocabulary are 100 MB in float32), so each step the kernel
maps, faults in and zeroes the same gigabyte again: about 310,000 page faults and 0.7 s of system time per
distillation step of SmolLM2-135M on 2 cores, a quarter of the step's wall time (``tests/test_hostheap.py`` has the benchmark).

:func:`reuse_freed_pages` turns that off for the duration of a phase: every allocation comes from the heap
(``M_MMAP_MAX`` 0) and freed memory stays in it (``M_TRIM_THRESHOLD`` at its largest, 2 GiB free at the heap's
top), so a step reuses the last step's pages. On leaving, ``malloc_trim(0)`` hands the free pages back to the kernel and the thresholds go back to
the values glibc's own dynamic threshold settles at in a process that frees large tensors (32 MiB, trim at 64 MiB),
so the next phase's peak memory starts from what is live, not from what the last phase left free. Results are
unchanged (only where the bytes come from); the peak resident memory of the phase is its working set as before.

Nothing happens where the C library is not glibc, or where the user steers the allocator (``MALLOC_*`` variables,
``GLIBC_TUNABLES``, ``LD_PRELOAD`` of another allocator) or sets ``SLIMBENCH_HOST_HEAP=system``.
:func:`policy` says which applies, for the record.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
#: what glibc's dynamic threshold reaches once a large block has been freed (DEFAULT_MMAP_THRESHOLD_MAX on 64 bits)
SETTLED_MMAP_THRESHOLD = 32 * 1024 * 1024
SETTLED_TRIM_THRESHOLD = 2 * SETTLED_MMAP_THRESHOLD
DEFAULT_MMAP_MAX = 65536
KEEP_ALL = 2**31 - 1  # the largest trim threshold mallopt's int argument takes
ENV_SWITCH = "SLIMBENCH_HOST_HEAP"

_lock = threading.Lock()
_depth = 0
_libc: ctypes.CDLL | None = None
_why_not: str | None = None


def _steered() -> str | None:
    """Why the user's own allocator settings win, or None."""
    if os.environ.get(ENV_SWITCH, "").lower() in ("system", "off", "0"):
        return f"{ENV_SWITCH}={os.environ[ENV_SWITCH]}"
    named = sorted(k for k in os.environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES")
    if named:
        return f"set by {', '.join(named)}"
    if os.environ.get("LD_PRELOAD"):
        return "LD_PRELOAD names another library"
    return None


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (has mallopt and malloc_trim), else None with the reason kept."""
    global _libc, _why_not
    if _libc is not None or _why_not is not None:
        return _libc
    _why_not = _steered()
    if _why_not is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            lib.mallopt.argtypes, lib.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            lib.malloc_trim.argtypes, lib.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
            if not hasattr(lib, "gnu_get_libc_version"):
                raise OSError("not glibc")
            _libc = lib
        except (OSError, AttributeError, TypeError):
            _why_not = "not glibc"
    return _libc


def policy() -> str:
    """What :func:`reuse_freed_pages` does in this process, for the record's environment."""
    lib = _glibc()
    if lib is None:
        return f"system default ({_why_not})"
    return "glibc: freed pages reused within compression and evaluation, trimmed after each"


@contextmanager
def reuse_freed_pages() -> Iterator[None]:
    """Within the block, freed host memory is kept for reuse instead of unmapped; nested blocks share one setting."""
    global _depth
    lib = _glibc()
    if lib is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            lib.mallopt(M_MMAP_MAX, 0)
            lib.mallopt(M_TRIM_THRESHOLD, KEEP_ALL)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                lib.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                lib.mallopt(M_MMAP_THRESHOLD, SETTLED_MMAP_THRESHOLD)
                lib.mallopt(M_TRIM_THRESHOLD, SETTLED_TRIM_THRESHOLD)
                lib.malloc_trim(0)
