"""Standard errors in the leaderboard, the within-noise marker, and ``bench compare``."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from bench import compare, leaderboard, stats
from bench.cli import main
from bench.compare import mean_acc_se
from bench.evaluate import docs
from bench.records import Record, method_tag, record_path, write_record

SE = 0.02  # every task's lm-eval SE (shown as information; verdicts are paired over the side files)
DOCS = 40


def _rec(method: str, ratio: float, seed: int = 0, accs=(0.7, 0.7), se: float | None = SE, ppl: float = 20.0,
         docs: int = DOCS, model: str = "tiny") -> Record:
    tasks = {"arc_easy": {"acc": accs[0] - 0.1, "acc_stderr": 0.3, "acc_norm": accs[0], "acc_norm_stderr": se,
                          "n": docs, "main": "acc_norm"},
             "boolq": {"acc": accs[1], "acc_stderr": se, "acc_norm": None, "acc_norm_stderr": None, "n": docs,
                       "main": "acc"}}
    params = round(100e6 * (1 - ratio))
    return Record(model={"name": model}, method=method, knobs={}, knob_overrides={}, target_ratio=ratio, seed=seed,
                  suite={"name": "quick"}, budget={"target_ratio": ratio, "achieved_ratio": ratio,
                                                   "within_tolerance": True, "params_compressed": params},
                  metrics={"params": params, "perplexity": ppl, "tasks": tasks, "mean_acc": sum(accs) / 2,
                           "prefill_ms": 100.0, "decode_tokens_per_s": 30.0}, key=f"{model}-{method}-{ratio}-{seed}")


def _side(rec: Record) -> dict:
    """Per-document outcomes consistent with the record: task t's first round(acc * 40) documents are right,
    so two cells differ exactly on the documents between their two counts (a nested, paired design)."""
    out = {}
    for task, res in rec.metrics["tasks"].items():
        k = round(res[res["main"]] * DOCS)
        out[task] = {"doc_id": list(range(DOCS)), "correct": [1] * k + [0] * (DOCS - k),
                     "ll": [[0.0] * (4 if task == "arc_easy" else 2)] * DOCS}
    return out


def _write(root: Path, rec: Record) -> None:
    docs.write(docs.docs_path(record_path(root, rec)), rec.key, _side(rec))
    write_record(root, rec)


RECORDS = [
    _rec("dense", 0.0, accs=(0.75, 0.75), ppl=10.0),
    _rec("good", 0.2, accs=(0.70, 0.70), ppl=20.0),
    _rec("close", 0.2, 0, accs=(0.675, 0.675), ppl=24.0),  # one document fewer per task: within noise
    _rec("close", 0.2, 1, accs=(0.70, 0.70), ppl=26.0),
    _rec("worse", 0.2, accs=(0.625, 0.625), ppl=30.0),  # 3 fewer: within the unpaired noise, not the paired
    _rec("bad", 0.2, accs=(0.40, 0.40), ppl=90.0),  # 0.30 below good: clearly worse
    _rec("bad", 0.4, accs=(0.35, 0.35), ppl=95.0),  # alone at 40 %: the best there (under 100x dense: ranked)
]


@pytest.fixture
def results(tmp_path) -> Path:
    for r in RECORDS:
        _write(tmp_path / "results", r)
    return tmp_path / "results"


def test_se_of_an_unweighted_mean_of_tasks():
    tasks = {"a": {"acc": 0.5, "acc_stderr": 0.03, "main": "acc"},
             "b": {"acc_norm": 0.6, "acc_norm_stderr": 0.04, "acc_stderr": 9.0, "main": "acc_norm"},
             "gen": {"main": None}}  # no accuracy: not in mean_acc, so not in its SE
    assert mean_acc_se(tasks) == pytest.approx(math.sqrt(0.03**2 + 0.04**2) / 2)  # = 0.025
    assert mean_acc_se({"a": {"acc": 0.5, "acc_stderr": None, "main": "acc"}}) is None
    assert mean_acc_se({"a": {"acc": 0.5, "acc_stderr": math.nan, "main": "acc"}}) is None
    # a real record's numbers: 40 documents, p = 0.475 -> SE = sqrt(p (1 - p) / 39)
    assert mean_acc_se({"w": {"acc": 0.475, "acc_stderr": math.sqrt(0.475 * 0.525 / 39), "main": "acc"}}) \
        == pytest.approx(0.07996, abs=1e-5)


def test_leaderboard_marks_are_paired_over_the_side_files(results, tmp_path):
    df, _, _ = leaderboard.write(results, tmp_path / "lb")
    rows = {(r.method, r.target, r.seed): r for r in df.itertuples()}
    assert rows["good", 0.2, 0].mean_acc_se == pytest.approx(math.sqrt(2) * SE / 2)
    marks = {(m, t): rows[m, t, 0].near_best for m, t, _ in rows}
    assert marks == {("dense", 0.0): None, ("chance", 0.0): None, ("good", 0.2): "best", ("close", 0.2): "≈", ("worse", 0.2): "",
                     ("bad", 0.2): "", ("bad", 0.4): "best"}
    # worse - good: 3 of 40 documents flip per task: mean -0.075, per task SE sqrt((3 - 40 * 0.075^2) / 39 / 40),
    # two tasks: / sqrt(2). The unpaired test on 40 documents (binomial SE sqrt(p (1 - p) / 39) per task and
    # cell) would have called it within noise.
    se = math.sqrt((3 - 40 * 0.075**2) / 39 / 40) / math.sqrt(2)
    assert rows["worse", 0.2, 0].vs_best == f"{-0.075:+.3f}±{se:.3f}"
    unpaired = math.hypot(*(math.sqrt(p * (1 - p) / 39) / math.sqrt(2) for p in (0.7, 0.625)))
    assert 0.075 <= 1.96 * unpaired
    assert rows["close", 0.2, 1].near_best == "≈"  # every seed row of the cell carries the mark
    assert rows["close", 0.2, 0].seed_sd == pytest.approx(0.025 / math.sqrt(2))  # sd of 0.675 and 0.70
    assert math.isnan(rows["good", 0.2, 0].seed_sd)  # one seed: no spread
    assert rows["bad", 0.2, 0].flip == pytest.approx(14 / 40) and rows["dense", 0.0, 0].flip == 0
    assert rows["bad", 0.2, 0].lost == pytest.approx(14 / 40)  # the side files only ever lose dense's right answers

    csv = (tmp_path / "lb" / "leaderboard.csv").read_text().splitlines()
    head = csv[0].split(",")
    assert head[head.index("mean_acc") + 1:head.index("mean_acc") + 5] == ["mean_acc_se", "seed_sd", "near_best",
                                                                           "vs_best"]
    assert head.index("kl") < head.index("top1") < head.index("flip") < head.index("lost") < head.index("mean_acc")

    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert "40 documents per task" in md and "≈best" in md and "paired test" in md
    table = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("|")]
    cols = table[0]
    good = next(r for r in table if r[0] == "good")
    assert good[cols.index("±")] == "0.014" and good[cols.index("≈best")] == "best" and float(good[cols.index("flip")]) == 0.05

    html = (tmp_path / "lb" / "index.html").read_text()
    assert "40 documents per task" in html and "≈best</th>" in html and "flip</th>" in html
    assert '<td data-v="1" class="">≈</td>' in html and '<td data-v="0" class="">best</td>' in html


def test_a_cell_without_side_file_is_not_marked(results):
    write_record(results, _rec("nose", 0.2, accs=(0.69, 0.69)))  # a record without per-document outcomes
    df, _, _ = leaderboard.write(results, results.parent / "lb")
    marks = dict(zip(df["method"] + df["target"].astype(str), df["near_best"], strict=True))
    assert marks["nose0.2"] is None and marks["good0.2"] == "best" and marks["bad0.2"] == ""
    assert df.set_index("method").loc["nose", "flip"] is None or math.isnan(df.set_index("method").loc["nose", "flip"])


def _by_metric(c: compare.Comparison) -> dict[str, compare.Row]:
    return {r.metric: r for r in c.rows}


def test_compare_methods_rows_and_verdicts(results):
    (c,) = compare.compare("bad", "good", str(results), ratios=[0.2])
    rows = _by_metric(c)
    assert list(rows) == ["arc_easy (acc_norm)", "boolq (acc)", "mean_acc", "perplexity", "KL to dense",
                          "top-1 agreement", "achieved ratio (%)", "params (M)", "prefill (ms)", "decode (tokens/s)"]
    acc = rows["mean_acc"]
    assert (acc.a, acc.b, acc.diff) == pytest.approx((0.40, 0.70, 0.30))
    task_se = math.sqrt((12 - 40 * 0.3**2) / 39 / 40)  # 12 of 40 documents flip, all towards B
    assert acc.se == pytest.approx(task_se / math.sqrt(2)) and acc.verdict == "B better"
    assert rows["arc_easy (acc_norm)"].se == pytest.approx(task_se)
    assert rows["arc_easy (acc_norm)"].p_mcnemar == pytest.approx(2 / 2**12)
    assert acc.p_mcnemar == pytest.approx(stats.mcnemar(0, 24))
    assert rows["perplexity"].diff == pytest.approx(-70.0) and rows["perplexity"].se is None
    assert rows["perplexity"].verdict == "" and rows["params (M)"].verdict == ""

    (c,) = compare.compare("good", "bad", str(results), ratios=[0.2])
    assert _by_metric(c)["mean_acc"].verdict == "A better"
    # above a guess (arc_easy 4 choices, boolq 2): good +0.325, bad 0.15 and -0.10 -> +0.025, within noise
    (note,) = [n for n in c.notes if "uniform guess" in n]
    bad_se = math.hypot(math.sqrt(0.4 * 0.6 / 39 * 40 / 40), math.sqrt(0.4 * 0.6 / 39)) / 2
    assert "A +0.325 ± " in note and f"B +0.025 ± {bad_se:.3f} (cannot be told from guessing)" in note


def test_compare_pairs_seeds_and_the_dense_model(results):
    (c,) = compare.compare("close", "close", str(results))
    assert "seeds 0,1" in c.title and _by_metric(c)["mean_acc"].seed_sd == 0.0
    (c,) = compare.compare("good", "close", str(results))  # good has seed 0 only: one pair
    row = _by_metric(c)["mean_acc"]
    assert row.diff == pytest.approx(-0.025) and row.verdict == "within noise" and row.seed_sd is None
    c12, c40 = compare.compare("dense", "bad", str(results))  # dense stands at every ratio of the other
    assert "ratio 20.0%" in c12.title and "ratio 40.0%" in c40.title
    assert _by_metric(c40)["mean_acc"].diff == pytest.approx(-0.40)


def test_a_knob_variant_is_named_by_its_label_or_its_file_tag(results, capsys):
    variant = dataclasses.replace(_rec("good", 0.2, accs=(0.6, 0.6)), knob_overrides={"rank": 8},
                                  key="tiny-good-rank8")
    _write(results, variant)
    tag = method_tag(variant)
    assert tag.startswith("good+") and len(tag) == len("good+") + 6
    assert record_path(results, variant).name.startswith(f"{tag}__r0.200__s0__")  # the name the files carry
    (by_tag,) = compare.compare("good", tag, str(results))
    (by_label,) = compare.compare("good", "good (rank=8)", str(results))
    assert _by_metric(by_tag)["mean_acc"].diff == pytest.approx(-0.1) == _by_metric(by_label)["mean_acc"].diff
    assert f"B = {tag} = good (rank=8)" in by_tag.title and "B = good (rank=8) —" in by_label.title
    assert main(["compare", "good", "good+000000", "--results-dir", str(results)]) == 2
    assert f"{tag} = good (rank=8)" in capsys.readouterr().err  # the error lists the tag beside its label


def test_compare_two_record_files(results):
    a, b = (str(record_path(results, r)) for r in (RECORDS[1], RECORDS[2]))
    (c,) = compare.compare(a, b)
    assert "good @ 20.0% seed 0" in c.title and "close @ 20.0% seed 0" in c.title
    row = _by_metric(c)["mean_acc"]
    assert row.diff == pytest.approx(-0.025) and row.verdict == "within noise"
    (c,) = compare.compare(str(record_path(results, RECORDS[1])), str(record_path(results, RECORDS[4])))
    assert _by_metric(c)["mean_acc"].verdict == "A better"  # paired: 3 documents a task, all one way


def test_cli_compare_prints_the_table(results, capsys):
    assert main(["compare", "bad", "good", "--results-dir", str(results), "--ratio", "0.2"]) == 0
    out = capsys.readouterr().out
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 2}
    assert "B better" in lines["mean_acc"] and "+0.300" in lines["mean_acc"] and "0.052" in lines["mean_acc"]
    assert "-70.00" in lines["perplexity"]
    assert "40 documents per task" in out


@pytest.mark.parametrize("args, needle", [
    (["nosuch", "good"], "no records of method 'nosuch'"),
    (["good", "bad", "--ratio", "0.3"], "share no ratio and seed at --ratio 0.3"),
    (["good", "bad", "--model", "other"], "no records of method 'good'"),
    (["good", "missing.json"], "give two method names or two record files"),
    (["a.json", "b.json"], "not a readable slimbench record"),
    (["good", "bad", "--without", "boolq,nosuch"], "--without nosuch: no such task in these records; they have "
                                                  "arc_easy, boolq"),
    (["good", "bad", "--without", "arc_easy,boolq"], "leaves no task to compare"),
])
def test_cli_compare_bad_input_is_one_line_and_exit_2(results, args, needle, capsys):
    assert main(["compare", *args, "--results-dir", str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err


def test_cli_compare_asks_for_a_model_when_two_have_both_methods(results, capsys):
    for r in (_rec("good", 0.2, model="tiny-2"), _rec("bad", 0.2, model="tiny-2")):
        _write(results, r)
    assert main(["compare", "good", "bad", "--results-dir", str(results)]) == 2
    assert "pick one with --model and --suite" in capsys.readouterr().err
    assert main(["compare", "good", "bad", "--results-dir", str(results), "--model", "tiny-2"]) == 0


def test_a_collapsed_cell_is_marked_and_not_ranked():
    from bench.leaderboard import frame
    from bench.records import Record

    def rec(method, ratio, ppl, acc):
        r = Record(model={"name": "m"}, method=method, knobs={}, knob_overrides={}, target_ratio=ratio, seed=0,
                   suite={"name": "quick"}, key=method, environment={}, started="")
        r.metrics = {"perplexity": ppl, "mean_acc": acc,
                     "tasks": {"piqa": {"acc": acc, "acc_stderr": 0.01, "main": "acc"}}}
        r.budget = {"achieved_ratio": ratio, "target_ratio": ratio, "within_tolerance": True}
        return r

    df = frame([rec("dense", 0.0, 20.0, 0.6), rec("a", 0.1, 30.0, 0.5), rec("b", 0.1, 2500.0, 0.55)])
    by = df.set_index("method")
    assert by.loc["a", "status"] == "ok" and by.loc["a", "near_best"] == "best"
    assert by.loc["b", "status"] == "collapsed: ppl 125x dense" and by.loc["b", "near_best"] is None


def test_compare_leaves_out_a_latency_in_doubt(tmp_path):
    """The leaderboard's rule, in `bench compare` too: a side whose latency repeats disagree gives no figure."""
    good, noisy = _rec("good", 0.2), _rec("noisy", 0.2)
    good.metrics["latency_detail"] = {"prefill_s": [0.10, 0.11], "decode_s": [1.0, 1.01]}
    noisy.metrics["latency_detail"] = {"prefill_s": [5.93, 3.80, 10.43], "decode_s": [73.7, 67.7, 53.8]}
    for r in (_rec("dense", 0.0, ppl=10.0), good, noisy):
        _write(tmp_path, r)
    (c,) = compare.compare("good", "noisy", str(tmp_path))
    rows = _by_metric(c)
    assert rows["prefill (ms)"].a == 100.0 and rows["prefill (ms)"].b is None and rows["prefill (ms)"].diff is None
    assert rows["perplexity"].b == 20.0  # the rest of the record is compared as before


