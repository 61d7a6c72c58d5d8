"""Sweep files: parsed into `bench run` commands, bad files refused in one line, a grid that resumes."""

import pytest

from bench import sweep
from bench.cli import main
from bench.errors import UserError
from bench.records import load_records


def test_a_sweep_is_one_run_command_per_model(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('models = ["a", "b"]\nmethods = ["svdllm", "basis"]\nratios = [0.12, 0.24]\nseeds = [0, 1]\n'
                 'limit = 10\n[knobs.basis]\ngroup_size = 3\nshared = ["q", "k"]\n[knobs.delta]\nkeep_ends = false\n')
    runs = sweep.load(f)
    assert [r[:3] for r in runs] == [["run", "--model", "a"], ["run", "--model", "b"]]
    args = runs[0]
    for pair in (["--methods", "svdllm,basis"], ["--ratio", "0.12,0.24"], ["--seeds", "0,1"], ["--limit", "10"],
                 ["--set", "basis.group_size=3"], ["--set", "basis.shared=q,k"], ["--set", "delta.keep_ends=false"]):
        assert any(args[i : i + 2] == pair for i in range(len(args) - 1)), pair


@pytest.mark.parametrize("text, needle", [
    ('models = ["a"]\nmethods = "all"\n', "missing ratios"),
    ('models = ["a"]\nmethods = "all"\nratios = [0.1]\nratio = 3\n', "unknown key(s) ratio"),
    ('models = ["a"\n', "not valid TOML"),
    ('models = ["a"]\nmethods = "all"\nratios = []\n', "non-empty list"),
])
def test_bad_sweep_files_are_refused(tmp_path, text, needle):
    f = tmp_path / "s.toml"
    f.write_text(text)
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        sweep.load(f)


def test_the_shipped_default_sweep_parses():
    runs = sweep.load("sweeps/default.toml")
    assert runs and all(r[:2] == ["run", "--model"] for r in runs)


def test_sweep_runs_the_grid_and_resumes(tmp_path, tiny_model_dir, capsys):
    f = tmp_path / "grid.toml"
    f.write_text(f'models = ["{tiny_model_dir}"]\nmethods = ["svdllm", "shortgpt"]\nratios = [0.1, 0.2]\n'
                 'tasks = "none"\ncalib_samples = 4\ncalib_seq_len = 32\n')
    common = ["--results-dir", str(tmp_path / "results"), "--leaderboard-dir", str(tmp_path / "lb"),
              "--cache-dir", str(tmp_path / "cache"), "--no-save"]
    assert main(["sweep", str(f), *common]) == 0
    records, problems = load_records(tmp_path / "results")
    assert not problems and len(records) == 5  # dense + 2 methods x 2 ratios
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "results").rglob("*.json")}
    assert main(["sweep", str(f), *common]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # every cell reused
    assert main(["sweep", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
