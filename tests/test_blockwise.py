"""The block-wise engine (issue 8): the same statistics, decisions and outputs as the whole-model path, a peak of
statistics that does not grow with the number of blocks, and compression of a model larger than a (simulated)
device budget with only the block at work on the device."""

import gc
import weakref

import pytest
import torch
from conftest import make_tiny, tiny_calibration

from bench import blockwise, calibration, registry
from bench import placement as placement_mod
from bench.adapters import get_adapter
from bench.budget import count_params
from bench.errors import UserError
from bench.leaderboard import REFERENCE
from bench.placement import Placement, module_bytes
from methods.jointdrop import sublayer_importance

# methods at knobs that run in a second on tiny models; delta without a teacher, which offloading cannot hold
KNOBS = {"delta": {"train_tokens": 0, "eval_windows": 0}, "slicegpt": {"round_to": 1},
         "basis": {"refit_from": 0.0}}  # refit on: the second (compressed-model) pass is compared too
RATIO = 0.25
BLOCKS = 12  # enough blocks that two of them and their statistics are well below the whole model


def _placement(engine: str, model=None, offload: bool = False, budget: int | None = None) -> Placement:
    return Placement(device=torch.device("cpu"), offload=offload, budget_bytes=budget, engine=engine)


def _calib(placement: Placement):
    calib = tiny_calibration()
    calib.placement = placement
    return calib


def _small_budget(model) -> int:
    """Room for the non-block parts, two blocks (Basis Sharing's group), their statistics and activations; well
    below the whole model."""
    adapter = get_adapter(model)
    rest = module_bytes(model) - module_bytes(*adapter.blocks())
    block = module_bytes(adapter.block(0))
    calib = tiny_calibration()
    hidden = model.config.hidden_size
    activations = 2 * calib.n_samples * calib.seq_len * hidden * 4  # a group's inputs and outputs, float32
    return rest + 2 * block + 2 * calibration.gram_bytes(adapter) + 2 * activations


def _compress(method: str, family: str, placement: Placement):
    model = make_tiny(family, num_hidden_layers=BLOCKS)
    adapter = get_adapter(model)
    inst = registry.get_method(method)(**KNOBS.get(method, {}))
    sol = inst.solve(adapter, RATIO)
    info = inst.compress(model, adapter, _calib(placement), sol)
    return model, sol, info


def _decisions(method: str, sol, info) -> dict:
    keys = {"laco": ("merges", "removed"), "jointdrop": ("dropped", "ranking"), "shortgpt": ("removed",)}
    return {"solution": sol.knobs, **{k: info.details.get(k) for k in keys.get(method, ())}}


@pytest.mark.parametrize("method", sorted(registry.available()))
def test_blockwise_offloaded_equals_the_whole_model_path(method, family):
    """Same decisions (ranks, dropped units, merges) and outputs within float tolerance, with the model offloaded
    under a device budget smaller than the model."""
    try:
        ref_model, ref_sol, ref_info = _compress(method, family, _placement("whole"))
    except UserError as err:
        pytest.skip(f"{method} refuses {family}: {err}")
    dense = make_tiny(family, num_hidden_layers=BLOCKS)
    budget = _small_budget(dense)
    assert budget < module_bytes(dense)  # the model does not fit the simulated device
    placement = _placement("blockwise", offload=True, budget=budget)
    model, sol, info = _compress(method, family, placement)
    assert _decisions(method, sol, info) == _decisions(method, ref_sol, ref_info)
    assert count_params(model) == count_params(ref_model)
    assert 0 < placement.peak <= budget and placement.resident == 0  # everything it placed came back
    ids = tiny_calibration().tokens[:2, :24]
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, ref_model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_statistics_are_identical_on_both_paths(family):
    model = make_tiny(family, num_hidden_layers=BLOCKS)
    adapter = get_adapter(model)
    whole, block = _calib(_placement("whole")), _calib(_placement("blockwise"))
    g_whole, g_block = calibration.collect_grams(model, adapter, whole), calibration.collect_grams(model, adapter, block)
    assert g_whole.keys() == g_block.keys()
    for key in g_whole:
        assert torch.equal(g_whole[key], g_block[key]), key
    for segment in (None, 8):
        assert torch.equal(calibration.collect_block_cosines(model, adapter, whole, segment=segment),
                           calibration.collect_block_cosines(model, adapter, block, segment=segment))
    assert sublayer_importance(model, adapter, whole) == sublayer_importance(model, adapter, block)