def test_compare_shows_but_does_not_compare_speeds_from_other_hardware(tmp_path):
    """A CPU record against a GPU one: quality is compared as ever; prefill and decode are shown for each side but
    get no difference, and a note names the two devices."""
    cpu, gpu = _rec("cpu_run", 0.2), _rec("gpu_run", 0.2, ppl=18.0)
    cpu.environment = {"hardware": {"device": "cpu", "device_name": "AMD EPYC"}}
    gpu.environment = {"hardware": {"device": "cuda", "device_name": "NVIDIA H200"}}
    gpu.metrics["prefill_ms"] = 20.0
    for r in (_rec("dense", 0.0, ppl=10.0), cpu, gpu):
        _write(tmp_path, r)
    (c,) = compare.compare("cpu_run", "gpu_run", str(tmp_path))
    rows = _by_metric(c)
    assert (rows["prefill (ms)"].a, rows["prefill (ms)"].b, rows["prefill (ms)"].diff) == (100.0, 20.0, None)
    assert rows["decode (tokens/s)"].diff is None and rows["perplexity"].diff == pytest.approx(-2.0)
    assert "Prefill and decode not compared: B measured on NVIDIA H200, A on AMD EPYC." in c.notes


def _windowed(method: str, nll: list[float], kl: list[float], sha: str = "w1", seed: int = 0) -> Record:
    """A record whose perplexity and KL are the means of its per-window figures, as the evaluator writes them."""
    r = _rec(method, 0.2, seed, ppl=math.exp(sum(nll) / len(nll)))
    r.metrics["perplexity_detail"] = {"nll": sum(nll) / len(nll), "window_nll": nll}
    r.metrics["closeness"] = {"kl_mean": sum(kl) / len(kl), "top1_agreement": 0.5, "window_kl": kl,
                              "window_top1": [0.5] * len(kl), "reference": {"windows_sha": sha}}
    return r


