"""Every bad input a hostile new user tried (issue 12) exits 2 with one line that names the problem and the fix,
before any work: no traceback, no record, no results folder."""

import errno
import json
import os
import shutil

import pytest
from conftest import make_tiny

from bench import checkpoint
from bench.cli import main


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("ckpt") / "model"
    checkpoint.save(make_tiny("llama", vocab_size=len(tiny_tokenizer)), tiny_tokenizer, path)
    return path


def _copy(src, dst, *, drop=(), keep_only=None):
    shutil.copytree(src, dst)
    for f in list(dst.iterdir()):
        if f.name in drop or (keep_only is not None and f.name not in keep_only):
            f.unlink()
    return dst


def _not_gguf(tmp, model, ckpt):
    (tmp / "fake.gguf").write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    return ["run", "--model", str(tmp / "fake.gguf")], "is not a GGUF file"


def _truncated(tmp, model, ckpt):
    d = _copy(model, tmp / "m")
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return ["run", "--model", str(d)], "truncated"


def _no_tokenizer(tmp, model, ckpt):
    d = _copy(model, tmp / "m", keep_only={"config.json", "model.safetensors", "generation_config.json"})
    return ["run", "--model", str(d)], "has no tokenizer"


def _bin_only(tmp, model, ckpt):
    d = _copy(model, tmp / "m", drop={"model.safetensors"})
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02 pickle")
    return ["run", "--model", str(d)], "safetensors only"


def _broken_config(tmp, model, ckpt):
    d = _copy(model, tmp / "m")
    (d / "config.json").write_text("{ not json")
    return ["run", "--model", str(d)], "config.json is not readable JSON"


def _flag(*args, needle):
    return lambda tmp, model, ckpt: (["run", "--model", str(model), *args], needle)


def _file_as(flag):
    def case(tmp, model, ckpt):
        (tmp / "afile").write_text("x")
        return ["run", "--model", str(model), flag, str(tmp / "afile")], "is a file, not a folder"

    return case


def _empty_models_sweep(tmp, model, ckpt):
    (tmp / "s.toml").write_text('models = []\nmethods = ["svdllm"]\nratios = [0.1]\n')
    return ["sweep", str(tmp / "s.toml")], "`models` must name at least one model"


def _sweep_bad_ratio(tmp, model, ckpt):
    (tmp / "s.toml").write_text(f'models = ["{model}"]\nmethods = ["svdllm"]\nratios = "0.1,,0.2"\n')
    return ["sweep", str(tmp / "s.toml")], "`ratios`"


def _sweep_bad_limit(tmp, model, ckpt):
    (tmp / "s.toml").write_text(f'models = ["{model}"]\nmethods = ["svdllm"]\nratios = [0.1]\nlimit = 0\n')
    return ["sweep", str(tmp / "s.toml")], "`limit` 0"


def _generate(*args, needle):
    return lambda tmp, model, ckpt: (["generate", "--model", str(model), *args], needle)


def _crafted(edit, needle):
    def case(tmp, model, ckpt):
        d = _copy(ckpt, tmp / "ckpt")
        meta = json.loads((d / "slimbench.json").read_text())
        text = edit(meta)
        (d / "slimbench.json").write_text(text if isinstance(text, str) else json.dumps(meta))
        return ["generate", "--model", str(d)], needle

    return case


def _huge_rank(meta):
    meta["ops"] = [{"op": "factorize", "module": "model.layers.0.mlp.up_proj", "rank": 10**9}]


