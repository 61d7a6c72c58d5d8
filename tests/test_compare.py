"""Standard errors in the leaderboard, the within-noise marker, and ``bench compare``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import compare, leaderboard
from bench.cli import main
from bench.compare import mean_acc_se, within_noise
from bench.records import Record, record_path, write_record

SE = 0.02  # every task's SE: mean of two tasks has SE sqrt(2 * 0.02^2) / 2 = 0.01414; two such cells 0.02


def _rec(method: str, ratio: float, seed: int = 0, accs=(0.7, 0.7), se: float | None = SE, ppl: float = 20.0,
         docs: int = 40, model: str = "tiny") -> Record:
    tasks = {"arc_easy": {"acc": accs[0] - 0.1, "acc_stderr": 0.3, "acc_norm": accs[0], "acc_norm_stderr": se,
                          "n": docs, "main": "acc_norm"},
             "boolq": {"acc": accs[1], "acc_stderr": se, "acc_norm": None, "acc_norm_stderr": None, "n": docs,
                       "main": "acc"}}
    params = round(100e6 * (1 - ratio))
    return Record(model={"name": model}, method=method, knobs={}, knob_overrides={}, target_ratio=ratio, seed=seed,
                  suite={"name": "quick"}, budget={"target_ratio": ratio, "achieved_ratio": ratio,
                                                   "within_tolerance": True, "params_compressed": params},
                  metrics={"params": params, "perplexity": ppl, "tasks": tasks, "mean_acc": sum(accs) / 2,
                           "prefill_ms": 100.0, "decode_tokens_per_s": 30.0})


RECORDS = [
    _rec("dense", 0.0, accs=(0.75, 0.75), ppl=10.0),
    _rec("good", 0.2, accs=(0.70, 0.70), ppl=20.0),
    _rec("close", 0.2, 0, accs=(0.67, 0.67), ppl=24.0),  # seeds average to 0.68: 0.02 below good, within noise
    _rec("close", 0.2, 1, accs=(0.69, 0.69), ppl=26.0),
    _rec("bad", 0.2, accs=(0.40, 0.40), ppl=90.0),  # 0.30 below good: clearly worse
    _rec("bad", 0.4, accs=(0.35, 0.35), ppl=95.0),  # alone at 40 %: the best there (under 100x dense: ranked)
]


@pytest.fixture
def results(tmp_path) -> Path:
    for r in RECORDS:
        write_record(tmp_path / "results", r)
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
    assert within_noise(0.70, 0.01414, 0.68, 0.01414) and not within_noise(0.70, 0.01414, 0.65, 0.01414)
    assert within_noise(0.7, None, 0.1, 0.01) is None


def test_leaderboard_has_se_seed_sd_and_marks_methods_within_noise_of_the_best(results, tmp_path):
    df, _, _ = leaderboard.write(results, tmp_path / "lb")
    rows = {(r.method, r.target, r.seed): r for r in df.itertuples()}
    assert rows["good", 0.2, 0].mean_acc_se == pytest.approx(math.sqrt(2) * SE / 2)
    marks = {(m, t): rows[m, t, 0].near_best for m, t, _ in rows}
    assert marks == {("dense", 0.0): None, ("good", 0.2): "best", ("close", 0.2): "≈", ("bad", 0.2): "",
                     ("bad", 0.4): "best"}
    assert rows["close", 0.2, 1].near_best == "≈"  # every seed row of the cell carries the mark
    assert rows["close", 0.2, 0].seed_sd == pytest.approx(math.sqrt(2) * 0.01)  # sd of 0.67 and 0.69
    assert math.isnan(rows["good", 0.2, 0].seed_sd)  # one seed: no spread

    csv = (tmp_path / "lb" / "leaderboard.csv").read_text().splitlines()
    head = csv[0].split(",")
    assert head[head.index("mean_acc") + 1:head.index("mean_acc") + 4] == ["mean_acc_se", "seed_sd", "near_best"]

    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert "40 documents per task" in md and "≈best" in md and "1.96·sqrt(SE₁² + SE₂²)" in md
    table = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("|")]
    cols = table[0]
    good = next(r for r in table if r[0] == "good")
    assert good[cols.index("±")] == "0.014" and good[cols.index("≈best")] == "best"
    assert next(r for r in table if r[0] == "close")[cols.index("seed sd")] == "0.014"

    html = (tmp_path / "lb" / "index.html").read_text()
    assert "40 documents per task" in html and "≈best</th>" in html and "±</th>" in html
    assert '<td data-v="1" class="">≈</td>' in html and '<td data-v="0" class="">best</td>' in html


def test_a_cell_without_se_is_not_marked():
    df = leaderboard.frame([*RECORDS, _rec("nose", 0.2, accs=(0.69, 0.69), se=None)])
    marks = dict(zip(df["method"] + df["target"].astype(str), df["near_best"], strict=True))
    assert marks["nose0.2"] is None and marks["good0.2"] == "best" and marks["bad0.2"] == ""
    assert df.loc[df["method"] == "nose", "mean_acc_se"].isna().all()
    best_unknown = leaderboard.frame([_rec("good", 0.2, se=None), _rec("bad", 0.2, accs=(0.4, 0.4))])
    assert best_unknown.set_index("method")["near_best"].to_dict() == {"good": "best", "bad": None}


def _by_metric(c: compare.Comparison) -> dict[str, compare.Row]:
    return {r.metric: r for r in c.rows}


def test_compare_methods_rows_and_verdicts(results):
    (c,) = compare.compare("bad", "good", str(results), ratios=[0.2])
    rows = _by_metric(c)
    assert list(rows) == ["arc_easy (acc_norm)", "boolq (acc)", "mean_acc", "perplexity", "achieved ratio (%)",
                          "params (M)", "prefill (ms)", "decode (tokens/s)"]
    acc = rows["mean_acc"]
    assert (acc.a, acc.b, acc.diff) == pytest.approx((0.40, 0.70, 0.30))
    assert acc.se == pytest.approx(0.02) and acc.verdict == "B better"
    assert rows["arc_easy (acc_norm)"].se == pytest.approx(math.sqrt(2) * SE)
    assert rows["perplexity"].diff == pytest.approx(-70.0) and rows["perplexity"].se is None
    assert rows["perplexity"].verdict == "" and rows["params (M)"].verdict == ""

    (c,) = compare.compare("good", "bad", str(results), ratios=[0.2])
    assert _by_metric(c)["mean_acc"].verdict == "A better"


def test_compare_pairs_seeds_and_the_dense_model(results):
    (c,) = compare.compare("close", "close", str(results))
    assert "seeds 0,1" in c.title and _by_metric(c)["mean_acc"].seed_sd == 0.0
    (c,) = compare.compare("good", "close", str(results))  # good has seed 0 only: one pair
    row = _by_metric(c)["mean_acc"]
    assert row.diff == pytest.approx(-0.03) and row.verdict == "within noise" and row.seed_sd is None
    c12, c40 = compare.compare("dense", "bad", str(results))  # dense stands at every ratio of the other
    assert "ratio 20.0%" in c12.title and "ratio 40.0%" in c40.title
    assert _by_metric(c40)["mean_acc"].diff == pytest.approx(-0.40)


def test_compare_two_record_files(results):
    a, b = (str(record_path(results, r)) for r in (RECORDS[1], RECORDS[2]))
    (c,) = compare.compare(a, b)
    assert "good @ 20.0% seed 0" in c.title and "close @ 20.0% seed 0" in c.title
    row = _by_metric(c)["mean_acc"]
    assert row.diff == pytest.approx(-0.03) and row.verdict == "within noise"


def test_cli_compare_prints_the_table(results, capsys):
    assert main(["compare", "bad", "good", "--results-dir", str(results), "--ratio", "0.2"]) == 0
    out = capsys.readouterr().out
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 2}
    assert "B better" in lines["mean_acc"] and "+0.300" in lines["mean_acc"] and "0.020" in lines["mean_acc"]
    assert "-70.00" in lines["perplexity"]
    assert "40 documents per task" in out


@pytest.mark.parametrize("args, needle", [
    (["nosuch", "good"], "no records of method 'nosuch'"),
    (["good", "bad", "--ratio", "0.3"], "share no ratio and seed at --ratio 0.3"),
    (["good", "bad", "--model", "other"], "no records of method 'good'"),
    (["good", "missing.json"], "give two method names or two record files"),
    (["a.json", "b.json"], "not a readable slimbench record"),
])
def test_cli_compare_bad_input_is_one_line_and_exit_2(results, args, needle, capsys):
    assert main(["compare", *args, "--results-dir", str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err


def test_cli_compare_asks_for_a_model_when_two_have_both_methods(results, capsys):
    for r in (_rec("good", 0.2, model="tiny-2"), _rec("bad", 0.2, model="tiny-2")):
        write_record(results, r)
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
