"""Content digests and verified cache files: nothing read back from a cache is trusted without a check.

* :func:`weights_digest` names a model by the bytes of its weight and config files (hashed once, then
  remembered by path, size, mtime and inode in ``<cache>/digests.json``), so replaced weights get new
  record and statistics keys even when the file name and size stay the same.
* :func:`save_tensors` / :func:`load_tensors` store safetensors files whose header carries a SHA-256 of
  the tensor bytes; a file that fails the check is moved aside (:func:`quarantine`), reported in one line
  and treated as a miss, so the statistic is recomputed.
* :func:`write_manifest` / :func:`verify_manifest` do the same for a folder (the dequantised GGUF model).

What was repaired is kept in :data:`NOTICES` until the runner copies it into the records it writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from bench.records import UMASK as _UMASK  # a name of this module, so a test can set it

CHUNK = 8 * 2**20
DIGEST_KEY = "slimbench_sha256"
MANIFEST = ".slimbench-manifest.json"
#: one line per cache file that failed verification in this process (drained into records)
NOTICES: list[str] = []
_verified: dict[tuple, str] = {}  # (path, size, mtime_ns, inode) -> digest, for this process


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino


def _memo_file(cache: Path | None) -> Path | None:
    return None if cache is None else Path(cache) / "digests.json"


def _read_memo(memo: Path | None) -> dict:
    if memo is None:
        return {}
    try:
        data = json.loads(memo.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_memo(memo: Path | None, data: dict) -> None:
    if memo is None:
        return
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
        os.replace(tmp, memo)
    except OSError:  # a read-only cache only costs re-hashing next time
        pass


def cached_file_digest(path: Path, cache: Path | None = None) -> str:
    """SHA-256 of ``path``, hashed once per (path, size, mtime, inode) and remembered in ``cache``."""
    stamp = _stamp(path)
    if stamp in _verified:
        return _verified[stamp]
    memo_path = _memo_file(cache)
    memo = _read_memo(memo_path)
    key = "|".join(map(str, stamp))
    digest = memo.get(key)
    if not isinstance(digest, str):
        digest = file_sha256(path)
        memo[key] = digest
        _write_memo(memo_path, memo)
    _verified[stamp] = digest
    return digest


#: files of a model folder whose bytes decide its outputs
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin")
CONFIG_FILES = ("config.json", "generation_config.json", "slimbench.json", "tokenizer.json", "tokenizer.model")


def weights_digest(path: str | os.PathLike | None, cache: Path | None = None) -> str:
    """One digest over a model's weight and config files (a file: its own bytes); "" for a hub id."""
    if not path:
        return ""
    p = Path(path)
    if p.is_file():
        return cached_file_digest(p, cache)
    if not p.is_dir():
        return ""
    files = sorted(f for f in p.iterdir() if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name in CONFIG_FILES))
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{cached_file_digest(f, cache)}\n".encode())
    return h.hexdigest()


def quarantine(path: Path, why: str) -> Path | None:
    """Move a bad cache file or folder aside (never delete evidence), say so in one line, return where it went."""
    target = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    try:
        os.replace(path, target)
    except OSError:
        target = None
    line = f"cache {path} failed verification ({why}); moved to {target or '(could not move)'} and recomputed"
    NOTICES.append(line)
    print(f"warning: {line}", file=sys.stderr)
    return target


def drain() -> list[str]:
    """The notices since the last call (what the next record should say about repaired caches)."""
    out = list(NOTICES)
    NOTICES.clear()
    return out


def as_user_writes(path: Path) -> None:
    """Give ``path`` (a file, or a folder and the files in it) the mode the user's umask gives any file they write.

    safetensors writes 0600 and mkdtemp makes 0700 whatever the umask, so without this a cache shared by a team
    (one folder, several users) holds files the others cannot read, which their runs take for damaged entries and
    move aside."""
    files = [path] if path.is_file() else [path, *(f for f in path.iterdir() if f.is_file())]
    for f in files:
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~_UMASK)


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> bool:
    """Write a verified safetensors file atomically; False when the disk refuses (the run goes on)."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(cpu, str(tmp), metadata={DIGEST_KEY: tensors_sha256(cpu)})
        as_user_writes(tmp)
        os.replace(tmp, path)
        return True
    except OSError:
        tmp.unlink(missing_ok=True)
        return False


def load_tensors(path: Path | None, device: str | torch.device = "cpu") -> dict[str, torch.Tensor] | None:
    """A verified safetensors file, or None when absent; a damaged one is quarantined and None returned."""
    if path is None or not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            expected = (f.metadata() or {}).get(DIGEST_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a damaged cache entry
        quarantine(path, f"unreadable: {type(err).__name__}")
        return None
    if expected is None:
        quarantine(path, "no digest recorded with it")
        return None
    if tensors_sha256(tensors) != expected:
        quarantine(path, "content digest mismatch")
        return None
    return {k: v.to(device) for k, v in tensors.items()}


def write_manifest(folder: Path) -> None:
    """Record the SHA-256 of every file in ``folder`` (written last, inside the folder)."""
    files = {f.name: file_sha256(f) for f in sorted(folder.iterdir()) if f.is_file() and f.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"sha256": files}, indent=1, sort_keys=True))


def verify_manifest(folder: Path) -> str | None:
    """None when every file matches the manifest written with it; else why not (once per file version)."""
    try:
        listed = json.loads((folder / MANIFEST).read_text())["sha256"]
        if not isinstance(listed, dict):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable manifest"
    for name, digest in listed.items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        stamp = _stamp(f)
        if _verified.get(stamp) == digest:
            continue
        if file_sha256(f) != digest:
            return f"{name} does not match its digest"
        _verified[stamp] = digest
    return None


def safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor table of a safetensors file, checked against the file's length without reading the data.

    Raises ValueError naming what is wrong (truncated, not safetensors, offsets outside the file).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if n <= 0 or n > min(size - 8, 100 * 2**20):
            raise ValueError("not a safetensors file (bad header length)")
        try:
            table = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise ValueError("not a safetensors file (unreadable header)") from None
    if not isinstance(table, dict):
        raise ValueError("not a safetensors file (header is not a table)")
    data = size - 8 - n
    end = 0
    for name, info in table.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"tensor {name!r} has no valid data offsets")
        end = max(end, offsets[1])
    if end > data:
        raise ValueError(f"truncated: the header needs {end:,} data bytes, the file has {data:,}")
    return {k: v for k, v in table.items() if k != "__metadata__"}
