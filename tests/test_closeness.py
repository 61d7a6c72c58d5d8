"""Closeness to the dense model (KL, top-1 agreement), its cached reference, and the per-run side files."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.evaluate import closeness, docs
from bench.evaluate.perplexity import perplexity
from bench.records import load_records, record_path
from tests.conftest import make_tiny
from tests.test_cli import _run, plugins  # noqa: F401  the test-droplast plugin fixture

WINDOWS = torch.randint(0, 384, (3, 24), generator=torch.Generator().manual_seed(0))


def _closeness(model, reference) -> dict:
    tracker = closeness.Tracker(reference)
    perplexity(model, WINDOWS, batch_size=2, observe=tracker)
    return tracker.summary()


def test_a_model_against_itself_has_zero_kl_and_full_agreement(family, tmp_path) -> None:
    model = make_tiny(family)
    ref = closeness.dense_reference(model, WINDOWS, 2, None, f"self-{family}")
    got = _closeness(model, ref)
    assert got["positions"] == 3 * 23 and got["top1_agreement"] == 1.0
    assert abs(got["kl_mean"]) < 1e-6 and abs(got["kl_p99"]) < 1e-6


def test_kl_is_exact_with_the_whole_vocabulary_and_unbiased_with_top_k_and_tail_draws() -> None:
    g = torch.Generator().manual_seed(1)
    dense, other = torch.randn(200, 40, generator=g) * 2, torch.randn(200, 40, generator=g) * 2
    full = F.kl_div(torch.log_softmax(other, -1), torch.log_softmax(dense, -1), log_target=True,
                    reduction="none").sum(-1)
    exact, _ = closeness.kl_and_top1(*closeness.summarise(dense, k=40, m=4), other)
    assert torch.allclose(exact, full, rtol=1e-5, atol=1e-4)
    for k in (1, 5, 20):
        est, agree = closeness.kl_and_top1(*closeness.summarise(dense, k=k, m=2000), other)
        assert float(est.mean()) == pytest.approx(float(full.mean()), rel=0.02)  # the tail draws average out
        assert torch.equal(agree, dense.argmax(-1) == other.argmax(-1))


def test_per_window_kl_and_agreement_are_each_windows_mean_in_order(family) -> None:
    model = make_tiny(family)
    ref = closeness.dense_reference(model, WINDOWS, 2, None, f"windows-{family}")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tracker = closeness.Tracker(ref)
    perplexity(model, WINDOWS, batch_size=2, observe=tracker)
    got = tracker.summary()
    kl = torch.cat(tracker.kl).double().view(3, 23)
    assert got["window_kl"] == pytest.approx(kl.mean(-1).tolist(), rel=1e-12)
    assert got["window_kl"][0] != pytest.approx(got["window_kl"][1])  # really per window, not one value
    assert sum(got["window_kl"]) / 3 == pytest.approx(got["kl_mean"], rel=1e-9)
    assert sum(got["window_top1"]) / 3 == pytest.approx(got["top1_agreement"], rel=1e-9)
    # the dense model's own summary from the reference pass has them too (zero KL, full agreement)
    own = ref.dense_eval["closeness"]
    assert len(own["window_kl"]) == 3 and own["window_top1"] == [1.0, 1.0, 1.0]


def test_kl_grows_with_a_perturbation_and_agreement_falls() -> None:
    model = make_tiny("llama")
    ref = closeness.dense_reference(model, WINDOWS, 2, None, "perturb")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    got = _closeness(model, ref)
    assert got["kl_mean"] > 1e-4 and got["kl_p99"] >= got["kl_mean"] and got["top1_agreement"] < 1.0


def test_the_reference_pass_gives_the_dense_models_own_perplexity_and_closeness(family) -> None:
    model = make_tiny(family)
    ref = closeness.dense_reference(model, WINDOWS, 2, None, f"own-{family}")
    assert ref.dense_eval["perplexity"] == perplexity(model, WINDOWS, batch_size=2)
    assert ref.dense_eval["closeness"] == {**_closeness(model, ref), "reference": ref.dense_eval["closeness"]["reference"]}


def test_the_reference_is_reused_from_memory_then_from_disk(tmp_path, monkeypatch) -> None:
    model = make_tiny("llama")
    calls = []
    real = closeness._Collect.__call__
    monkeypatch.setattr(closeness._Collect, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    first = closeness.dense_reference(model, WINDOWS, 2, tmp_path, "reuse")
    n = len(calls)
    second = closeness.dense_reference(model, WINDOWS, 2, tmp_path, "reuse")
    closeness._MEMORY.clear()
    third = closeness.dense_reference(model, WINDOWS, 2, tmp_path, "reuse")
    assert (first.source, second.source, third.source) == ("computed", "memory", "disk")
    assert n == 2 and len(calls) == n  # two batches once; nothing recomputed after
    assert torch.equal(first.logp, third.logp) and torch.equal(first.ids, third.ids)
    assert first.logp.shape == (3 * 23, min(closeness.TOPK, 384))
    assert first.tail_ids.shape == (3 * 23, closeness.TAIL_SAMPLES)
    assert torch.equal(first.tail_ids, third.tail_ids)
    assert first.dense_eval is not None and second.dense_eval is None and third.dense_eval is None


def test_a_run_writes_side_files_with_one_sample_and_reuses_the_reference(tmp_path, tiny_model_dir, plugins):  # noqa: F811
    closeness._MEMORY.clear()
    assert _run(tmp_path, tiny_model_dir, "--methods", "test-droplast", "--ratio", "0.2,0.3") == 0
    records, problems = load_records(tmp_path / "results")
    assert not problems and len(records) == 3
    by = {(r.method, r.target_ratio): r for r in records}
    sources = [by[k].metrics["closeness"]["reference"]["source"] for k in
               (("dense", 0.0), ("test-droplast", 0.2), ("test-droplast", 0.3))]
    assert sources == ["computed", "memory", "memory"]
    dense = by["dense", 0.0].metrics
    assert dense["closeness"]["top1_agreement"] == 1.0 and abs(dense["closeness"]["kl_mean"]) < 1e-6
    assert dense["perplexity_detail"]["pass"] == "shared with the dense reference's forward"
    assert "pass" not in by["test-droplast", 0.2].metrics["perplexity_detail"]
    side = {k: docs.read(docs.docs_path(record_path(tmp_path / "results", r)), r.key) for k, r in by.items()}
    ids = {k: s["arc_easy"]["doc_id"] for k, s in side.items()}
    assert len(set(map(tuple, ids.values()))) == 1 and len(ids["dense", 0.0]) == 4  # the same 4 documents
    sample = dense["zero_shot_config"]["sample"]["tasks"]["sb_arc_easy"]
    assert sample["n"] == 4 and sample["stratified"] and sample["population"] == 570
    import hashlib  # the side file's doc ids are the sampled documents' indices in the task, not 0..3
    assert hashlib.sha256(",".join(map(str, ids["dense", 0.0])).encode()).hexdigest()[:16] == sample["ids_sha256"]
    assert dense["zero_shot_docs"]["docs"] == {"arc_easy": 4} and "tasks" not in dense["zero_shot_docs"]
    correct = side["dense", 0.0]["arc_easy"]["correct"]
    assert sum(correct) / 4 == dense["tasks"]["arc_easy"][dense["tasks"]["arc_easy"]["main"]]
    csv = (tmp_path / "lb" / "leaderboard.csv").read_text().splitlines()
    assert "kl" in csv[0].split(",") and "flip" in csv[0].split(",")
