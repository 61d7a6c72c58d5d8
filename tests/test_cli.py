"""The bench CLI: bad input is one line and exit 2; a failing method is recorded and the others go on."""

import json

import pytest

from bench import structure
from bench.budget import count_params
from bench.cli import main
from bench.records import load_records
from bench.registry import CompressionInfo, Method, Solution
from tests.conftest import registered


class DropLast(Method):
    """Removes the last block: a plugin defined outside the methods package."""

    name = "test-droplast"
    coarse = True

    def solve(self, adapter, ratio):
        last = adapter.block(adapter.num_blocks - 1)
        return Solution({"blocks": 1}, count_params(adapter.model) - count_params(last))

    def compress(self, model, adapter, calibration, solution):
        structure.apply(model, adapter, "remove_blocks", indices=[adapter.num_blocks - 1])
        return CompressionInfo()


class Explodes(DropLast):
    name = "test-explodes"

    def compress(self, model, adapter, calibration, solution):
        raise RuntimeError("boom")


class Reports(DropLast):
    """Reports how far it has got, as a long step (DeltaLLM's training) does."""

    name = "test-reports"

    def compress(self, model, adapter, calibration, solution):
        calibration.report("half way")
        return super().compress(model, adapter, calibration, solution)


@pytest.fixture
def plugins():
    with registered(DropLast, Explodes, Reports):
        yield