def _streamed_peak(blocks: int) -> tuple[int, int]:
    """Peak device bytes an offloaded SVD-LLM placed, and the peak of its live statistics, at ``blocks`` blocks."""
    model = make_tiny("llama", num_hidden_layers=blocks)
    adapter = get_adapter(model)
    placement = _placement("blockwise", offload=True)
    calib = _calib(placement)
    alive: list[weakref.ref] = []
    live_peak = 0
    for step in calibration.block_grams(model, adapter, calib):
        for b in step.blocks:
            alive += [weakref.ref(g) for g in step.stats[b]["grams"].values()]
        del step  # the test holds no strong reference: what stays alive is what the engine keeps
        gc.collect()
        live_peak = max(live_peak, sum(_nbytes(r()) for r in alive))
    assert calib.memo["log"][-1]["kept"] is False
    return placement.peak, live_peak


def _nbytes(t) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def test_peak_statistics_memory_is_flat_in_the_number_of_blocks():
    peaks = {n: _streamed_peak(n) for n in (4, 8, 16)}
    device = [p[0] for p in peaks.values()]
    stats = [p[1] for p in peaks.values()]
    assert max(device) <= 1.10 * min(device), peaks
    assert max(stats) <= 1.10 * min(stats), peaks
    # the reference path keeps every block's Grams at once: 4x the blocks, 4x the statistics
    held = {}
    for n in (4, 16):
        model = make_tiny("llama", num_hidden_layers=n)
        grams = calibration.collect_grams(model, get_adapter(model), _calib(_placement("whole")))
        held[n] = sum(g.numel() * g.element_size() for g in grams.values())
    assert held[16] == 4 * held[4]


class _Spy(blockwise.Probe):
    """Measures, while each batch passes a block, the bytes of every activation the walk has made that is still
    alive, and of every statistic it has already handed out."""

    seen: list = []
    handed: list = []
    peak_acts = 0
    peak_handed = 0

    def observe(self, x_in, x_out):
        _Spy.seen += [weakref.ref(x_in), weakref.ref(x_out)]
        alive = {id(t): t for t in (r() for r in _Spy.seen) if t is not None}
        _Spy.peak_acts = max(_Spy.peak_acts, sum(_nbytes(t) for t in alive.values()))
        _Spy.peak_handed = max(_Spy.peak_handed, sum(_nbytes(r()) for r in _Spy.handed))

    def result(self):
        return None


def _walk_peaks(monkeypatch, blocks: int, after: bool) -> tuple[int, int, int]:
    """Peak live activations and handed-out Grams during an offloaded walk whose caller keeps its loop variable, as
    SVD-LLM's ``for step in ...`` does; and the bytes of one full set of activations (every batch, one point)."""
    monkeypatch.setitem(blockwise.PROBES, "spy", _Spy)
    _Spy.seen, _Spy.handed, _Spy.peak_acts, _Spy.peak_handed = [], [], 0, 0
    model = make_tiny("llama", num_hidden_layers=blocks)
    adapter = get_adapter(model)
    calib = tiny_calibration()
    batches = list(calib.batches("cpu"))
    one_set = calib.n_samples * calib.seq_len * model.config.hidden_size * 4
    for step in blockwise.walk(model, adapter, batches, _placement("blockwise", offload=True), ["grams", "spy"],
                               after=after):
        for b in step.blocks:
            _Spy.handed += [weakref.ref(g) for g in step.stats[b]["grams"].values()]
    return _Spy.peak_acts, _Spy.peak_handed, one_set


@pytest.mark.parametrize("after", [False, True])
def test_a_walk_holds_one_block_of_activations_and_no_finished_statistics(monkeypatch, after):
    """Found on an H100 (llama2-7b shape, svdllm offloaded): the device peak rose by one calibration set of
    activations from 2 to 4 blocks, because block 0's inputs lived for the whole walk and the caller's previous step
    kept its inputs and Grams alive while the next block ran. Now, at any block count, a block's inputs and outputs
    are the only activations alive, and no statistic already handed out survives into the next block's run."""
    peaks = {n: _walk_peaks(monkeypatch, n, after) for n in (2, 4, 8)}
    for n, (acts, handed, one_set) in peaks.items():
        assert acts <= 2 * one_set, (n, acts / one_set)
        assert handed == 0, (n, handed)
    assert len({p[0] for p in peaks.values()}) == 1, peaks  # flat, not merely bounded


