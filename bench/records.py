"""Result records: one JSON document per (model, method, ratio, seed) cell, with a schema version.

Every number a leaderboard shows is read from these files. They are written atomically (temporary
file, fsync, rename), so a crash never leaves half a record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
SCHEMA = "slimbench.result"


@dataclass
class Record:
    """The result of one cell. ``status`` is "ok" or "failed" (then ``error`` says why)."""

    model: dict[str, Any]
    method: str
    knobs: dict[str, Any]
    knob_overrides: dict[str, Any]
    target_ratio: float
    seed: int
    suite: dict[str, Any]
    status: str = "ok"
    error: str | None = None
    solution: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    started: str = ""
    finished: str = ""
    key: str = ""
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=False, default=_jsonable)

    @classmethod
    def from_dict(cls, data: dict) -> Record:
        if data.get("schema") != SCHEMA:
            raise ValueError("not a slimbench result record")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"schema version {data.get('schema_version')} (this slimbench reads {SCHEMA_VERSION})")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return str(obj)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def cell_key(parts: dict[str, Any]) -> str:
    """A short hash of everything that determines a cell's result."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def record_path(results_dir: str | os.PathLike, rec: Record) -> Path:
    knob_tag = f"+{cell_key(rec.knob_overrides)[:6]}" if rec.knob_overrides else ""
    name = f"{rec.method}{knob_tag}__r{rec.target_ratio:.3f}__s{rec.seed}.json"
    return Path(results_dir) / rec.model["name"] / rec.suite["name"] / name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def write_record(results_dir: str | os.PathLike, rec: Record) -> Path:
    """Write ``rec`` atomically; an existing record for the same cell is replaced only once the new one is whole."""
    path = record_path(results_dir, rec)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a record is as readable as any file the user writes
        with os.fdopen(fd, "w") as f:
            f.write(rec.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_records(results_dir: str | os.PathLike) -> tuple[list[Record], list[str]]:
    """All records under ``results_dir``, and a line for each file that is not a readable record."""
    records, problems = [], []
    for path in sorted(Path(results_dir).rglob("*.json")):
        try:
            records.append(Record.from_dict(json.loads(path.read_text())))
        except (ValueError, TypeError, OSError) as err:
            problems.append(f"{path}: skipped ({err})")
    return records, problems


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str) -> dict[str, Any]:
    """Library versions, hardware and git commit, for the record."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions = {}
    for pkg in ("slimbench", "torch", "transformers", "lm_eval", "datasets", "safetensors"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    hw = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name()
        hw["cuda"] = torch.version.cuda
    return {"python": platform.python_version(), "versions": versions, "hardware": hw, "git_commit": git_commit()}
