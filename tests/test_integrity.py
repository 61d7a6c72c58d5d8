"""No stale, poisoned or overwritten result (issue 12): keys by content, verified caches, unique record paths,
one computation per cell across processes, strict JSON, malformed records skipped by name."""

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch
from conftest import make_tiny

from bench import checkpoint, integrity, models
from bench.claims import Claims
from bench.cli import main
from bench.records import Record, load_records, read_record, record_path, write_record


def _run(tmp_path, model_dir, *extra, results="results"):
    return main(["run", "--model", str(model_dir), "--results-dir", str(tmp_path / results),
                 "--leaderboard-dir", str(tmp_path / "lb"), "--cache-dir", str(tmp_path / "cache"),
                 "--tasks", "none", "--calib-samples", "4", "--calib-seq-len", "32", "--no-save", *extra])


def _by_method(results):
    recs, problems = load_records(results)
    return {r.method: r for r in recs}, problems


def _in_threads(work, n: int) -> list[Exception]:
    """Run ``work`` in ``n`` threads at once; the exceptions they raised."""
    errors: list[Exception] = []

    def guarded():
        try:
            work()
        except Exception as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=guarded) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def test_changed_weights_are_not_served_from_old_records_or_statistics(tmp_path, model_copy, tiny_tokenizer):
    assert _run(tmp_path, model_copy, "--methods", "svdllm", "--ratio", "0.2") == 0
    first, _ = _by_method(tmp_path / "results")
    other = make_tiny("llama", seed=7, vocab_size=len(tiny_tokenizer))
    other.config.bos_token_id = other.config.eos_token_id = tiny_tokenizer.eos_token_id
    other.save_pretrained(model_copy)  # same names, same sizes: only the bytes differ
    assert _run(tmp_path, model_copy, "--methods", "svdllm", "--ratio", "0.2") == 0
    recs, _ = load_records(tmp_path / "results")
    assert len(recs) == 4  # two dense, two svdllm: nothing reused, nothing overwritten
    second = {r.method: r for r in recs if r.key not in {first["dense"].key, first["svdllm"].key}}
    assert second["dense"].metrics["perplexity"] != first["dense"].metrics["perplexity"]
    sources = [s["source"] for s in second["svdllm"].cost["statistics"]]
    assert sources and all(s == "computed" for s in sources), sources


def _svdllm_ppl(tmp_path, model_dir):
    recs, _ = load_records(tmp_path / "results")
    return next(r for r in recs if r.method == "svdllm")


@pytest.mark.parametrize("damage", ["flip", "zero_half", "nan"])
def test_a_damaged_cached_statistic_is_detected_and_the_metrics_equal_a_clean_run(tmp_path, tiny_model_dir, damage):
    assert _run(tmp_path, tiny_model_dir, "--methods", "svdllm", "--ratio", "0.2") == 0
    clean = _svdllm_ppl(tmp_path, tiny_model_dir)
    (stats,) = (tmp_path / "cache" / "stats").glob("grams-*.safetensors")
    raw = bytearray(stats.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    if damage == "flip":
        raw[header + 4096] ^= 0x01
    elif damage == "zero_half":
        raw[header + (len(raw) - header) // 2:] = bytes(len(raw) - header - (len(raw) - header) // 2)
    else:
        n = (len(raw) - header) // 8
        raw[header:] = torch.full((n,), float("nan"), dtype=torch.float64).numpy().tobytes()
    stats.write_bytes(bytes(raw))
    assert _run(tmp_path, tiny_model_dir, "--methods", "svdllm", "--ratio", "0.2", "--force") == 0
    again = _svdllm_ppl(tmp_path, tiny_model_dir)
    assert again.status == "ok" and again.metrics["perplexity"] == clean.metrics["perplexity"]
    assert any("failed verification" in line for line in again.details["cache_repairs"])
    assert list((tmp_path / "cache" / "stats").glob("grams-*.bad-*")), "the damaged file is kept aside"
    assert [s["source"] for s in again.cost["statistics"]] == ["computed"]


def test_a_damaged_dequantised_model_is_detected_and_rebuilt(tmp_path, tiny_model_dir, monkeypatch):
    """The GGUF cache, with dequantisation replaced by copying the tiny model (no tiny GGUF writer exists)."""
    calls = []

    def fake_dequantise(gguf, out):
        calls.append(gguf)
        for f in tiny_model_dir.iterdir():
            shutil.copy(f, out / f.name)

    monkeypatch.setattr(models, "_dequantise", fake_dequantise)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + os.urandom(64))
    first = models._dequantised_cache(gguf, tmp_path / "cache")
    ids = torch.arange(20).unsqueeze(0)
    with torch.no_grad():  # before the damage: loaded weights may be memory-mapped from the file
        clean = models.load_model(str(first), "cpu", "float32").model(ids).logits.clone()
    assert models._dequantised_cache(gguf, tmp_path / "cache") == first and len(calls) == 1
    weights = first / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-100] ^= 0xFF
    weights.write_bytes(bytes(raw))
    assert models._dequantised_cache(gguf, tmp_path / "cache") == first and len(calls) == 2
    assert any("failed verification" in n for n in integrity.drain())
    with torch.no_grad():
        assert torch.equal(clean, models.load_model(str(first), "cpu", "float32").model(ids).logits)
    gguf.write_bytes(b"GGUF" + os.urandom(64))  # other GGUF content: another cache folder
    assert models._dequantised_cache(gguf, tmp_path / "cache") != first