def test_a_budget_below_one_block_is_refused_with_the_fix():
    model = make_tiny("llama", num_hidden_layers=4)
    adapter = get_adapter(model)
    placement = _placement("blockwise", offload=True, budget=module_bytes(adapter.block(0)) // 2)
    inst = registry.get_method("svdllm")()
    with pytest.raises(UserError, match="device budget .* exceeded.*--offload"):
        inst.compress(model, adapter, _calib(placement), inst.solve(adapter, RATIO))


def test_streaming_forward_equals_the_resident_forward(family):
    model = make_tiny(family, num_hidden_layers=BLOCKS)
    adapter = get_adapter(model)
    ids = tiny_calibration().tokens[:2, :24]
    with torch.no_grad():
        want = model(input_ids=ids).logits
        placement = _placement("blockwise", offload=True)
        with blockwise.streaming(model, adapter, placement):
            got = model(input_ids=ids).logits
    assert torch.equal(got, want)
    # blocks visit the device one at a time: the peak is the non-block parts plus one block
    rest = module_bytes(model) - module_bytes(*adapter.blocks())
    assert placement.peak == rest + max(module_bytes(b) for b in adapter.blocks())
    assert placement.resident == 0


def test_partition_keeps_groups_and_fills_gaps():
    assert blockwise.partition(5, 2) == [[0, 1], [2, 3], [4]]
    assert blockwise.partition(6, [[1, 2], [4, 5]]) == [[0], [1, 2], [3], [4, 5]]
    with pytest.raises(ValueError):
        blockwise.partition(4, [[0, 2]])


def _run(tmp_path, model_dir, *extra) -> int:
    from bench.cli import main

    return main(["run", "--model", str(model_dir), "--methods", "svdllm,basis,slicegpt,shortgpt", "--ratio", "0.2",
                 "--results-dir", str(tmp_path / "results"), "--leaderboard-dir", str(tmp_path / "lb"),
                 "--cache-dir", str(tmp_path / "cache"), "--tasks", "arc_easy", "--limit", "4", "--calib-samples", "4",
                 "--calib-seq-len", "64", "--no-save", "--set", "slicegpt.round_to=1", *extra])


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved 12-block tiny llama: its weights (1.9 MB) exceed what one pair of blocks needs at work (1.3 MB)."""
    path = tmp_path_factory.mktemp("deep-llama")
    model = make_tiny("llama", num_hidden_layers=BLOCKS, vocab_size=len(tiny_tokenizer))
    model.config.bos_token_id = model.config.eos_token_id = tiny_tokenizer.eos_token_id
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


BUDGET_GIB = "0.0019"  # 1.95 MiB: below the 12-block model with its working set (2.7 MiB), above one pair at work


def test_bench_run_offloaded_under_a_small_device_budget_matches_the_resident_run(tmp_path, deep_model_dir):
    from bench.records import load_records

    assert _run(tmp_path / "resident", deep_model_dir, "--offload", "off") == 0
    assert _run(tmp_path / "offload", deep_model_dir, "--offload", "auto", "--device-memory", BUDGET_GIB) == 0
    resident = {r.method: r for r in load_records(tmp_path / "resident" / "results")[0]}
    offloaded = {r.method: r for r in load_records(tmp_path / "offload" / "results")[0]}
    assert resident.keys() == offloaded.keys() == {"dense", "svdllm", "basis", "slicegpt", "shortgpt"}
    for method, rec in offloaded.items():
        placed = rec.details["placement"]
        assert placed["offload"] is True and not resident[method].details["placement"]["offload"]
        assert 0 < placed["placed_peak_eval_bytes"] <= placed["budget_bytes"]
        assert rec.key == resident[method].key  # offloading changes where, not what: the same cell
        assert rec.metrics["perplexity"] == pytest.approx(resident[method].metrics["perplexity"], rel=1e-4)
        assert rec.solution.get("knobs") == resident[method].solution.get("knobs")
    import pandas as pd

    for where, flag in (("resident", False), ("offload", True)):
        csv = pd.read_csv(tmp_path / where / "lb" / "leaderboard.csv")
        csv = csv[csv["status"] != REFERENCE]  # the chance row ran nowhere
        assert csv["offloaded"].tolist() == [flag] * len(csv) == [flag] * 5  # latency read with that in mind


def test_bench_run_refuses_a_device_too_small_for_one_block(tmp_path, deep_model_dir, capsys):
    assert _run(tmp_path, deep_model_dir, "--device-memory", "0.0001") == 2
    err = capsys.readouterr().err
    assert "budget" in err and "--calib-samples" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()  # refused before any work
    assert _run(tmp_path, deep_model_dir, "--offload", "off", "--device-memory", BUDGET_GIB) == 2
    assert "--offload auto" in capsys.readouterr().err


def test_each_method_declares_its_own_device_workspace():
    """The fit estimate adds what a method's own arithmetic holds beyond the engine's working set (on an H100 the
    peaks were 1.3-2.7x the estimate without it): float64 factorisations, SliceGPT's float32 signals."""
    model = make_tiny("llama", num_hidden_layers=4)
    adapter = get_adapter(model)
    widest = max(model.config.hidden_size, model.config.intermediate_size)
    want = {"svdllm": 3 * widest**2 * 8, "basis": 3 * widest**2 * 8, "delta": 3 * widest**2 * 8,
            "slicegpt": 2 * 256 * model.config.hidden_size * 4, "shortgpt": 0, "jointdrop": 0, "laco": 0}
    assert {m: registry.get_method(m)().device_workspace(adapter, 256) for m in registry.available()} == want
    base = placement_mod.working_set(model, adapter, 4, 64, 2)
    more = placement_mod.working_set(model, adapter, 4, 64, 2, workspace=1000)
    assert more["alone"] - base["alone"] == more["whole"] - base["whole"] == 1000
    fits = (base["alone"] + 500) / 2**30  # room for the engine's working set, not for 1000 more bytes
    assert placement_mod.fits_or_refuse(model, adapter, "cpu", "on", fits, "blockwise", 4, 64, 2).offload
    with pytest.raises(UserError, match="own workspace"):
        placement_mod.fits_or_refuse(model, adapter, "cpu", "on", fits, "blockwise", 4, 64, 2, workspace=1000)


def test_bench_run_counts_the_largest_workspace_of_its_methods(tmp_path, deep_model_dir, capsys):
    """A budget between the engine's working set and that plus SliceGPT's signals: a run with SliceGPT in it is
    refused up front, naming the workspace; the same budget runs ShortGPT, which declares none."""
    from bench.cli import main
    from bench.models import load_model
    from bench.suites import get_suite

    model = load_model(str(deep_model_dir), "cpu", "auto", None).model
    adapter, quick = get_adapter(model), get_suite("quick")
    base = placement_mod.working_set(model, adapter, 4, 64, max(1, quick.eval_batch_size // 2))
    slice_ws = registry.get_method("slicegpt")().device_workspace(adapter, 4 * 64)
    budget = f"{(base['alone'] + slice_ws // 2) / 2**30:.9f}"

    def run(methods: str, where: str) -> int:
        return main(["run", "--model", str(deep_model_dir), "--methods", methods, "--ratio", "0.2", "--results-dir",
                     str(tmp_path / where), "--leaderboard-dir", str(tmp_path / f"lb-{where}"), "--cache-dir",
                     str(tmp_path / "cache"), "--tasks", "none", "--calib-samples", "4", "--calib-seq-len", "64",
                     "--no-save", "--offload", "on", "--device-memory", budget]
                    + (["--set", "slicegpt.round_to=1"] if "slicegpt" in methods else []))

    assert run("shortgpt,slicegpt", "both") == 2
    err = capsys.readouterr().err
    assert "own workspace" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "both").exists()
    assert run("shortgpt", "short") == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_method_runs_in_half_precision_or_refuses_clearly(dtype):
    """--dtype bfloat16 (the CUDA default) and float16: a finite compressed model, or one clear line saying why not."""
    for method in sorted(registry.available()):
        model = make_tiny("llama", num_hidden_layers=BLOCKS).to(dtype)
        adapter = get_adapter(model)
        knobs = {"delta": {"train_tokens": 64}, "slicegpt": {"round_to": 1}}.get(method, {})
        inst = registry.get_method(method)(**knobs)
        try:
            inst.compress(model, adapter, tiny_calibration(), inst.solve(adapter, RATIO))
        except UserError as err:
            assert dtype == torch.float16 and method == "delta" and "bfloat16" in str(err), err
            continue
        with torch.no_grad():
            logits = model(input_ids=tiny_calibration().tokens[:2]).logits
        assert logits.dtype == dtype and torch.isfinite(logits).all(), method


def _halve_block0_mlp_out(model) -> None:
    adapter = get_adapter(model)
    adapter.linear(0, adapter.kinds()[-1]).weight.data.mul_(0.5)


def _block1_inputs(model, batches) -> list[torch.Tensor]:
    adapter, seen = get_adapter(model), []
    hook = adapter.block(1).register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(adapter.block_input(args, kwargs).clone()), with_kwargs=True)
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch, use_cache=False)
    hook.remove()
    return seen


@pytest.mark.parametrize("after", [False, True])
def test_walk_feeds_the_next_block_from_the_dense_or_the_edited_block(after, family):
    """after=False: the next block reads the dense model's activations; after=True: those of the edited model."""
    batches = list(tiny_calibration().batches("cpu"))
    dense, edited = make_tiny(family, num_hidden_layers=3), make_tiny(family, num_hidden_layers=3)
    _halve_block0_mlp_out(edited)
    want, other = _block1_inputs(edited if after else dense, batches), _block1_inputs(dense if after else edited, batches)
    model = make_tiny(family, num_hidden_layers=3)
    inputs = {}
    for step in blockwise.walk(model, get_adapter(model), batches, _placement("blockwise"), after=after):
        inputs[step.blocks[0]] = step.inputs
        if step.blocks[0] == 0:
            _halve_block0_mlp_out(model)  # the method's edit
    for got, w, o in zip(inputs[1], want, other, strict=True):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, o, rtol=1e-3, atol=1e-3)  # the two choices really differ
