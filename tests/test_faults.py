"""Faults in a sweep: kill -9 loses at most the cell in progress, a full disk keeps the previous record, and an
out-of-memory error or a collapsed model fails only its own cell."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from bench import records as records_mod
from bench import structure
from bench.budget import count_params
from bench.cli import main
from bench.records import load_records
from bench.registry import CompressionInfo, Method, Solution
from tests.conftest import registered


class _DropLast(Method):
    coarse = True

    def solve(self, adapter, ratio):
        last = adapter.block(adapter.num_blocks - 1)
        return Solution({"blocks": 1}, count_params(adapter.model) - count_params(last))

    def compress(self, model, adapter, calibration, solution):
        structure.apply(model, adapter, "remove_blocks", indices=[adapter.num_blocks - 1])
        return CompressionInfo()


class OutOfMemory(_DropLast):
    name = "test-oom"

    def compress(self, model, adapter, calibration, solution):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


class Collapses(_DropLast):
    name = "test-nan"

    def compress(self, model, adapter, calibration, solution):
        super().compress(model, adapter, calibration, solution)
        with torch.no_grad():
            adapter.final_norm().weight.fill_(float("nan"))
        return CompressionInfo()


class Fine(_DropLast):
    name = "test-fine"


@pytest.fixture
def plugins():
    with registered(OutOfMemory, Collapses, Fine):
        yield


def _args(tmp_path, model_dir):
    return ["--model", str(model_dir), "--results-dir", str(tmp_path / "results"), "--leaderboard-dir",
            str(tmp_path / "lb"), "--cache-dir", str(tmp_path / "cache"), "--tasks", "none", "--calib-samples", "4",
            "--calib-seq-len", "32", "--no-save"]


def test_oom_and_nan_fail_their_cells_and_the_rest_goes_on(tmp_path, tiny_model_dir, plugins):
    rc = main(["run", "--methods", "test-oom,test-nan,test-fine", "--ratio", "0.2", *_args(tmp_path, tiny_model_dir)])
    assert rc == 1
    by = {r.method: r for r in load_records(tmp_path / "results")[0]}
    assert by["test-oom"].status == "failed" and "OutOfMemoryError" in by["test-oom"].error
    assert by["test-nan"].status == "failed" and "collapsed" in by["test-nan"].error
    assert by["test-fine"].status == "ok" and by["dense"].status == "ok"


def test_a_full_disk_keeps_the_previous_record(tmp_path, tiny_model_dir, plugins, monkeypatch):
    assert main(["run", "--methods", "test-fine", "--ratio", "0.2", *_args(tmp_path, tiny_model_dir)]) == 0
    rec = next(r for r in load_records(tmp_path / "results")[0] if r.method == "test-fine")
    path = records_mod.record_path(tmp_path / "results", rec)
    before = path.read_bytes()

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(records_mod.os, "fsync", full)
    rec.error = "changed"
    with pytest.raises(OSError, match="No space"):
        records_mod.write_record(tmp_path / "results", rec)
    assert path.read_bytes() == before
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_an_atomically_written_record_has_the_usual_permissions(tmp_path):
    """The temporary file behind the atomic write is private (0600); the record it becomes must not be."""
    rec = records_mod.Record(model={"name": "tiny"}, method="alpha", knobs={}, knob_overrides={}, target_ratio=0.2,
                             seed=0, suite={"name": "quick"})
    path = records_mod.write_record(tmp_path, rec)
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_kill_9_loses_at_most_the_cell_in_progress(tmp_path, tiny_model_dir):
    sweep = tmp_path / "grid.toml"
    sweep.write_text(f'models = ["{tiny_model_dir}"]\nmethods = ["svdllm", "shortgpt", "basis"]\n'
                     'ratios = [0.1, 0.2, 0.3]\ntasks = "none"\ncalib_samples = 4\ncalib_seq_len = 32\n')
    cmd = [sys.executable, "-m", "bench.cli", "sweep", str(sweep), "--results-dir", str(tmp_path / "results"),
           "--leaderboard-dir", str(tmp_path / "lb"), "--cache-dir", str(tmp_path / "cache"), "--no-save"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = tmp_path / "results"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(results.rglob("*.json"))) < 3:  # dense and two cells are done
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*.json")}
    assert 3 <= len(before) < 10, "the kill should land partway through the grid"
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    recs, problems = load_records(results)
    assert not problems
    cells = [(r.method, r.target_ratio) for r in recs]
    assert len(cells) == len(set(cells)) == 10  # dense + 3 methods x 3 ratios, each once
    assert all(r.status == "ok" for r in recs)
    assert {p: p.stat().st_mtime_ns for p in before} == before  # finished cells were not recomputed
