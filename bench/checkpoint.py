"""Save and load compressed models: safetensors weights (shared tensors once) plus a small JSON.

``slimbench.json`` holds the dense model's config and the log of structural edits; loading builds the
dense skeleton from that config, replays the edits and loads the weights, so no code is pickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from bench import structure
from bench.adapters import get_adapter
from bench.errors import UserError

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "slimbench.json"


def save(model: nn.Module, tokenizer, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``model`` (compressed or dense) and its tokenizer to ``path`` atomically; returns the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    os.chmod(tmp, 0o755)
    try:
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        meta = {
            "format_version": FORMAT_VERSION,
            "base_config": structure.base_config(model),
            "ops": structure.structure_log(model),
            "dtype": dtype,
            **(extra or {}),
        }
        (tmp / META).write_text(json.dumps(meta, indent=1, default=str))
        save_model(model, str(tmp / WEIGHTS))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str = "cpu"):
    """Rebuild a saved model and its tokenizer from ``path``; returns ``(model, tokenizer)``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from bench.registry import discover

    path = Path(path)
    if not (path / META).exists():
        raise UserError(f"{path} is not a slimbench checkpoint (no {META}); save one with `bench run --save`")
    meta = json.loads((path / META).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: checkpoint format {meta.get('format_version')} is not {FORMAT_VERSION}; "
                        "re-create it with this slimbench version")
    discover()  # methods register the structural edits they use
    cfg = dict(meta["base_config"])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    saved_dtype = getattr(torch, meta.get("dtype", "float32"))
    model = AutoModelForCausalLM.from_config(config, dtype=saved_dtype)
    structure.replay(model, get_adapter(model), meta["ops"])
    missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False, device="cpu")
    missing = [k for k in missing if not _is_nonpersistent(model, k)]
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the rebuilt structure (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); the checkpoint is damaged or from another version")
    if dtype is not None and dtype != saved_dtype:
        model.to(dtype)
    model.to(device).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def _is_nonpersistent(model: nn.Module, key: str) -> bool:
    return key not in model.state_dict()