def test_concurrent_dequantisations_both_succeed(tmp_path, tiny_model_dir, monkeypatch):
    barrier = threading.Barrier(2)

    def fake_dequantise(gguf, out):
        for f in tiny_model_dir.iterdir():
            shutil.copy(f, out / f.name)
        barrier.wait(timeout=30)  # both have done all the work before either renames

    monkeypatch.setattr(models, "_dequantise", fake_dequantise)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    out = []
    errors = _in_threads(lambda: out.append(models._dequantised_cache(gguf, tmp_path / "cache")), 2)
    assert not errors and len(out) == 2 and out[0] == out[1]
    assert integrity.verify_manifest(out[0]) is None


def test_other_settings_get_their_own_record_and_checkpoint(tmp_path, tiny_model_dir):
    base = ["run", "--model", str(tiny_model_dir), "--results-dir", str(tmp_path / "results"), "--leaderboard-dir",
            str(tmp_path / "lb"), "--cache-dir", str(tmp_path / "cache"), "--tasks", "none", "--calib-seq-len", "32",
            "--methods", "svdllm", "--ratio", "0.2"]
    assert main([*base, "--calib-samples", "4"]) == 0
    assert main([*base, "--calib-samples", "8"]) == 0
    svd = [r for r in load_records(tmp_path / "results")[0] if r.method == "svdllm"]
    assert sorted(r.suite["calib_samples"] for r in svd) == [4, 8]
    assert len({record_path("", r) for r in svd}) == 2 and len({r.checkpoint for r in svd}) == 2
    for r in svd:  # each record points at its own run's checkpoint
        assert json.loads((checkpoint.Path(r.checkpoint) / checkpoint.META).read_text())["record_key"] == r.key


def test_concurrent_checkpoint_saves_to_one_folder_all_succeed(tmp_path, tiny_tokenizer):
    model = make_tiny("llama", vocab_size=len(tiny_tokenizer))

    def save():
        for _ in range(5):
            checkpoint.save(model, None, tmp_path / "ck")

    errors = _in_threads(save, 8)
    assert not errors, errors[:2]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == sorted([checkpoint.META, checkpoint.WEIGHTS])
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # nothing left aside


