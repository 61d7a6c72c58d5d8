"""The leaderboard's "What training buys" section: every recorded curve, and the figure it has to beat."""

from __future__ import annotations

import re

import pytest

from bench import curves, leaderboard
from bench.records import write_record
from tests.test_report import PNG_MAGIC, _rec

POINTS = [{"tokens": 0, "seconds": 0.0, "kl_heldout": 4.0, "ppl": 90.0},
          {"tokens": 1_000, "seconds": 5.0, "kl_heldout": 2.0, "ppl": 40.0},
          {"tokens": 4_000, "seconds": 21.0, "kl_heldout": 1.25, "ppl": 31.5}]


def _trained(seed: int = 0, ppl: float = 12.0, **kw):
    r = _rec("trainer", 0.2, seed, ppl=ppl, overrides={"train_tokens": 4000}, **kw)
    r.details = {"curve": POINTS, "curve_dense_ppl": 9.5,
                 "train": {"tokens_per_second": 190.0, "autocast": "off"},
                 "train_data": {"train_data": "corpus", "passes": 3}}
    r.metrics["closeness"] = {"kl_mean": 1.1}
    r.cost = {"train_tokens": 4000}
    r.environment = {"hardware": {"device": "cpu"}}
    return r


RECORDS = [_rec("dense", 0.0, ppl=10.0), _rec("alpha", 0.2, ppl=20.0), _rec("beta", 0.2, ppl=15.0),
           _rec("gamma", 0.2, ppl=5_000.0),  # collapsed: not a figure to beat
           _rec("trainer", 0.2, ppl=11.0),  # the same method untrained-by-default is not its own rival
           _rec("alpha", 0.2, 1, ppl=8.0),  # another seed: not compared with seed 0
           _trained(), _trained(seed=2, ppl=30.0)]


def test_each_curve_is_set_against_the_best_other_method_at_its_ratio_and_seed():
    found = curves.runs(RECORDS, leaderboard.frame(RECORDS))
    assert [(c["method"], c["seed"]) for c in found] == [("trainer", 0), ("trainer", 2)]
    first, lone = found
    assert first["rival"]["method"] == "beta" and first["rival"]["ppl"] == 15.0
    assert first["points"] == POINTS and first["tokens"] == 4000 and first["passes"] == 3
    assert "ahead of it" in curves.verdict(first) and "perplexity 12.00, KL 1.10" in curves.verdict(first)
    assert lone["rival"] is None and "no other method" in curves.verdict(lone)
    behind = curves.runs([*RECORDS[:3], _trained(ppl=16.0)], leaderboard.frame([*RECORDS[:3], _trained(ppl=16.0)]))
    assert "behind it" in curves.verdict(behind[0])


def test_markdown_lists_every_point_and_is_absent_without_curves():
    text = re.sub(" +", " ", curves.markdown(curves.runs(RECORDS, leaderboard.frame(RECORDS))))
    assert text.startswith("## What training buys")
    assert "| 1,000 | 2.000 | 40.00 | 5 |" in text and "| 4,000 | 1.250 | 31.50 | 21 |" in text
    assert "trainer at 20 %, seed 0, 4k tokens (cpu, autocast off)" in text
    assert "The table's figures are on the held-out windows, where the dense model's perplexity is 9.50." in text
    assert curves.markdown(curves.runs(RECORDS[:5], leaderboard.frame(RECORDS[:5]))) == ""


def test_leaderboard_files_carry_the_section_and_drop_a_stale_figure(tmp_path):
    for r in RECORDS:
        write_record(tmp_path / "results", r)
    _, _, paths = leaderboard.write(tmp_path / "results", tmp_path / "lb")
    png = tmp_path / "lb" / "training_curve.png"
    assert png in paths and png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    html = (tmp_path / "lb" / "index.html").read_text()
    assert "<h2>What training buys</h2>" in html and "<td>4,000</td><td>1.250</td>" in html
    assert "## What training buys" in (tmp_path / "lb" / "leaderboard.md").read_text()
    for f in (tmp_path / "results").rglob("trainer*"):
        f.unlink()
    leaderboard.write(tmp_path / "results", tmp_path / "lb")
    assert not png.exists() and "What training buys" not in (tmp_path / "lb" / "index.html").read_text()