def test_perplexity_and_kl_are_paired_over_windows_with_students_t():
    base = [3.0, 3.4, 2.8, 3.1]
    a = _windowed("a", base, [0.5, 0.7, 0.4, 0.6])
    # B - A per window: mean 0.25, SE 0.119: 2.1 SE, beyond 1.96 but within t(3) = 3.18, so within noise
    b = _windowed("b", [x + d for x, d in zip(base, (0.1, 0.5, 0.0, 0.4), strict=True)], [0.6, 0.8, 0.5, 0.7])
    rows = {r.metric: r for r in compare.rows([a], [b])}
    d = stats.paired_diff(base, b.metrics["perplexity_detail"]["window_nll"])
    assert d.diff == pytest.approx(0.25) and 1.96 < d.diff / d.se < compare.t_critical(3) == pytest.approx(3.182, abs=1e-3)
    ppl = rows["perplexity"]
    assert ppl.windows == 4 and ppl.verdict == "within noise"
    mean = sum(base) / 4
    assert ppl.diff == pytest.approx(math.exp(mean + 0.25) - math.exp(mean))
    assert ppl.se == pytest.approx(math.sqrt(math.exp(mean) * math.exp(mean + 0.25)) * d.se)  # delta method
    kl = rows["KL to dense"]  # every window 0.1 worse: SE 0, B clearly worse
    assert kl.diff == pytest.approx(0.1) and kl.se == pytest.approx(0.0, abs=1e-12) and kl.verdict == "A better"
    assert rows["top-1 agreement"].verdict == "within noise"  # equal everywhere
    # a consistent shift of every window is a verdict, however small
    c = _windowed("c", [x + 0.01 for x in base], [0.5, 0.7, 0.4, 0.6])
    assert {r.metric: r for r in compare.rows([a], [c])}["perplexity"].verdict == "A better"


