"""Calibration statistics on disk: reused when model and tokens match, recomputed when either changes or the file
is damaged, and the record says where each statistic came from."""

import torch
from conftest import make_tiny, tiny_calibration

from bench import integrity
from bench.adapters import get_adapter
from bench.calibration import COST_KEY, Calibration, collect_block_cosines, collect_grams, reused_cost
from bench.cli import main
from bench.leaderboard import compress_seconds
from bench.records import load_records


def _calib(tmp_path, seed=0, key="model-a"):
    c = tiny_calibration(seed=seed)
    return Calibration(tokens=c.tokens, seed=seed, batch_size=4, cache_dir=tmp_path, model_key=key)


def test_grams_are_stored_and_reused_exactly(tmp_path):
    model = make_tiny("llama")
    adapter = get_adapter(model)
    first = _calib(tmp_path)
    grams = collect_grams(model, adapter, first)
    assert [(e["statistic"], e["source"]) for e in first.memo["log"]] == [("grams", "computed")]
    assert first.memo["log"][0]["seconds"] > 0  # what a later hit saves
    assert first.stats_path("grams", adapter).is_file()
    again = _calib(tmp_path)
    reused = collect_grams(model, adapter, again)
    assert again.memo["log"][0]["source"].startswith("disk ")
    assert reused.keys() == grams.keys()
    assert all(torch.equal(reused[k], grams[k]) for k in grams)
    cos = collect_block_cosines(model, adapter, first)
    assert torch.equal(collect_block_cosines(model, adapter, _calib(tmp_path)), cos)


def test_other_tokens_or_model_or_a_damaged_file_mean_recomputing(tmp_path):
    model = make_tiny("llama")
    adapter = get_adapter(model)
    base = _calib(tmp_path)
    collect_grams(model, adapter, base)
    assert _calib(tmp_path, seed=1).stats_path("grams", adapter) != base.stats_path("grams", adapter)
    assert _calib(tmp_path, key="model-b").stats_path("grams", adapter) != base.stats_path("grams", adapter)
    base.stats_path("grams", adapter).write_bytes(b"truncated")
    fresh = _calib(tmp_path)
    collect_grams(model, adapter, fresh)
    assert fresh.memo["log"][0]["source"] == "computed"
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_no_cache_dir_means_memory_only(tmp_path):
    model = make_tiny("llama")
    calib = tiny_calibration()
    assert calib.stats_path("grams", get_adapter(model)) is None
    collect_grams(model, get_adapter(model), calib)
    collect_grams(model, get_adapter(model), calib)
    assert [e["source"] for e in calib.memo["log"]] == ["computed", "memory"]
    assert calib.memo["log"][1]["seconds"] == 0.0


def test_a_second_command_reads_the_statistics_from_disk(tmp_path, tiny_model_dir):
    def run(methods, *extra):
        return main(["run", "--model", str(tiny_model_dir), "--methods", methods, "--ratio", "0.2", *extra,
                     "--results-dir", str(tmp_path / "results"), "--leaderboard-dir", str(tmp_path / "lb"),
                     "--cache-dir", str(tmp_path / "cache"), "--tasks", "none", "--calib-samples", "4",
                     "--calib-seq-len", "64", "--no-save"])

    assert run("svdllm") == 0
    assert run("basis") == 0
    by = {r.method: r for r in load_records(tmp_path / "results")[0]}
    assert [(e["statistic"], e["source"]) for e in by["svdllm"].cost["statistics"]] == [("grams", "computed")]
    assert by["svdllm"].cost["statistics"][0]["seconds"] > 0
    assert by["basis"].cost["statistics"][0]["source"].startswith("disk ")
    dense_file = next((tmp_path / "results").rglob("dense__*.json"))
    stamp = dense_file.stat().st_mtime_ns
    assert run("basis", "--no-cache") == 0  # everything recomputed: the dense cell and the statistics
    by = {r.method: r for r in load_records(tmp_path / "results")[0]}
    assert [(e["statistic"], e["source"]) for e in by["basis"].cost["statistics"]] == [("grams", "computed")]
    assert dense_file.stat().st_mtime_ns != stamp


def test_a_reused_statistic_carries_what_computing_it_cost(tmp_path):
    model = make_tiny("llama")
    adapter = get_adapter(model)
    first = _calib(tmp_path)
    collect_grams(model, adapter, first)
    collect_grams(model, adapter, first)  # memory: the cost is remembered, the time here is 0
    computed, memory = first.memo["log"]
    assert computed["compute_seconds"] == computed["seconds"] > 0
    assert memory["seconds"] == 0.0 and memory["compute_seconds"] == computed["compute_seconds"]
    again = _calib(tmp_path)  # another command: from disk, with the cost stored in the file
    grams = collect_grams(model, adapter, again)
    (disk,) = again.memo["log"]
    assert disk["source"].startswith("disk ") and disk["compute_seconds"] == computed["compute_seconds"]
    assert COST_KEY not in grams and all(isinstance(k, tuple) for k in grams)
    assert reused_cost(again.memo["log"]) == disk["compute_seconds"] and reused_cost(first.memo["log"][:1]) == 0
    # a file stored before costs were kept: the hit says it does not know
    path = again.stats_path("grams", adapter)
    old = integrity.load_tensors(path)
    old.pop(COST_KEY)
    integrity.save_tensors(path, old)
    older = _calib(tmp_path)
    collect_grams(model, adapter, older)
    assert older.memo["log"][0]["compute_seconds"] is None and reused_cost(older.memo["log"]) is None


def test_the_leaderboard_counts_reused_statistics_at_their_cost():
    computed = {"statistic": "grams", "source": "computed", "seconds": 12.0, "compute_seconds": 12.0}
    reused = {"statistic": "grams", "source": "memory", "seconds": 0.0, "compute_seconds": 12.0}
    assert compress_seconds({"compress_seconds": 14.0, "statistics": [computed]}) == 14.0
    assert compress_seconds({"compress_seconds": 2.0, "statistics": [reused], "statistics_reused_seconds": 12.0}) \
        == 14.0  # the same cost whichever cell computed the Grams
    # an older record: a statistic reused at an unknown cost gives no figure rather than a flattering one
    assert compress_seconds({"compress_seconds": 0.003, "statistics": [reused | {"compute_seconds": None}]}) is None
    assert compress_seconds({"compress_seconds": 5.0}) == 5.0 and compress_seconds({}) is None
