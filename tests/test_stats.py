"""Paired statistics, the document sample and the per-document side file, against hand computations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import stats
from bench.evaluate import docs, sample

A = [1, 1, 0, 0, 1, 0, 1, 1]
B = [1, 0, 1, 0, 1, 1, 1, 1]


def test_paired_se_matches_hand_computation() -> None:
    # d = B - A = [0, -1, 1, 0, 0, 1, 0, 0]: mean 1/8, sum of squared deviations 3 - 8/64 = 2.875
    p = stats.paired_diff(A, B)
    assert p.diff == pytest.approx(0.125)
    assert p.se == pytest.approx(math.sqrt(2.875 / 7 / 8))
    assert (p.n, p.a_only, p.b_only) == (8, 1, 2)


def test_paired_se_is_zero_when_both_cells_agree_on_every_document() -> None:
    p = stats.paired_diff(A, A)
    assert p.diff == 0 and p.se == 0 and p.within_noise()
    assert p.se < math.hypot(*(math.sqrt(0.625 * 0.375 / 7),) * 2)  # the unpaired SE would be 0.26


def test_mcnemar_exact_matches_hand_computation_and_scipy() -> None:
    assert stats.mcnemar(1, 2) == pytest.approx(1.0)  # P(X <= 1 | n=3) = 4/8, doubled
    assert stats.mcnemar(1, 9) == pytest.approx(2 * 11 / 1024)
    assert stats.mcnemar(0, 0) == 1.0
    scipy_stats = pytest.importorskip("scipy.stats")
    for a_only, b_only in [(3, 12), (7, 7), (0, 5), (20, 9)]:
        expected = scipy_stats.binomtest(min(a_only, b_only), a_only + b_only, 0.5).pvalue
        assert stats.mcnemar(a_only, b_only) == pytest.approx(expected)


def test_mean_over_tasks_and_over_seeds() -> None:
    t1, t2 = stats.Paired(0.1, 0.03, 40), stats.Paired(-0.05, 0.04, 40)
    m = stats.mean_over_tasks([t1, t2])
    assert m.diff == pytest.approx(0.025) and m.se == pytest.approx(0.05 / 2)
    s = stats.over_seeds([stats.Paired(0.1, 0.03, 40), stats.Paired(0.2, 0.04, 40)])
    # within: (0.03^2 + 0.04^2) / 2; between: var(0.1, 0.2) / 2 = 0.005 / 2
    assert s.diff == pytest.approx(0.15) and s.se == pytest.approx(math.sqrt(0.00125 + 0.0025))


def test_bootstrap_interval_brackets_the_mean_difference() -> None:
    lo, hi = stats.bootstrap_ci(A * 10, B * 10, iters=500)
    assert lo < 0.125 < hi


def test_flip_rate_and_paired_tasks_align_documents_by_id() -> None:
    ref = {"t": {"doc_id": [3, 1, 2, 0], "correct": [1, 1, 0, 0]}}
    other = {"t": {"doc_id": [0, 1, 2, 3, 9], "correct": [0, 0, 0, 1, 1]}}  # doc 9 unpaired, doc 1 flips
    assert stats.flip_rate(ref, other) == pytest.approx(1 / 4)
    p = stats.paired_tasks(ref, other)["t"]
    assert (p.n, p.a_only, p.b_only) == (4, 1, 0) and p.diff == pytest.approx(-0.25)


def test_flips_split_into_right_answers_lost_and_gained_and_their_difference_is_the_accuracy_change() -> None:
    # two tasks, 10 documents each: the other cell keeps the reference's accuracy in task a (2 lost, 2 gained)
    # and loses 3 right answers in task b without gaining any
    ref = {"a": {"doc_id": list(range(10)), "correct": [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]},
           "b": {"doc_id": list(range(10)), "correct": [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]}}
    other = {"a": {"doc_id": list(range(10)), "correct": [0, 0, 1, 1, 1, 1, 1, 0, 0, 0]},
             "b": {"doc_id": list(range(10)), "correct": [0, 0, 0, 1, 0, 0, 0, 0, 0, 0]}}
    lost, gained = stats.flip_split(ref, other)
    assert (lost, gained) == (pytest.approx(5 / 20), pytest.approx(2 / 20))
    assert stats.flip_rate(ref, other) == pytest.approx(lost + gained)
    acc = {c: sum(sum(t["correct"]) for t in cell.values()) / 20 for c, cell in (("ref", ref), ("other", other))}
    assert acc["other"] - acc["ref"] == pytest.approx(gained - lost)
    assert stats.flip_split(ref, ref) == (0.0, 0.0) and stats.flip_split(ref, {"c": other["a"]}) is None


def test_chance_is_one_over_the_choices_and_above_chance_is_a_one_sample_paired_test() -> None:
    # task a: 4 documents of 4 choices, 3 right; task b: 2 of 2 choices and 2 of 3 choices, 2 right
    docs = {"a": {"correct": [1, 1, 1, 0], "ll": [[0.0] * 4] * 4},
            "b": {"correct": [1, 0, 0, 1], "ll": [[0.0] * 2, [0.0] * 2, [0.0] * 3, [0.0] * 3]}}
    chance = stats.chance(docs)
    assert chance == pytest.approx({"a": 0.25, "b": (0.5 + 0.5 + 1 / 3 + 1 / 3) / 4})
    p = stats.above_chance(docs)
    # a: d = correct - 1/4 has mean 0.5 and the binomial sd of [1, 1, 1, 0]; b: d = [1/2, -1/2, -1/3, 2/3]
    d_b = [0.5, -0.5, -1 / 3, 2 / 3]
    se_a = math.sqrt(0.75 / 3 / 4)  # sample variance of [1, 1, 1, 0] is 0.25, / n
    se_b = math.sqrt(sum((x - sum(d_b) / 4) ** 2 for x in d_b) / 3 / 4)
    assert p.diff == pytest.approx((0.5 + sum(d_b) / 4) / 2)
    assert p.se == pytest.approx(math.hypot(se_a, se_b) / 2)
    assert p.n == 8 and p.a_only == p.b_only == 0  # a guess is not a cell: no McNemar counts
    assert stats.above_chance({"a": {"correct": [1, 0], "ll": []}}) is None  # no per-choice figures, no test


def test_allocation_is_proportional_and_sums_to_n() -> None:
    assert sample.allocate({"yes": 62, "no": 38}, 40) == {"yes": 25, "no": 15}  # 24.8 and 15.2
    assert sum(sample.allocate({0: 1, 1: 1, 2: 1}, 2).values()) == 2


def test_stratified_sample_is_seeded_and_keeps_label_shares() -> None:
    labels = ["yes"] * 31 + ["no"] * 9 + ["yes"] * 600 + ["no"] * 400  # the first 40 lean "yes"
    ids = sample.stratified(labels, 40, seed=7)
    assert ids == sample.stratified(labels, 40, seed=7) and ids != sample.stratified(labels, 40, seed=8)
    assert len(set(ids)) == 40 and sum(labels[i] == "no" for i in ids) == round(40 * 409 / 1040)
    assert sample.stratified(labels[:5], 40, seed=7) == [0, 1, 2, 3, 4]


def test_side_file_round_trip_and_key_check(tmp_path: Path) -> None:
    tasks = {"boolq": {"doc_id": [4, 9], "gold": [0, 1], "chosen": [0, 0], "correct": [1, 0], "ll": [[-1.0, -2.5]] * 2}}
    path = docs.docs_path(tmp_path / "svdllm__r0.120__s0.json")
    assert path.name == "svdllm__r0.120__s0.docs.json.gz"
    summary = docs.write(path, "k1", tasks)
    assert summary["docs"] == {"boolq": 2} and summary["bytes"] == path.stat().st_size
    assert docs.read(path, "k1") == tasks
    assert docs.read(path, "another key") is None and docs.read(tmp_path / "missing.docs.json.gz") is None