CASES = {
    "gguf that is not GGUF": _not_gguf,
    "truncated model.safetensors": _truncated,
    "folder without a tokenizer": _no_tokenizer,
    ".bin-only folder": _bin_only,
    "broken config.json": _broken_config,
    "--seeds ,": _flag("--seeds", ",", needle="empty value"),
    "--seeds 0,0": _flag("--seeds", "0,0", needle="repeats a value"),
    "--limit 0": _flag("--limit", "0", needle="--limit 0: give a positive number"),
    "--limit -3": _flag("--limit", "-3", needle="--limit -3: give a positive number"),
    "--calib-samples 0": _flag("--calib-samples", "0", needle="give a positive number"),
    "--calib-seq-len -5": _flag("--calib-seq-len", "-5", needle="give a positive number"),
    "--ratio ,": _flag("--ratio", ",", needle="empty value"),
    "--ratio 0.1,,0.2": _flag("--ratio", "0.1,,0.2", needle="empty value"),
    "--ratio nan": _flag("--ratio", "nan", needle="NaN is not a ratio"),
    "--methods ,": _flag("--methods", ",", needle="empty value"),
    "--tolerance -1": _flag("--tolerance", "-1", needle="--tolerance -1.0"),
    "--set laco.threshold=nan": _flag("--methods", "laco", "--set", "laco.threshold=nan", needle="not a finite number"),
    "--set laco.relax_step=nan": _flag("--methods", "laco", "--set", "laco.relax_step=nan",
                                       needle="not a finite number"),
    "--set basis.group_size=two": _flag("--methods", "basis", "--set", "basis.group_size=two",
                                        needle="is not an integer; give e.g. basis.group_size=2"),
    "--results-dir is a file": _file_as("--results-dir"),
    "--leaderboard-dir is a file": _file_as("--leaderboard-dir"),
    "--cache-dir is a file": _file_as("--cache-dir"),
    "sweep with models = []": _empty_models_sweep,
    "sweep error names the TOML key (ratios)": _sweep_bad_ratio,
    "sweep error names the TOML key (limit)": _sweep_bad_limit,
    "generate --max-new-tokens -1": _generate("--max-new-tokens", "-1", needle="--max-new-tokens -1"),
    "checkpoint: broken JSON": _crafted(lambda m: "{ broken", "not valid JSON"),
    "checkpoint: unknown op": _crafted(lambda m: m.update(ops=[{"op": "rm_rf"}]), "known structural edits"),
    "checkpoint: ops of the wrong type": _crafted(lambda m: m.update(ops="all"), "known structural edits"),
    "checkpoint: not an object": _crafted(lambda m: "[]", "not a JSON object"),
    "checkpoint: base_config wrong type": _crafted(lambda m: m.update(base_config=7), "base_config"),
    "checkpoint: a rank of a billion": _crafted(_huge_rank, "parameters but model.safetensors holds"),
    "checkpoint: unknown dtype": _crafted(lambda m: m.update(dtype="int3"), "dtype 'int3'"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_line_before_any_work(name, tmp_path, tiny_model_dir, tiny_checkpoint, capsys):
    argv, needle = CASES[name](tmp_path, tiny_model_dir, tiny_checkpoint)
    if argv[0] in ("run", "sweep"):
        for flag, folder in (("--results-dir", "results"), ("--leaderboard-dir", "lb"), ("--cache-dir", "cache")):
            if flag not in argv:
                argv += [flag, str(tmp_path / folder)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert needle in err, err
    assert "HF_HUB_OFFLINE" not in err  # local files: the hub hint would mislead
    assert not (tmp_path / "results").exists()  # refused before any work


def test_a_full_disk_is_refused_before_any_work(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from bench import cli

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cli.os, "fsync", full)
    argv = ["run", "--model", str(tiny_model_dir), "--results-dir", str(tmp_path / "results"),
            "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--results-dir" in err and "No space left" in err and "\n" not in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".slimbench-probe")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_results_folder_is_refused(tmp_path, tiny_model_dir, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    assert main(["run", "--model", str(tiny_model_dir), "--results-dir", str(ro)]) == 2
    assert "cannot write there" in capsys.readouterr().err


def test_an_optional_float_knob_takes_a_number_or_none():
    from bench.registry import get_method

    assert get_method("slicegpt")(slicing="0.3").knobs.slicing == 0.3
    assert get_method("slicegpt")(slicing="none").knobs.slicing is None