def test_windows_pair_only_when_both_records_scored_the_same_windows():
    a = _windowed("a", [3.0, 3.4, 2.8, 3.1], [0.5, 0.7, 0.4, 0.6])
    other = _windowed("b", [3.5, 3.9, 3.3, 3.6], [0.6, 0.8, 0.5, 0.7], sha="w2")
    rows = {r.metric: r for r in compare.rows([a], [other])}
    assert rows["perplexity"].se is None and rows["perplexity"].verdict == "" and rows["perplexity"].windows is None
    old = _rec("old", 0.2)  # written before windows were kept
    (c,) = [compare._comparison("t", [a], [old], [None], [None])]
    assert {r.metric: r for r in c.rows}["KL to dense"].se is None
    assert any("--rescore" in n for n in c.notes)
    (c,) = [compare._comparison("t", [a], [_windowed("b", [3.5] * 4, [0.6] * 4)], [None], [None])]
    assert any("paired over the 4 perplexity windows" in n and "t(3) = 3.18" in n for n in c.notes)


def test_leaderboard_ppl_marks_are_paired_over_the_windows(tmp_path):
    base = [3.0, 3.4, 2.8, 3.1]
    noisy = [x + d for x, d in zip(base, (0.1, 0.5, 0.0, 0.4), strict=True)]  # +0.25 on average, within t(3)
    records = [_rec("dense", 0.0, ppl=10.0), _windowed("a", base, [0.5] * 4),
               _windowed("noisy", noisy, [0.5] * 4),
               _windowed("shifted", [x + 0.01 for x in base], [0.5] * 4),  # every window worse: clearly worse
               _rec("old", 0.2, ppl=30.0),  # written before windows were kept: no mark
               _windowed("collapsed", [8.0] * 4, [5.0] * 4),  # ppl 2981 > 100x dense: not ranked
               # seed 0 lacks windows: the mark pairs the seed that has them (all seeds score the same windows)
               _rec("mixed", 0.2, 0, ppl=40.0), _windowed("mixed", [x + 0.3 for x in base], [0.5] * 4, seed=1)]
    for r in records:
        write_record(tmp_path / "results", r)
    df, _, _ = leaderboard.write(tmp_path / "results", tmp_path / "lb")
    marks = {(r.method, r.seed): (r.ppl_near_best, r.ppl_vs_best) for r in df.itertuples()}
    assert marks["a", 0] == ("best", None) and marks["dense", 0] == (None, None)
    assert marks["noisy", 0][0] == "≈" and marks["shifted", 0][0] == ""
    assert marks["old", 0] == (None, None) and marks["collapsed", 0] == (None, None)
    ppl_a, ppl_shifted = math.exp(sum(base) / 4), math.exp(sum(base) / 4 + 0.01)
    d = stats.paired_diff(base, noisy)
    se = math.sqrt(ppl_a * math.exp(sum(noisy) / 4)) * d.se  # the delta method, as bench compare shows it
    assert marks["noisy", 0][1] == f"{math.exp(sum(noisy) / 4) - ppl_a:+.2f}±{se:.2f}"
    assert marks["shifted", 0][1] == f"{ppl_shifted - ppl_a:+.2f}±0.00"
    # the mixed cell: its perplexity is the mean of both seeds, its test the windowed seed's shift (clearly worse)
    mixed = (40.0 + math.exp(sum(base) / 4 + 0.3)) / 2
    assert marks["mixed", 0] == marks["mixed", 1] == ("", f"{mixed - ppl_a:+.2f}±0.00")

    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    table = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("|")]
    cols = table[0]
    assert cols[cols.index("ppl") + 1:cols.index("ppl") + 3] == ["ppl≈best", "Δppl best (paired)"]
    assert next(r for r in table if r[0] == "noisy")[cols.index("ppl≈best")] == "≈"
    assert "t(windows - 1)" in md
    html = (tmp_path / "lb" / "index.html").read_text()
    assert "ppl≈best</th>" in html and '<td data-v="2" class=""></td>' in html  # clearly worse sorts last


