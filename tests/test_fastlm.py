"""SharedContextLM gives stock lm-eval HFLM's log-likelihoods and greedy flags, with fewer tokens."""

from __future__ import annotations

import random

import pytest

from bench.evaluate import fastlm, zeroshot
from tests.conftest import make_tiny
from tests.test_evaluate import smol  # noqa: F401  the real SmolLM2 fixture


def _requests(vocab: int, seed: int = 0) -> list:
    """Contexts shared by 1-5 choices of 1-6 tokens, lengths 1-120; one too long for the 256-token window."""
    rng = random.Random(seed)
    out = []
    for g in range(9):
        ctx = [rng.randrange(vocab) for _ in range(rng.choice([1, 3, 17, 40, 120]))]
        for c in range(rng.randint(1, 5)):
            cont = [rng.randrange(vocab) for _ in range(rng.randint(1, 6))]
            out.append(((f"ctx{g}", f"choice{c}"), ctx, cont))
    out.append((("long", "x"), [rng.randrange(vocab) for _ in range(300)], [5, 6]))
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("path", ["packed", "kv_cache"])
def test_scores_equal_stock_hflm_on_every_family(family, tiny_tokenizer, path, monkeypatch) -> None:
    """Both scoring paths; the tiny models' 8-token sliding windows are far shorter than the rows, so the
    packed mask's windowed kinds are exercised (qwen2, gemma2/3 mixed by layer type, mistral all sliding)."""
    from lm_eval.models.huggingface import HFLM

    model = make_tiny(family, vocab_size=len(tiny_tokenizer))
    lm = fastlm.SharedContextLM(pretrained=model, tokenizer=tiny_tokenizer, batch_size=4)
    if path == "kv_cache":
        monkeypatch.setattr(fastlm.packing, "mask_layout", lambda model: None)
    else:
        assert fastlm.packing.mask_layout(model) is not None
    reqs = _requests(len(tiny_tokenizer))
    ours = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    stock = HFLM._loglikelihood_tokens(lm, reqs, disable_tqdm=True)
    assert [g for _, g in ours] == [g for _, g in stock]
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in stock], abs=2e-4, rel=1e-5)
    shared_contexts = len({tuple(c) for _, c, _ in reqs}) - 1  # the long one goes to stock HFLM
    stock_tokens = sum(len(c) + len(x) - 1 for _, c, x in reqs if len(c) < 256)
    assert lm.stats["tokens"] == sum(len(c) for c in {tuple(c) for _, c, _ in reqs if len(c) < 256}) + \
        sum(len(x) - 1 for _, c, x in reqs if len(c) < 256) and lm.stats["tokens"] < stock_tokens
    assert shared_contexts == 9
    batches = len(fastlm.batches_by_tokens([1] * shared_contexts, fastlm.TOKENS_PER_BATCH, fastlm.PACKED_ROWS))
    assert path == "kv_cache" or lm.stats["forwards"] == batches == 1  # one forward for all nine contexts


def test_packed_row_layout_and_targets() -> None:
    from bench.evaluate import packing

    tokens, positions, segments = packing.row([7, 8, 9], [[1, 2, 3], [4], [5, 6]])
    assert tokens == [7, 8, 9, 1, 2, 5] and positions == [0, 1, 2, 3, 4, 3] and segments == [0, 0, 0, 1, 1, 3]
    assert packing.targets([7, 8, 9], [[1, 2, 3], [4], [5, 6]]) == [[(2, 1), (3, 2), (4, 3)], [(2, 4)],
                                                                   [(2, 5), (5, 6)]]


def test_batches_by_tokens_sorts_longest_first_within_the_budget() -> None:
    assert fastlm.batches_by_tokens([10, 50, 20, 50, 5], budget=100, max_rows=8) == [[1, 3], [2, 0, 4]]
    assert fastlm.buckets_by_length([0, 10, 3, 8, 7, 2], keep=0.7) == [[1, 3, 4], [2], [5]]  # 2 < 0.7 * 3
    assert fastlm.batches_by_tokens([10] * 5, budget=1000, max_rows=2) == [[0, 1], [2, 3], [4]]


def test_zero_shot_documents_equal_stock_hflm(tiny_tokenizer) -> None:
    import datasets  # noqa: F401  imported before zero_shot sets the offline variables

    model = make_tiny("llama", vocab_size=len(tiny_tokenizer))
    tasks = ["arc_easy", "hellaswag", "piqa", "winogrande", "openbookqa"]
    fast = zeroshot.zero_shot(model, tiny_tokenizer, tasks, limit=5, batch_size=4)
    stock = zeroshot.zero_shot(model, tiny_tokenizer, tasks, limit=5, batch_size=4, stock_lm=True)
    assert fast["lm_class"] == "SharedContextLM" and stock["lm_class"] == "HFLM"
    for task in tasks:
        a, b = fast["docs"][task], stock["docs"][task]
        assert a["doc_id"] == b["doc_id"] and a["correct"] == b["correct"] and a["chosen"] == b["chosen"]
        assert [x for row in a["ll"] for x in row] == pytest.approx([x for row in b["ll"] for x in row], abs=2e-4)
        assert fast["tasks"][task]["acc"] == stock["tasks"][task]["acc"]


@pytest.mark.real
def test_real_model_zero_shot_documents_equal_stock_hflm(smol) -> None:  # noqa: F811
    model, tokenizer = smol
    tasks = ["arc_easy", "hellaswag"]
    fast = zeroshot.zero_shot(model, tokenizer, tasks, limit=10)
    stock = zeroshot.zero_shot(model, tokenizer, tasks, limit=10, stock_lm=True)
    for task in tasks:
        a, b = fast["docs"][task], stock["docs"][task]
        assert a["correct"] == b["correct"] and a["chosen"] == b["chosen"]
        assert [x for row in a["ll"] for x in row] == pytest.approx([x for row in b["ll"] for x in row], abs=1e-3)


def test_throughput_counter_counts_real_and_padded_tokens() -> None:
    import torch

    from bench.evaluate import throughput

    model = make_tiny("llama")
    counter = throughput.Counter()
    original = counter.wrap(model)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 0]])
    model(input_ids=torch.ones(2, 5, dtype=torch.long), attention_mask=mask)
    model(input_ids=torch.ones(1, 3, dtype=torch.long))
    model.forward = original
    assert (counter.tokens, counter.padded, counter.calls) == (7 + 3, 10 + 3, 2)
    assert throughput.raw_forward(model, 384, batch=2, seq_len=8, repeats=1) > 0


def test_throughput_counter_counts_real_tokens_of_a_packed_mask() -> None:
    import torch

    from bench.evaluate import packing, throughput

    rows = [packing.row([7, 8, 9], [[1, 2], [3]]), packing.row([4], [[5, 6, 7]])]  # 4 and 3 real tokens
    positions = torch.zeros(2, 4, dtype=torch.long)
    segments = torch.full((2, 4), -1, dtype=torch.long)
    for b, (tokens, pos, seg) in enumerate(rows):
        positions[b, : len(tokens)], segments[b, : len(tokens)] = torch.tensor(pos), torch.tensor(seg)
    for kinds in [(packing.FULL,), (packing.FULL, packing.SLIDING)]:
        mask = packing.attention_mask(positions, segments, kinds, 2, torch.float32)
        assert throughput.real_tokens(mask, torch.zeros(2, 4, dtype=torch.long)) == 4 + 3
