"""``--executor ray`` on a local Ray instance (2 CPUs, shared by the module): the same records as the local
executor, a worker killed mid-cell retried with each cell present once, a cell failing for its own reasons
not retried, and two drivers on one results folder with no duplicate or half-written record."""

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import test_faults
from test_faults import _DropLast

from bench.cli import main
from bench.records import load_records
from bench.registry import OPERATIONAL
from methods import _delta_train as training
from methods.delta import DeltaLLM
from tests.conftest import registered


@dataclass
class _Marker:
    marker: str = ""  # a file the test methods use to remember or count their calls


class DiesOnce(_DropLast):
    """SIGKILLs its own worker the first time any cell of it runs (the marker file says it happened)."""

    name = "test-dies-once"
    Knobs = _Marker

    def compress(self, model, adapter, calibration, solution):
        try:
            os.close(os.open(self.knobs.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return super().compress(model, adapter, calibration, solution)
        os.kill(os.getpid(), signal.SIGKILL)


class Raises(_DropLast):
    """Fails for its own reasons, counting its calls in the marker file."""

    name = "test-raises"
    Knobs = _Marker

    def compress(self, model, adapter, calibration, solution):
        with open(self.knobs.marker, "a") as f:
            f.write("called\n")
        raise RuntimeError("this method always fails")


class DeltaDiesMidTraining(DeltaLLM):
    """DeltaLLM whose worker is SIGKILLed at training step 5 the first time (the marker file says it happened)."""

    name = "test-delta-dies"

    @dataclass
    class Knobs(DeltaLLM.Knobs):
        marker: str = field(default="", metadata=OPERATIONAL)

    def compress(self, model, adapter, calibration, solution):
        if not os.path.exists(self.knobs.marker):
            schedule = training.replace_probability

            def die_at_5(step, *args):
                if step == 5:
                    open(self.knobs.marker, "w").close()
                    os.kill(os.getpid(), signal.SIGKILL)
                return schedule(step, *args)

            training.replace_probability = die_at_5  # in this worker only: the retry runs in a fresh one
        return super().compress(model, adapter, calibration, solution)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    for module in (sys.modules[__name__], test_faults):  # workers cannot import the test modules: ship them
        ray.cloudpickle.register_pickle_by_value(module)
    yield ray
    ray.shutdown()


@pytest.fixture
def plugins():
    with registered(DiesOnce, Raises, DeltaDiesMidTraining):
        yield


def _args(tmp_path, model_dir, name):
    return ["--results-dir", str(tmp_path / name), "--leaderboard-dir", str(tmp_path / f"lb-{name}"),
            "--cache-dir", str(tmp_path / f"cache-{name}"), "--no-save"]


def _cells(results):
    recs, problems = load_records(results)
    assert not problems
    return recs


def test_a_3x3_grid_through_ray_gives_the_local_executors_records(tmp_path, tiny_model_dir, ray_local):
    sweep = tmp_path / "grid.toml"
    sweep.write_text(f'models = ["{tiny_model_dir}"]\nmethods = ["svdllm", "shortgpt", "basis"]\n'
                     'ratios = [0.1, 0.2, 0.3]\ntasks = "none"\ncalib_samples = 4\ncalib_seq_len = 32\n')
    assert main(["sweep", str(sweep), *_args(tmp_path, tiny_model_dir, "local")]) == 0
    assert main(["sweep", str(sweep), *_args(tmp_path, tiny_model_dir, "ray"), "--executor", "ray"]) == 0
    local = {(r.method, r.target_ratio, r.seed): r for r in _cells(tmp_path / "local")}
    remote = {(r.method, r.target_ratio, r.seed): r for r in _cells(tmp_path / "ray")}
    assert len(local) == len(remote) == 10 and local.keys() == remote.keys()
    for cell, a in local.items():
        b = remote[cell]
        assert (a.key, a.status, a.budget, a.solution) == (b.key, b.status, b.budget, b.solution), cell
        assert b.metrics["perplexity"] == pytest.approx(a.metrics["perplexity"], rel=1e-5), cell
    # the Gram matrices and block cosines were computed once and shared through the statistics cache
    sources = [s["source"] for r in remote.values() for s in r.cost.get("statistics", [])]
    assert sources.count("computed") == 2 and len(sources) == 9, sources
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").rglob("*.json")}
    assert main(["sweep", str(sweep), *_args(tmp_path, tiny_model_dir, "ray"), "--executor", "ray"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").rglob("*.json")} == before  # resumed, nothing redone


def test_a_killed_worker_is_retried_and_a_failing_cell_is_not(tmp_path, tiny_model_dir, ray_local, plugins):
    died, calls = tmp_path / "died", tmp_path / "calls"
    argv = ["run", "--model", str(tiny_model_dir), *_args(tmp_path, tiny_model_dir, "results"), "--tasks", "none",
            "--calib-samples", "4", "--calib-seq-len", "32", "--methods", "test-dies-once,test-raises,svdllm",
            "--ratio", "0.1,0.2", "--set", f"test-dies-once.marker={died}", "--set", f"test-raises.marker={calls}",
            "--executor", "ray", "--max-retries", "2"]
    assert main(argv) == 1  # test-raises failed its cells
    assert died.exists()  # a worker really was killed mid-cell
    recs = _cells(tmp_path / "results")
    cells = [(r.method, r.target_ratio) for r in recs]
    assert len(cells) == len(set(cells)) == 7  # dense + 3 methods x 2 ratios, each once
    status = {(r.method, r.target_ratio): r.status for r in recs}
    assert status[("test-dies-once", 0.1)] == status[("test-dies-once", 0.2)] == "ok"
    assert status[("test-raises", 0.1)] == status[("test-raises", 0.2)] == "failed"
    assert calls.read_text().count("called") == 2  # recorded failed once per cell, never retried
    assert not list((tmp_path / "results").rglob("*.claim"))


def test_a_worker_killed_mid_training_is_retried_from_its_saved_state(tmp_path, tiny_model_dir, ray_local, plugins):
    """A distillation whose worker dies mid-training (a preempted node) is retried by Ray, and the retry resumes
    from the state the dead worker saved in the shared cache instead of starting over."""
    died = tmp_path / "died"
    argv = ["run", "--model", str(tiny_model_dir), *_args(tmp_path, tiny_model_dir, "results"), "--tasks", "none",
            "--calib-samples", "4", "--calib-seq-len", "32", "--methods", "test-delta-dies", "--ratio", "0.2",
            "--train-tokens", "512", "--set", "test-delta-dies.batch_size=2",
            "--set", "test-delta-dies.save_every=0.000001", "--set", f"test-delta-dies.marker={died}",
            "--executor", "ray", "--max-retries", "1"]
    assert main(argv) == 0
    assert died.exists()  # the worker really was killed mid-training
    (rec,) = [r for r in _cells(tmp_path / "results") if r.method == "test-delta-dies"]
    assert rec.status == "ok" and rec.cost["train_tokens"] == 512
    assert [r["step"] for r in rec.details["train"]["resumed"]] == [5]  # the retry started where the kill was
    assert not list((tmp_path / "cache-results").rglob("delta-train-*.safetensors"))  # done: the state is gone


def test_two_drivers_on_one_folder_compute_each_cell_once(tmp_path, tiny_model_dir, ray_local):
    address = ray_local.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "bench.cli", "run", "--model", str(tiny_model_dir),
           *_args(tmp_path, tiny_model_dir, "results"), "--tasks", "none", "--calib-samples", "4",
           "--calib-seq-len", "32", "--methods", "svdllm,shortgpt", "--ratio", "0.1,0.2", "--executor", "ray",
           "--address", address]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-800:] for o in outs]
    computed = [int(o[0].split(" computed here")[0].rsplit("(", 1)[1]) for o in outs]
    assert sum(computed) == 5, computed  # dense + 2 methods x 2 ratios, each computed by one driver's task
    recs = _cells(tmp_path / "results")
    assert len(recs) == len({(r.method, r.target_ratio) for r in recs}) == 5
    leftovers = [p.name for p in (tmp_path / "results").rglob("*") if p.is_file() and p.suffix != ".json"]
    assert not leftovers  # no claim, no temporary half-written file


def test_ray_missing_or_bad_resources_exit_2_before_any_work(tmp_path, tiny_model_dir, monkeypatch, capsys):
    base = ["run", "--model", str(tiny_model_dir), *_args(tmp_path, tiny_model_dir, "results"), "--tasks", "none"]
    assert main([*base, "--address", "ray://head:10001"]) == 2
    assert "add --executor ray" in capsys.readouterr().err
    if "ray" in sys.modules or _importable("ray"):
        assert main([*base, "--executor", "ray", "--cpus-per-cell", "0"]) == 2
        assert "--cpus-per-cell 0.0: give a positive number" in capsys.readouterr().err
        assert main([*base, "--executor", "ray", "--max-retries", "-1"]) == 2
        assert "--max-retries -1" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main([*base, "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'slimbench[ray]'" in err
    assert not (tmp_path / "results").exists()


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
