"""Result records: one JSON document per (model, method, ratio, seed) cell, with a schema version.

Every number a leaderboard shows is read from these files. They are written atomically (temporary
file, fsync, rename), so a crash never leaves half a record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2  # 2: strict JSON (non-finite numbers as null, listed in ``non_finite``); key in the file name
READABLE_VERSIONS = (1, 2)
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
    #: where a number was NaN or infinite: JSON path -> "nan" / "inf" / "-inf" (the value itself is stored as null)
    non_finite: dict[str, str] = field(default_factory=dict)
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        """Strict JSON: a NaN or infinity becomes null and its place is listed in ``non_finite``."""
        data = json.loads(json.dumps(dataclasses.asdict(self), default=_jsonable))
        found: dict[str, str] = {}
        data = _finite(data, "", found)
        data["non_finite"] = {**self.non_finite, **found}
        self.non_finite = data["non_finite"]
        return json.dumps(data, indent=1, sort_keys=False, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Any) -> Record:
        """Check the shape of a parsed record; anything malformed raises ValueError naming the field."""
        if isinstance(data, dict) and str(data.get("schema", "")).startswith("slimbench.") and data["schema"] != SCHEMA:
            raise OtherDocument(f"a {data['schema']} document, not a result record")
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise ValueError("not a slimbench result record")
        if data.get("schema_version") not in READABLE_VERSIONS:
            raise ValueError(f"schema version {data.get('schema_version')} (this slimbench reads "
                             f"{', '.join(map(str, READABLE_VERSIONS))})")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name in REQUIRED:
            if name not in data:
                raise ValueError(f"field {name!r} is missing")
        for name, value in data.items():
            if name in fields and not _type_ok(value, str(fields[name].type)):
                raise ValueError(f"field {name!r} has the wrong type ({type(value).__name__})")
        for part in ("model", "suite"):
            if not isinstance(data[part].get("name"), str) or not data[part]["name"]:
                raise ValueError(f"field {part}.name is missing or not a string")
        tasks = data.get("metrics", {}).get("tasks")
        if tasks is not None and not (isinstance(tasks, dict) and all(isinstance(v, dict) for v in tasks.values())):
            raise ValueError("field metrics.tasks is not a table of task results")
        return cls(**{k: v for k, v in data.items() if k in fields})


REQUIRED = ("model", "method", "knobs", "knob_overrides", "target_ratio", "seed", "suite", "status")
_TYPES = {"dict": dict, "list": list, "str": str, "int": int, "float": (int, float)}


def _type_ok(value: Any, annotation: str) -> bool:
    if value is None:
        return "None" in annotation
    if isinstance(value, bool):
        return annotation.startswith("bool")
    base = annotation.split("[")[0].split("|")[0].strip()
    expected = _TYPES.get(base)
    return expected is None or isinstance(value, expected)


def _finite(value: Any, where: str, found: dict[str, str]) -> Any:
    """``value`` with every non-finite float replaced by None, its path noted in ``found``."""
    if isinstance(value, float) and not math.isfinite(value):
        found[where.lstrip(".")] = str(value)
        return None
    if isinstance(value, dict):
        return {k: _finite(v, f"{where}.{k}", found) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v, f"{where}[{i}]", found) for i, v in enumerate(value)]
    return value


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


def method_tag(rec: Record) -> str:
    """The method as its record files name it: ``delta``, or ``delta+18815f`` for a run with overridden knobs (the
    first 6 hex digits of their hash), short enough to type where the full label is a line long."""
    return f"{rec.method}+{cell_key(rec.knob_overrides)[:6]}" if rec.knob_overrides else rec.method


def record_path(results_dir: str | os.PathLike, rec: Record) -> Path:
    """Unique per key: runs that differ in anything that changes the result never share a file."""
    key_tag = f"__{rec.key[:10]}" if rec.key else ""
    name = f"{method_tag(rec)}__r{rec.target_ratio:.3f}__s{rec.seed}{key_tag}.json"
    return Path(results_dir) / rec.model["name"] / rec.suite["name"] / name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: the process's umask (read once): files slimbench writes get the mode it gives any file the user writes
UMASK = _umask()


def write_record(results_dir: str | os.PathLike, rec: Record) -> Path:
    """Write ``rec`` atomically; an existing record for the same cell is replaced only once the new one is whole."""
    path = record_path(results_dir, rec)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes 0600; a record is as readable as any file the user writes
        with os.fdopen(fd, "w") as f:
            f.write(rec.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class OtherDocument(ValueError):
    """A file slimbench wrote with another schema (``bench scaling --json`` figures): not a record, not a problem."""


def load_records(results_dir: str | os.PathLike) -> tuple[list[Record], list[str]]:
    """All records under ``results_dir``, and a line for each file that is not a readable record (slimbench's
    own documents of other schemas, such as the scaling figures under ``results/scaling/``, are passed over)."""
    records, problems = [], []
    for path in sorted(Path(results_dir).rglob("*.json")):
        try:
            records.append(read_record(path))
        except OtherDocument:
            continue
        except (ValueError, OSError) as err:
            problems.append(f"{path}: skipped ({err})")
    return records, problems


def latest(records: list[Record]) -> tuple[list[Record], int]:
    """One record per cell (model, suite settings, method, knobs, ratio, seed): the most recently finished.

    Records keyed differently for the same cell (changed weights, another slimbench version) stay on disk
    under their own names; tables show the newest. Returns the kept records and how many were superseded.
    """
    best: dict[str, Record] = {}
    for r in records:
        cell = json.dumps([r.model.get("name"), r.suite, r.method, r.knob_overrides, r.target_ratio, r.seed],
                          sort_keys=True, default=str)
        if cell not in best or (r.finished or "") > (best[cell].finished or ""):
            best[cell] = r
    newest = {id(r) for r in best.values()}
    kept = [r for r in records if id(r) in newest]
    return kept, len(records) - len(kept)


def read_record(path: str | os.PathLike) -> Record:
    """One record file; ValueError (naming the problem) when it is not valid strict JSON or not a record."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON: {err.msg} at line {err.lineno}") from None
    return Record.from_dict(data)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"not strict JSON: bare {name}")


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


def _cpu_name() -> str:
    """The CPU's marketing name ("model name" in /proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict[str, Any]:
    """Library versions, hardware and git commit, for the record."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from bench import hostheap

    versions = {}
    for pkg in ("slimbench", "torch", "transformers", "lm_eval", "datasets", "safetensors"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    hw = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device,
          "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_name(), "host_heap": hostheap.policy()}
    if cuda:
        hw["gpu"] = hw["device_name"]
        hw["cuda"] = torch.version.cuda
    return {"python": platform.python_version(), "versions": versions, "hardware": hw, "git_commit": git_commit()}
