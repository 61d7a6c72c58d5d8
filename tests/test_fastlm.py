"""SharedContextLM gives stock lm-eval HFLM's log-likelihoods and greedy flags, with fewer tokens."""

from __future__ import annotations

import random

import pytest

from bench.evaluate import fastlm, zeroshot
from bench.evaluate import sample as doc_sample
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
    assert path == "kv_cache" or lm.stats["forwards"] == 1  # one forward for all nine contexts
    if path == "packed":  # the nine groups share rows filled first-fit to ROW_TOKENS, padded to the widest row
        groups: dict = {}
        for _, c, x in reqs:
            if len(c) < 256:
                groups.setdefault(tuple(c), []).append(x)
        lengths = [fastlm.packing.group_length(list(c), xs) for c, xs in groups.items()]
        rows = fastlm.packing.fill_rows(lengths, fastlm.ROW_TOKENS)
        assert len(rows) < len(lengths)
        assert lm.stats["padded"] == len(rows) * max(sum(lengths[g] for g in r) for r in rows)


def test_packed_row_layout_and_targets() -> None:
    from bench.evaluate import packing

    row = packing.Row()
    row.add([7, 8, 9], [[1, 2, 3], [4], [5, 6]])
    row.add([3], [[2, 1]])
    assert row.tokens == [7, 8, 9, 1, 2, 5, 3, 2] and row.positions == [0, 1, 2, 3, 4, 3, 0, 1]
    assert row.docs == [0] * 6 + [1, 1] and row.segments == [0, 0, 0, 1, 1, 3, 0, 1]
    assert row.picks == [[[(2, 1), (3, 2), (4, 3)], [(2, 4)], [(2, 5), (5, 6)]], [[(6, 2), (7, 1)]]]
    assert packing.fill_rows([5, 9, 3, 4, 12], capacity=12) == [[4], [1, 2], [0, 3]]


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

    rows = [packing.Row(), packing.Row()]
    rows[0].add([7, 8, 9], [[1, 2], [3]])  # 4 tokens
    rows[0].add([5, 4], [[1]])  # 2 more, a second group in the same row
    rows[1].add([4], [[5, 6, 7]])  # 3 tokens, then padding
    ids, positions, docs, segments = packing.tensors(rows)
    for kinds in [(packing.FULL,), (packing.FULL, packing.SLIDING)]:
        mask = packing.attention_mask(positions, docs, segments, kinds, 2, torch.float32)
        assert throughput.real_tokens(mask, ids) == 6 + 3


def test_restricted_tasks_score_what_lm_eval_samples_scores(tiny_tokenizer) -> None:
    """zero_shot hands lm-eval task objects cut down to the sampled documents; lm-eval's own ``samples=`` on
    fresh task objects must give the same documents, log-likelihoods and accuracies."""
    import datasets  # noqa: F401  imported before zero_shot sets the offline variables
    import lm_eval

    model = make_tiny("llama", vocab_size=len(tiny_tokenizer))
    tasks = ["hellaswag", "boolq"]  # hellaswag has process_docs, boolq a label-skewed population
    ours = zeroshot.zero_shot(model, tiny_tokenizer, tasks, limit=6, batch_size=4)
    names = zeroshot.resolve_tasks(tasks)
    manager = zeroshot.task_manager()
    fresh = zeroshot._task_objects(tuple(names), manager)
    ids, _ = doc_sample.draw(fresh, 6, 0)
    lm = fastlm.SharedContextLM(pretrained=model, tokenizer=tiny_tokenizer, batch_size=4)
    theirs = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, samples=ids, num_fewshot=0,
                                     log_samples=True)
    for user, name in zip(tasks, names, strict=True):
        rows = sorted(theirs["samples"][name], key=lambda s: s["doc_id"])
        mine = ours["docs"][user]
        assert mine["doc_id"] == ids[name] and len(rows) == 6
        assert [x for r in mine["ll"] for x in r] == pytest.approx(
            [float(resp[0]) for r in rows for resp in r["filtered_resps"]], abs=1e-4)
        main = ours["tasks"][user]["main"]
        assert ours["tasks"][user][main] == pytest.approx(theirs["results"][name][f"{main},none"])


def test_throughput_measure_reports_every_pass(tiny_tokenizer) -> None:
    import torch

    from bench.evaluate import throughput

    model = make_tiny("llama", vocab_size=len(tiny_tokenizer))
    windows = torch.randint(0, len(tiny_tokenizer), (3, 16), generator=torch.Generator().manual_seed(0))
    fig = throughput.measure(model, tiny_tokenizer, ["arc_easy"], 3, stock=True, windows=windows, batch=2,
                             seq_len=8, repeats=1, heap_compare=True)
    system = throughput.SYSTEM
    assert set(fig) == {"stock HFLM", "SharedContextLM", "perplexity + closeness", "raw_tokens_per_s", "raw_spread",
                        "SharedContextLM" + system, "perplexity + closeness" + system, "host_heap"}
    assert fig["SharedContextLM" + system]["tokens"] == fig["SharedContextLM"]["tokens"]  # the same pass again
    assert fig["SharedContextLM"]["tokens"] < fig["stock HFLM"]["tokens"]  # shared contexts run once
    assert fig["perplexity + closeness"]["tokens"] == 48
    text = throughput.report(fig)
    assert "of raw" in text and "the same scores as stock HFLM" in text
    assert text.count("the time with the system heap") == 2 and text.startswith("host heap: ")
