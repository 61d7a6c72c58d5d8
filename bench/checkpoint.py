"""Save and load compressed models: safetensors weights (shared tensors once) plus a small JSON.

``slimbench.json`` holds the dense model's config and the log of structural edits; loading builds the
dense skeleton from that config, replays the edits and loads the weights, so no code is pickled.
"""

from __future__ import annotations

import copy
import errno
import json
import math
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from bench import integrity, structure
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
        integrity.as_user_writes(tmp)  # safetensors writes 0600, mkdtemp 0700: readable by whom the umask says
        _swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _swap_in(tmp: Path, path: Path, attempts: int = 16) -> None:
    """Put the finished folder ``tmp`` at ``path``, replacing whatever is there, safe against concurrent savers:
    an existing folder is renamed aside first (atomic), so two writers never delete each other's files."""
    for _ in range(attempts):
        try:
            os.replace(tmp, path)  # succeeds when path is absent (or an empty folder)
            return
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        aside = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:12]}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            continue  # another writer moved it first
        shutil.rmtree(aside, ignore_errors=True)
    raise OSError(errno.EBUSY, f"could not replace {path}: other processes keep writing it")


def load(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str = "cpu"):
    """Rebuild a saved model and its tokenizer from ``path``; returns ``(model, tokenizer)``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    meta = read_meta(path)  # also registers the methods' structural edits
    cfg = dict(meta["base_config"])
    try:
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    except (ValueError, TypeError, KeyError) as err:
        raise UserError(f"{path / META} is damaged: its base_config is not a usable config ({err})") from None
    saved_dtype = getattr(torch, meta["dtype"])
    _check_shapes(path, config, meta["ops"])
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


def read_meta(path: Path) -> dict:
    """``slimbench.json``, checked field by field; a damaged or crafted one is refused with a UserError."""
    from bench.registry import discover

    if not (path / META).exists():
        raise UserError(f"{path} is not a slimbench checkpoint (no {META}); save one with `bench run --save`")
    bad = f"{path / META} is damaged"
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{bad}: not valid JSON ({err}); re-create the checkpoint with `bench run --force`") from None
    if not isinstance(meta, dict):
        raise UserError(f"{bad}: not a JSON object; re-create the checkpoint with `bench run --force`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: checkpoint format {meta.get('format_version')} is not {FORMAT_VERSION}; "
                        "re-create it with this slimbench version")
    base, ops = meta.get("base_config"), meta.get("ops")
    if not isinstance(base, dict) or not isinstance(base.get("model_type"), str):
        raise UserError(f"{bad}: base_config is not a model config with a model_type")
    discover()
    if not isinstance(ops, list) or not all(isinstance(o, dict) and o.get("op") in structure.registered_ops()
                                            for o in ops):
        raise UserError(f"{bad}: ops must be a list of known structural edits ({', '.join(structure.registered_ops())})")
    meta.setdefault("dtype", "float32")
    if meta["dtype"] not in ("float32", "bfloat16", "float16"):
        raise UserError(f"{bad}: dtype {meta['dtype']!r} is not float32, bfloat16 or float16")
    return meta


def _check_shapes(path: Path, config, ops: list[dict]) -> None:
    """Replay the edits on an empty (meta-device) model and match every tensor against the weights file's header,
    so a crafted log (a rank of billions) or truncated weights are refused before any memory is allocated."""
    from transformers import AutoModelForCausalLM

    from bench import integrity

    bad = f"{path} is damaged or crafted"
    try:
        header = integrity.safetensors_header(path / WEIGHTS)
    except (OSError, ValueError) as err:
        raise UserError(f"{bad}: {WEIGHTS}: {err}; re-create the checkpoint with `bench run --force`") from None
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(copy.deepcopy(config))  # edits change the config
            structure.replay(skeleton, get_adapter(skeleton), ops)
    except Exception as err:  # noqa: BLE001 - any failure to rebuild is a damaged log
        raise UserError(f"{bad}: its structural edits do not apply to its own config ({type(err).__name__}: "
                        f"{str(err)[:120]})") from None
    state = skeleton.state_dict(keep_vars=True)  # tied weights stay one object
    for name, tensor in state.items():
        if name in header and list(header[name].get("shape", [])) != list(tensor.shape):
            raise UserError(f"{bad}: tensor {name} is {header[name].get('shape')} in {WEIGHTS} but "
                            f"{list(tensor.shape)} after replaying the edits")
    unique = {id(t): t.numel() for t in state.values()}  # tied tensors are one object, stored once
    needed = sum(unique.values())
    stored = sum(math.prod(v.get("shape", [])) for v in header.values() if isinstance(v, dict))
    if needed != stored:
        raise UserError(f"{bad}: its edits describe {needed:,} parameters but {WEIGHTS} holds {stored:,}; "
                        "re-create the checkpoint with `bench run --force`")


def _is_nonpersistent(model: nn.Module, key: str) -> bool:
    return key not in model.state_dict()
