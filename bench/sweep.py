"""Sweep files: a grid of models, methods (with knobs), ratios and seeds in TOML, run as `bench sweep FILE`.

A sweep is exactly a list of `bench run` commands, one per model, so a published leaderboard is reproduced by
one command and every cell is keyed, resumed and recorded like any other run::

    models = ["smollm2-135m"]
    methods = "all"                 # or ["svdllm", "basis"]
    ratios = [0.12, 0.24]
    seeds = [0]
    suite = "quick"                 # optional: tasks, limit, calib_samples, calib_seq_len, train_tokens, tolerance

    [knobs.basis]
    group_size = 2
"""

from __future__ import annotations

from pathlib import Path

import tomllib

from bench.errors import UserError

REQUIRED = ("models", "methods", "ratios")
OPTIONAL = {"seeds": "--seeds", "suite": "--suite", "tasks": "--tasks", "limit": "--limit",
            "calib_samples": "--calib-samples", "calib_seq_len": "--calib-seq-len",
            "train_tokens": "--train-tokens", "tolerance": "--tolerance", "executor": "--executor",
            "address": "--address", "cpus_per_cell": "--cpus-per-cell", "gpus_per_cell": "--gpus-per-cell",
            "memory_per_cell": "--memory-per-cell", "max_retries": "--max-retries"}


def _csv(value, name: str, path: Path) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, (str, int, float)) for v in value):
        return ",".join(str(v) for v in value)
    raise UserError(f"{path}: `{name}` must be a string or a non-empty list, not {value!r}")


#: `bench run` flags as the sweep file names them, for messages about a sweep
FLAG_TO_KEY = {"--ratio": "ratios", "--methods": "methods", "--model": "models", **{v: k for k, v in OPTIONAL.items()},
               "--set": "[knobs.*]"}


def in_toml_terms(message: str) -> str:
    """A `bench run` message with its flags replaced by the sweep file's keys (``--ratio`` -> ``ratios``)."""
    for flag in sorted(FLAG_TO_KEY, key=len, reverse=True):
        message = message.replace(f"{flag} ", f"`{FLAG_TO_KEY[flag]}` ").replace(f"{flag}=", f"`{FLAG_TO_KEY[flag]}`=")
    return message


def load(path: str | Path) -> list[list[str]]:
    """The `bench run` argument lists the sweep file at ``path`` stands for, one per model."""
    path = Path(path)
    try:
        spec = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"sweep file {path} does not exist; see sweeps/default.toml for the format") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"sweep file {path} is not valid TOML: {err}") from None
    unknown = sorted(set(spec) - set(REQUIRED) - set(OPTIONAL) - {"knobs"})
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: "
                        f"{', '.join([*REQUIRED, *OPTIONAL, 'knobs'])}")
    missing = [k for k in REQUIRED if k not in spec]
    if missing:
        raise UserError(f"{path}: missing {', '.join(missing)} (a sweep needs models, methods and ratios)")
    models = spec["models"] if isinstance(spec["models"], list) else [spec["models"]]
    if not models or not all(isinstance(m, str) and m.strip() for m in models):
        raise UserError(f"{path}: `models` must name at least one model, e.g. models = [\"smollm2-135m\"]")
    common = ["--methods", _csv(spec["methods"], "methods", path), "--ratio", _csv(spec["ratios"], "ratios", path)]
    for key, flag in OPTIONAL.items():
        if key in spec:
            common += [flag, _csv(spec[key], key, path) if isinstance(spec[key], list) else str(spec[key])]
    knobs = spec.get("knobs", {})
    if not isinstance(knobs, dict) or not all(isinstance(v, dict) for v in knobs.values()):
        raise UserError(f"{path}: knobs go in tables like [knobs.basis] with lines like group_size = 2")
    for method, values in knobs.items():
        for knob, value in values.items():
            if isinstance(value, bool):
                text = str(value).lower()
            elif isinstance(value, list):
                text = _csv(value, f"knobs.{method}.{knob}", path)
            else:
                text = str(value)
            common += ["--set", f"{method}.{knob}={text}"]
    return [["run", "--model", str(m), *common] for m in models]