def test_compare_without_a_task_pairs_mean_acc_over_the_rest(results):
    _write(results, _rec("yes", 0.2, accs=(0.60, 0.90)))  # ahead only through boolq
    (c,) = compare.compare("good", "yes", str(results), ratios=[0.2])
    assert _by_metric(c)["mean_acc"].diff == pytest.approx(0.05)
    (c,) = compare.compare("good", "yes", str(results), ratios=[0.2], without=["boolq"])
    rows = _by_metric(c)
    assert "boolq (acc)" not in rows and "arc_easy (acc_norm)" in rows
    acc = rows["mean_acc"]
    assert (acc.a, acc.b, acc.diff) == pytest.approx((0.70, 0.60, -0.10))
    assert acc.se == pytest.approx(math.sqrt((4 - 40 * 0.1**2) / 39 / 40))  # 4 of 40 arc_easy documents flip
    assert acc.verdict == "A better" and acc.p_mcnemar == pytest.approx(stats.mcnemar(4, 0))
    assert any("Left out by --without: boolq" in n for n in c.notes)
    (c,) = compare.compare("good", "yes", str(results), ratios=[0.2])  # the records themselves are untouched
    assert _by_metric(c)["mean_acc"].diff == pytest.approx(0.05)


def test_cli_compare_without_prints_the_rest(results, capsys):
    a, b = (str(record_path(results, r)) for r in (RECORDS[1], RECORDS[5]))
    assert main(["compare", a, b, "--without", "boolq"]) == 0
    out = capsys.readouterr().out
    assert "boolq (acc)" not in out and "Left out by --without: boolq" in " ".join(out.split())
