"""Calibration / perplexity text: document split, windows, sampling, caching."""

from __future__ import annotations

import collections
import re

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from bench import data
from bench.errors import UserError


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on a few KB of calibration text, with bos/eos/pad tokens."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(data.wiki_splits().calibration[:10], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


def test_split_documents_uses_headers_and_drops_empty_documents() -> None:
    text = (
        '<doc id="1" url="u" title="A">\nA\n\nfirst body\n\n</doc>\n'
        '<doc id="2" url="u" title="B">\n\n</doc>\n'
        '<doc id="3" url="u" title="C">\nC\nthird <doc> inline\n</doc>\n'
    )
    assert data.split_documents(text) == ["A\n\nfirst body", "C\nthird <doc> inline"]


def test_packaged_file_splits_into_all_its_documents() -> None:
    text = data.wiki_text_path().read_text(encoding="utf-8")
    docs = data.split_documents(text)
    assert len(docs) == len(re.findall(r"^<doc ", text, flags=re.MULTILINE)) > 2000
    assert not any("<doc id=" in d or d.endswith("</doc>") for d in docs)


def test_calibration_and_test_are_disjoint_and_cover_all_documents() -> None:
    split = data.wiki_splits()
    docs = data.split_documents(data.wiki_text_path().read_text(encoding="utf-8"))
    assert not set(split.calibration) & set(split.test)
    assert collections.Counter(split.calibration + split.test) == collections.Counter(docs)
    assert 0.15 < len(split.test) / len(docs) < 0.25
    assert re.fullmatch(r"[0-9a-f]{12}", split.fingerprint)


def test_split_is_deterministic_and_nested_in_the_fraction() -> None:
    small, large = data.wiki_splits(0.2), data.wiki_splits(0.3)
    assert data._in_test(small.test[0], 0.2)
    assert set(small.test) < set(large.test)
    with pytest.raises(UserError, match="test_fraction"):
        data.wiki_splits(1.0)


def test_perplexity_windows_are_consecutive_non_overlapping_test_tokens(tok) -> None:
    split = data.wiki_splits()
    ids = tok("\n\n".join(split.test), add_special_tokens=False)["input_ids"]
    all_windows = data.perplexity_windows(tok, 64, None)
    assert all_windows.shape == (len(ids) // 64, 64)
    assert all_windows.flatten().tolist() == ids[: all_windows.numel()]
    first = data.perplexity_windows(tok, 64, 3)
    assert torch.equal(first, all_windows[:3])


def test_perplexity_windows_with_bos(tok) -> None:
    plain = data.perplexity_windows(tok, 31, 4)
    with_bos = data.perplexity_windows(tok, 32, 4, add_bos=True)
    assert with_bos.shape == (4, 32)
    assert (with_bos[:, 0] == tok.bos_token_id).all()
    assert torch.equal(with_bos[:, 1:], plain)


def test_calibration_batch_is_seeded_and_drawn_from_calibration_tokens(tok) -> None:
    a = data.calibration_batch(tok, 6, 48, seed=0)
    assert a.shape == (6, 48) and a.dtype == torch.long
    assert torch.equal(a, data.calibration_batch(tok, 6, 48, seed=0))
    assert not torch.equal(a, data.calibration_batch(tok, 6, 48, seed=1))
    ids = data._token_ids(tok, data.wiki_splits(), "calibration")
    for row in a:
        starts = (ids[: len(ids) - 47] == row[0]).nonzero().flatten()
        assert any(torch.equal(ids[s : s + 48], row) for s in starts.tolist())


def test_tokenisation_is_cached(tok) -> None:
    split = data.wiki_splits()
    assert data._token_ids(tok, split, "test") is data._token_ids(tok, split, "test")


def test_too_little_text_raises_user_error(tok) -> None:
    small = data.TextSplit(["one short document"], ["another short one"], "0" * 12, 0.5)
    with pytest.raises(UserError, match="seq-len"):
        data.calibration_batch(tok, 2, 1000, seed=0, split=small)
    with pytest.raises(UserError, match="seq-len"):
        data.perplexity_windows(tok, 1000, None, split=small)
    with pytest.raises(UserError):
        data.perplexity_windows(tok, 1, None)