def _run(tmp_path, model_dir, *extra):
    return main(["run", "--model", str(model_dir), "--results-dir", str(tmp_path / "results"),
                 "--leaderboard-dir", str(tmp_path / "lb"), "--cache-dir", str(tmp_path / "cache"),
                 "--tasks", "arc_easy", "--limit", "4", "--calib-samples", "4", "--calib-seq-len", "64", *extra])


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "--methods", "nosuch"], "unknown method 'nosuch'"),
        (["run", "--model", "no/such/model/dir"], "not found"),
        (["run", "--model", "nosuchalias"], "unknown model"),
        (["run", "--ratio", "1.5"], "outside (0, 1)"),
        (["run", "--ratio", "abc"], "give numbers"),
        (["run", "--set", "oops"], "METHOD.KNOB=VALUE"),
        (["run", "--dtype", "int3"], "unknown dtype"),
        (["run", "--device", "tpu"], "unknown device"),
        (["run", "--methods", "shortgpt", "--train-tokens", "100"], "none of shortgpt trains"),
        (["run", "--methods", "svdllm", "--ratio", "0.99"], "beyond reach"),
        (["leaderboard", "--results-dir", "/nonexistent/results"], "no results folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, needle, capsys, tmp_path, tiny_model_dir):
    if args[0] == "run" and "--model" not in args:
        args = [*args, "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err


def test_cuda_refused_without_gpu(capsys, tmp_path, tiny_model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["run", "--model", str(tiny_model_dir), "--device", "cuda", "--cache-dir", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_unknown_task_and_knob(capsys, tmp_path, tiny_model_dir, plugins):
    assert _run(tmp_path, tiny_model_dir, "--methods", "test-droplast", "--tasks", "no_such_task") == 2
    assert "no_such_task" in capsys.readouterr().err
    assert _run(tmp_path, tiny_model_dir, "--methods", "test-droplast", "--set", "test-droplast.rank=3") == 2
    assert "has no knob rank" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()  # refused before any work


def test_failing_method_is_recorded_and_others_go_on(tmp_path, tiny_model_dir, plugins):
    rc = _run(tmp_path, tiny_model_dir, "--methods", "test-explodes,test-droplast", "--ratio", "0.2")
    assert rc == 1
    records, problems = load_records(tmp_path / "results")
    assert not problems
    by = {r.method: r for r in records}
    assert set(by) == {"dense", "test-explodes", "test-droplast"}
    assert by["test-explodes"].status == "failed" and "boom" in by["test-explodes"].error
    ok = by["test-droplast"]
    assert ok.status == "ok"
    assert ok.budget["params_compressed"] == ok.solution["predicted_params"]
    board = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert "failed: RuntimeError: boom" in board and "test-droplast" in board


def test_a_methods_progress_reports_reach_the_log(tmp_path, tiny_model_dir, plugins, capsys):
    """Without a terminal (a log file, a batch job) each report of a long step is a line of its own."""
    assert _run(tmp_path, tiny_model_dir, "--methods", "test-reports", "--ratio", "0.2") == 0
    assert "test-reports @ 0.20 seed 0: compressing (test-reports): half way" in capsys.readouterr().out


def test_rerun_reuses_complete_records_and_survives_a_corrupt_file(tmp_path, tiny_model_dir, plugins, capsys):
    assert _run(tmp_path, tiny_model_dir, "--methods", "test-droplast", "--ratio", "0.2") == 0
    first = {p: p.stat().st_mtime_ns for p in (tmp_path / "results").rglob("*.json")}
    (tmp_path / "results" / "garbage.json").write_text("{not json")
    (tmp_path / "results" / "foreign.json").write_text(json.dumps({"hello": 1}))
    assert _run(tmp_path, tiny_model_dir, "--methods", "test-droplast", "--ratio", "0.2") == 0
    assert {p: p.stat().st_mtime_ns for p in first} == first  # nothing recomputed
    out = capsys.readouterr().out
    assert "garbage.json: skipped" in out and "foreign.json: skipped" in out
    assert main(["leaderboard", "--results-dir", str(tmp_path / "results"), "--out", str(tmp_path / "lb2")]) == 0
    csv = (tmp_path / "lb2" / "leaderboard.csv").read_text()
    assert csv.count("test-droplast") == 1 and csv.count("dense") == 1


def test_run_table_shows_the_paired_flip_rate(tmp_path, tiny_model_dir, plugins, capsys):
    """The table `bench run` prints reads the cells' per-document side files, as the leaderboard does."""
    import pandas as pd

    assert _run(tmp_path, tiny_model_dir, "--methods", "test-droplast", "--ratio", "0.2") == 0
    lines = capsys.readouterr().out.splitlines()
    head = [c.strip() for c in next(line for line in lines if line.startswith("┃ method")).split("┃")]
    row = next(line for line in lines if line.startswith("│ test-droplast")).split("│")
    flip = pd.read_csv(tmp_path / "lb" / "leaderboard.csv").set_index("method").loc["test-droplast", "flip"]
    assert flip == flip and f"{flip:.3f}" in row[head.index("flip")]  # a number, not the "-" of a missing side file


def test_records_hold_device_and_host_peaks_with_the_device_and_dtype(tmp_path, tiny_model_dir, plugins):
    """Issue 8: each phase's peak device and peak host memory, the device's name and the dtype are in the record,
    and the CSV leaderboard shows them."""
    import pandas as pd

    assert _run(tmp_path, tiny_model_dir, "--methods", "test-droplast", "--ratio", "0.2", "--device", "cpu") == 0
    records, _ = load_records(tmp_path / "results")
    by = {r.method: r for r in records}
    phases = [(by["test-droplast"].cost, "compress_peak"), *((r.metrics, "eval_peak") for r in records)]
    for part, phase in phases:
        device, host = part[f"{phase}_device_bytes"], part[f"{phase}_host_bytes"]
        assert type(device) is int and type(host) is int and host > 0
        assert device == host  # on CPU the device is host memory
        assert part[f"{phase}_device_source"] == "cpu: device is host memory"
    for r in records:
        assert r.metrics["peak_memory_bytes"] == r.metrics["eval_peak_device_bytes"]  # the old key stays
        assert r.environment["hardware"]["device_name"] and r.model["dtype"] == "float32"
    row = pd.read_csv(tmp_path / "lb" / "leaderboard.csv").set_index("method").loc["test-droplast"]
    assert row["compress_peak_host_MB"] == pytest.approx(by["test-droplast"].cost["compress_peak_host_bytes"] / 2**20)
    assert row["eval_peak_device_MB"] > 0 and row["eval_peak_host_MB"] > 0
    assert row["device_name"] == records[0].environment["hardware"]["device_name"] and row["dtype"] == "float32"


def test_a_leaderboard_that_fails_loses_no_record_and_says_how_to_redraw_it(tmp_path, tiny_model_dir, plugins,
                                                                             capsys, monkeypatch):
    """The run's records are written before the leaderboard is drawn: a drawing error (matplotlib refused a
    rounding-negative error bar once, after 100 minutes of training) is one clear line and exit 1, not a traceback,
    and `bench leaderboard` then draws it from the same records."""
    from bench import leaderboard

    def broken(*a, **k):
        raise ValueError("'xerr' must not contain negative values")

    with monkeypatch.context() as m:
        m.setattr(leaderboard, "write", broken)
        assert _run(tmp_path, tiny_model_dir, "--methods", "test-droplast", "--ratio", "0.2") == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "the leaderboard could not be written (ValueError: 'xerr' must not contain negative values)" in out
    assert "leaderboard NOT written" in out and "`bench leaderboard --results-dir" in out
    records, problems = load_records(tmp_path / "results")
    assert not problems and {r.method for r in records} == {"dense", "test-droplast"}
    assert all(r.status == "ok" for r in records)
    assert main(["leaderboard", "--results-dir", str(tmp_path / "results"), "--out", str(tmp_path / "lb")]) == 0
    assert "test-droplast" in (tmp_path / "lb" / "leaderboard.md").read_text()