@pytest.mark.parametrize("n, text", [(None, "-"), (999, "999"), (16_384, "16.4k"), (40_000_000, "40M")])
def test_token_counts_read_as_people_write_them(n, text):
    assert curves._tokens(n) == text


def test_two_budgets_of_one_cell_get_their_own_legend_entries():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    longer = _trained()
    longer.knob_overrides = {"train_tokens": 16000}
    longer.cost = {"train_tokens": 16000}
    recs = [*RECORDS[:3], _trained(), longer]
    found = curves.runs(recs, leaderboard.frame(recs))
    fig, ax = plt.subplots()
    curves.draw(ax, found)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close(fig)
    assert len(labels) == len(set(labels)) == 2, labels
    assert any("4k tokens" in t for t in labels) and any("16k tokens" in t for t in labels)


def test_two_corpora_of_one_budget_are_told_apart_in_legend_titles_and_verdicts():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for name, size, docs in (("small-corpus", 500, 300), ("big-corpus", 2_000_000, 0)):
        r = _trained()
        r.details["train_data"] |= {"corpus": name, "corpus_tokens": size, "documents": docs}
        r.knob_overrides = {"train_tokens": 4000, "corpus": name}
        runs.append(r)
    recs = [*RECORDS[:3], *runs]
    found = curves.runs(recs, leaderboard.frame(recs))
    fig, ax = plt.subplots()
    curves.draw(ax, found)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close(fig)
    assert sorted(labels) == ["trainer 20 % s0, 4k tokens of big-corpus (cpu)",
                              "trainer 20 % s0, 4k tokens of small-corpus (cpu)"]
    assert [curves.title(c).split(", ")[2] for c in found] == ["4k tokens of big-corpus (cpu",
                                                                "4k tokens of small-corpus (cpu"]
    assert "trained on corpus big-corpus (2M distinct tokens), 0.2 % of one pass (no token seen twice)" in \
        curves.verdict(found[0])
    small = curves.verdict(found[1])
    assert "trained on corpus small-corpus (500 distinct tokens), 5.0 passes" in small  # 4000 / (500 + 300 EOS)
    old = [*RECORDS[:3], _trained()]  # an older record: no corpus size, only the passes begun
    assert curves.verdict(curves.runs(old, leaderboard.frame(old))[0]).endswith("corpus, 3 passes begun, 190 tokens/s.")


def test_two_learning_rate_schedules_of_one_budget_are_told_apart():
    runs = []
    for shape, lr in (("constant", 1e-3), ("cosine", 1e-3), ("constant", 3e-4)):
        r = _trained()
        r.details["train"] = dict(r.details["train"], lr=lr, lr_schedule={"shape": shape, "warmup": 0.0})
        r.knob_overrides = {"train_tokens": 4000, "lr": lr, "lr_schedule": shape}
        runs.append(r)
    old = _trained()  # a record from before schedules: constant at its recorded rate
    old.details["train"] = {k: v for k, v in old.details["train"].items() if k != "lr_schedule"} | {"lr": 1e-3}
    recs = [*RECORDS[:3], *runs]
    titles = sorted(curves.title(c) for c in curves.runs(recs, leaderboard.frame(recs)))
    assert len(set(titles)) == 3
    assert [t.split(" (")[0].split("4k tokens")[1] for t in titles] == ["", ", lr 0.0003 constant", ", lr 0.001 cosine"]
    assert curves.title(curves.runs([*RECORDS[:3], old], leaderboard.frame([*RECORDS[:3], old]))[0]) == titles[0]


def test_the_held_out_sample_is_named_and_a_small_one_flagged():
    few, many = _trained(), _trained(seed=1)
    few.details["kl_windows"], many.details["kl_windows"] = {"heldout": 2}, {"heldout": 8}
    recs = [*RECORDS[:3], few, many]
    text = curves.markdown(curves.runs(recs, leaderboard.frame(recs)))
    assert ("The table's figures are on 2 held-out calibration windows, where the dense model's perplexity is 9.50; "
            "a small sample: compare runs by the suite's figures.") in text
    assert "on 8 held-out calibration windows, where the dense model's perplexity is 9.50." in text