def test_two_processes_on_one_folder_compute_each_cell_once(tmp_path, tiny_model_dir):
    cmd = [sys.executable, "-m", "bench.cli", "run", "--model", str(tiny_model_dir), "--results-dir",
           str(tmp_path / "results"), "--leaderboard-dir", str(tmp_path / "lb"), "--cache-dir", str(tmp_path / "cache"),
           "--tasks", "none", "--calib-samples", "4", "--calib-seq-len", "32", "--no-save",
           "--methods", "svdllm,shortgpt", "--ratio", "0.1,0.2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-500:] for o in outs]
    computed = [int(o[0].split(" computed here")[0].rsplit("(", 1)[1]) for o in outs]
    assert sum(computed) == 5, computed  # dense + 2 methods x 2 ratios, each computed by exactly one process
    recs, problems = load_records(tmp_path / "results")
    assert not problems and len(recs) == 5
    assert not list((tmp_path / "results").rglob("*.claim"))


def test_claims_are_exclusive_and_a_dead_owners_claim_is_taken_over(tmp_path):
    record = tmp_path / "cell.json"
    mine, theirs = Claims(), Claims()
    assert mine.acquire(record)
    assert not theirs.acquire(record)  # a live process (this one) holds it
    mine.release(record)
    assert theirs.acquire(record)
    theirs.release(record)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim = mine.path(record)
    claim.write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": int(dead.stdout)}))
    assert mine.acquire(record)  # its owner has exited
    mine.release(record)
    claim.write_text(json.dumps({"host": "another-machine", "pid": 1}))
    assert not mine.acquire(record)  # fresh heartbeat on another host: live
    old = claim.stat().st_mtime - 3600
    os.utime(claim, (old, old))
    assert mine.acquire(record)  # its heartbeat stopped an hour ago
    mine.release_all()
    assert not claim.exists()


ODD = {"empty_list": "[]", "null": "null", "number": "7", "string": '"x"', "broken": "{", "bare_nan": "NaN",
       "no_fields": '{"schema": "slimbench.result", "schema_version": 2}'}


def test_malformed_records_are_skipped_by_name_everywhere(tmp_path, tiny_model_dir, capsys):
    assert _run(tmp_path, tiny_model_dir, "--methods", "svdllm", "--ratio", "0.2") == 0
    good = next((tmp_path / "results").rglob("svdllm*.json"))
    data = json.loads(good.read_text())
    data["target_ratio"] = "twenty percent"  # a wrong type in a field
    (good.parent / "wrongtype.json").write_text(json.dumps(data))
    for name, content in ODD.items():
        (good.parent / f"{name}.json").write_text(content)
    recs, problems = load_records(tmp_path / "results")
    assert len(recs) == 2 and len(problems) == len(ODD) + 1
    for name in [*ODD, "wrongtype"]:
        assert any(f"{name}.json: skipped" in p for p in problems), name
    capsys.readouterr()
    assert main(["leaderboard", "--results-dir", str(tmp_path / "results"), "--out", str(tmp_path / "lb2")]) == 0
    assert "empty_list.json: skipped" in capsys.readouterr().out
    assert main(["compare", "dense", "svdllm", "--results-dir", str(tmp_path / "results")]) == 0
    assert main(["compare", str(good.parent / "null.json"), str(good)]) == 2
    assert "null.json: not a readable slimbench record" in capsys.readouterr().err
    assert _run(tmp_path, tiny_model_dir, "--methods", "svdllm", "--ratio", "0.2") == 0  # the end of a run too


def test_records_are_strict_json_with_non_finite_numbers_named(tmp_path):
    rec = Record(model={"name": "tiny"}, method="m", knobs={}, knob_overrides={}, target_ratio=0.2, seed=0,
                 suite={"name": "quick"}, key="abc", metrics={"perplexity": float("nan"), "tasks": {"t": {"acc":
                                                                                                       float("inf")}}})
    path = write_record(tmp_path, rec)
    text = path.read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in a record"))
    back = read_record(path)
    assert back.metrics["perplexity"] is None
    assert back.non_finite == {"metrics.perplexity": "nan", "metrics.tasks.t.acc": "inf"}


def test_cache_files_and_checkpoints_are_as_readable_as_the_umask_says(tmp_path, tiny_tokenizer):
    """safetensors writes 0600 and mkdtemp 0700 whatever the umask: a team's shared cache would hold statistics and
    checkpoints the others cannot read (their runs would take them for damaged entries and move them aside)."""
    import stat

    old, saved = os.umask(0o022), integrity._UMASK
    try:
        integrity._UMASK = 0o022
        stat_file = tmp_path / "stats" / "grams.safetensors"
        assert integrity.save_tensors(stat_file, {"g": torch.ones(3)})
        assert stat.S_IMODE(stat_file.stat().st_mode) == 0o644
        folder = checkpoint.save(make_tiny("llama"), tiny_tokenizer, tmp_path / "ckpt")
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755
        assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in folder.iterdir()}[checkpoint.WEIGHTS] == 0o644
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in folder.iterdir())
        integrity._UMASK = 0o077  # a user who keeps everything private stays private
        assert integrity.save_tensors(stat_file, {"g": torch.ones(3)})
        assert stat.S_IMODE(stat_file.stat().st_mode) == 0o600
    finally:
        os.umask(old)
        integrity._UMASK = saved
