"""``bench run --rescore``: per-window figures added to older records from their checkpoints, only when they
reproduce the record."""

from __future__ import annotations

import shutil

import pytest

from bench import compare
from bench.cli import main
from bench.evaluate import closeness
from bench.records import load_records, record_path, write_record
from tests.test_cli import _run, plugins  # noqa: F401  the test-droplast plugin fixture

ARGS = ("--methods", "test-droplast", "--ratio", "0.3")


def _records(tmp_path) -> dict:
    records, problems = load_records(tmp_path / "results")
    assert not problems
    return {r.method: r for r in records}


def _strip(tmp_path) -> dict:
    """Remove the per-window lists, as records written before they were kept lack them; returns what was there."""
    kept = {}
    for name, rec in _records(tmp_path).items():
        kept[name] = (rec.metrics["perplexity_detail"].pop("window_nll"), rec.metrics["closeness"].pop("window_kl"),
                      rec.metrics["closeness"].pop("window_top1"))
        write_record(tmp_path / "results", rec)
    return kept


@pytest.fixture
def computed(tmp_path, tiny_model_dir, plugins):  # noqa: F811
    closeness._MEMORY.clear()
    assert _run(tmp_path, tiny_model_dir, *ARGS) == 0
    return tmp_path


def test_rescore_adds_the_windows_a_run_would_have_written(computed, tiny_model_dir, capsys):
    before = _records(computed)
    kept = _strip(computed)
    (c,) = compare.compare("dense", "test-droplast", str(computed / "results"))
    assert {r.metric: r for r in c.rows}["perplexity"].se is None
    capsys.readouterr()
    assert _run(computed, tiny_model_dir, *ARGS, "--rescore") == 0
    assert capsys.readouterr().out.count("per-window figures added from its checkpoint") == 2
    after = _records(computed)
    for name, (nll, kl, top1) in kept.items():
        rec = after[name]
        assert rec.metrics["perplexity_detail"]["window_nll"] == pytest.approx(nll, rel=1e-5)
        assert rec.metrics["closeness"]["window_kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
        assert rec.metrics["closeness"]["window_top1"] == pytest.approx(top1)
        assert len(nll) == rec.metrics["perplexity_detail"]["windows"]
        assert rec.details["rescored"]["fields"] == ["perplexity_detail.window_nll", "closeness.window_kl",
                                                    "closeness.window_top1"]
        # nothing else moved: same perplexity, KL, accuracy, key, finish time
        old = before[name]
        assert (rec.metrics["perplexity"], rec.metrics["closeness"]["kl_mean"], rec.metrics["mean_acc"], rec.key,
                rec.finished) == (old.metrics["perplexity"], old.metrics["closeness"]["kl_mean"],
                                  old.metrics["mean_acc"], old.key, old.finished)
    # the comparison now has paired SEs for perplexity and KL
    (c,) = compare.compare("dense", "test-droplast", str(computed / "results"))
    rows = {r.metric: r for r in c.rows}
    assert rows["perplexity"].se is not None and rows["KL to dense"].windows == after["dense"].metrics[
        "perplexity_detail"]["windows"]
    # a second --rescore has nothing to do
    capsys.readouterr()
    assert _run(computed, tiny_model_dir, *ARGS, "--rescore") == 0
    assert "per-window figures added" not in capsys.readouterr().out


def test_a_checkpoint_that_does_not_reproduce_its_record_is_reported_and_changes_nothing(computed, tiny_model_dir,
                                                                                          capsys):
    _strip(computed)
    rec = _records(computed)["test-droplast"]
    rec.metrics["perplexity"] *= 1.01  # the record says something its checkpoint does not give
    path = write_record(computed / "results", rec)
    text = path.read_text()
    capsys.readouterr()
    assert _run(computed, tiny_model_dir, *ARGS, "--rescore") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "not rescored: its checkpoint does not reproduce the record (perplexity" in out and "--force" in out
    assert path.read_text() == text
    assert "window_nll" in _records(computed)["dense"].metrics["perplexity_detail"]  # the other cell went on


def test_a_missing_checkpoint_is_reported(computed, tiny_model_dir, capsys):
    _strip(computed)
    rec = _records(computed)["test-droplast"]
    shutil.rmtree(rec.checkpoint)
    capsys.readouterr()
    assert _run(computed, tiny_model_dir, *ARGS, "--rescore") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "not rescored: no checkpoint of this cell is kept" in out
    assert "window_nll" not in _records(computed)["test-droplast"].metrics["perplexity_detail"]
    assert record_path(computed / "results", rec).exists()


@pytest.mark.parametrize("flag", ["--force", "--no-cache"])
def test_rescore_with_a_flag_that_reuses_nothing_is_refused(tmp_path, flag, capsys):
    assert main(["run", "--rescore", flag, "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--rescore adds figures to reused records" in err and flag in err
