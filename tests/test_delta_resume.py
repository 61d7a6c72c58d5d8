"""DeltaLLM's training state: a killed distillation resumes to exactly the uninterrupted result, and a state that is
not the run's own (another run's, damaged) is never trained on."""

import pytest
import torch
from conftest import make_tiny, tiny_calibration

from bench.adapters import get_adapter
from bench.calibration import Calibration
from methods import _delta_train as training
from methods.delta import DeltaLinear, DeltaLLM


class Killed(Exception):
    pass


def _run(cache, dtype=torch.float32, **knobs):
    """The tiny Llama at 10 %, 8 steps of 2 windows x 32 tokens; ``cache``: where states are saved (None: nowhere)."""
    torch.manual_seed(0)
    model = make_tiny("llama", num_hidden_layers=6).to(dtype)
    adapter = get_adapter(model)
    calib = Calibration(tokens=tiny_calibration().tokens, seed=0, batch_size=4, cache_dir=cache,
                        model_key="tiny" if cache else "")
    method = DeltaLLM(**{"train_tokens": 512, "batch_size": 2, "lr": 1e-3, "eval_windows": 2, "autocast": "off",
                         "curve_at": ["0", "128", "384"], "save_every": 1e-9} | knobs)
    info = method.compress(model, adapter, calib, method.solve(adapter, 0.1))
    weights = [w.detach().clone() for m in model.modules() if isinstance(m, DeltaLinear) for w in (m.down.weight,
                                                                                                    m.up.weight)]
    if cache is not None:  # the finished state is kept, and handed over, for the harness to remove
        assert info.scratch == list(cache.glob("delta-train-*.safetensors")) and len(info.scratch) == 1
    else:
        assert info.scratch == []
    return weights, info.details


@pytest.mark.parametrize("dtype, knobs", [(torch.float32, {}), (torch.bfloat16, {}),
                                          (torch.float32, {"lr_schedule": "cosine", "lr_warmup": 0.25})])
def test_a_killed_training_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, dtype, knobs):
    """Killed at step 6 with the last state saved after step 3: the rerun starts at step 3, redoes 3-5, and ends
    with the same weights, losses and curve as a run never stopped (bit for bit, on one machine); with a warmed-up,
    decaying learning rate too (the rate is set from the step, not carried by a scheduler)."""
    ref, ref_details = _run(None, dtype, **knobs)
    save, schedule = training.save_state, training.replace_probability

    def save_at_3(path, key, weights, opt, gen, log):
        return save(path, key, weights, opt, gen, log) if log["step"] == 3 else False

    def kill_at_6(step, *args):
        if step == 6:
            raise Killed
        return schedule(step, *args)

    monkeypatch.setattr(training, "save_state", save_at_3)
    monkeypatch.setattr(training, "replace_probability", kill_at_6)
    with pytest.raises(Killed):
        _run(tmp_path, dtype, **knobs)
    states = list(tmp_path.glob("delta-train-*.safetensors"))
    assert len(states) == 1
    monkeypatch.setattr(training, "replace_probability", schedule)
    got, details = _run(tmp_path, dtype, **knobs)
    train, ref_train = details["train"], ref_details["train"]
    assert [r["step"] for r in train["resumed"]] == [3] and train["resumed"][0]["tokens"] == 3 * 64
    assert ref_train["resumed"] == [] and ref_train["state_saves"] == 0  # no cache: nothing saved
    assert train["steps"] == ref_train["steps"] == 8 and train["tokens"] == 512
    assert train["curve"] == ref_train["curve"]  # every step's loss and p(t), the first three from the state
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    strip = [{k: v for k, v in p.items() if k != "seconds"} for p in details["curve"]]
    assert strip == [{k: v for k, v in p.items() if k != "seconds"} for p in ref_details["curve"]]
    assert [p["tokens"] for p in details["curve"]] == [0, 128, 384, 512]  # 128 from before the kill, 384 after
    assert details["kl"] == ref_details["kl"]


def test_an_uninterrupted_run_with_saves_equals_one_without(tmp_path):
    ref, ref_details = _run(None)
    got, details = _run(tmp_path)  # a save after every step
    assert details["train"]["state_saves"] == 8 and details["train"]["resumed"] == []  # 7 steps in, and the end
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    assert details["kl"] == ref_details["kl"]


def test_a_run_killed_after_training_does_not_train_again(tmp_path, monkeypatch):
    """The finished state outlives training: the rerun of a run killed while its trained model was being evaluated
    takes no training step and ends with the same weights, curve, KL and training log."""
    ref, ref_details = _run(tmp_path)

    def no_step(*args):
        raise AssertionError("trained again")

    monkeypatch.setattr(training, "replace_probability", no_step)
    got, details = _run(tmp_path)
    train, ref_train = details["train"], ref_details["train"]
    assert train["resumed"] == [{"step": 8, "tokens": 512, "seconds": round(ref_train["seconds"], 3)}]
    assert train["seconds"] == ref_train["seconds"] and train["state_saves"] == 0
    assert train["curve"] == ref_train["curve"] and details["curve"] == ref_details["curve"]
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    assert details["kl"] == ref_details["kl"]


def _state(tmp_path, key="k"):
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.randn(4, 3)
    opt.step()
    path = tmp_path / "state.safetensors"
    gen = torch.Generator().manual_seed(1)
    assert training.save_state(path, key, [w], opt, gen, {"step": 2, "tokens": 10, "seconds": 1.0, "losses": [1.0, 2.0],
                                                          "probs": [0.1, 0.2], "points": [], "resumed": []})
    return path, w


def _fresh():
    w = torch.nn.Parameter(torch.zeros(4, 3))
    return w, torch.optim.AdamW([w], lr=0.1), torch.Generator()


def test_a_state_reads_back_whole(tmp_path):
    path, saved = _state(tmp_path)
    w, opt, gen = _fresh()
    log = training.load_state(path, "k", [w], opt, gen, steps=8)
    assert log["step"] == 2 and log["losses"] == [1.0, 2.0]
    assert torch.equal(w, saved) and int(opt.state[w]["step"]) == 1
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(1).get_state())


@pytest.mark.parametrize(("key", "steps", "why"), [("other", 8, "key mismatch"), ("k", 1, "a step beyond")])
def test_another_runs_state_is_quarantined_not_trained_on(tmp_path, key, steps, why, capsys):
    path, _ = _state(tmp_path)
    w, opt, gen = _fresh()
    assert training.load_state(path, key, [w], opt, gen, steps) is None
    assert not path.exists() and len(list(tmp_path.glob("state.safetensors.bad-*"))) == 1
    assert torch.equal(w, torch.zeros(4, 3)) and not opt.state  # nothing was loaded
    assert why in capsys.readouterr().err


def test_a_damaged_state_is_quarantined(tmp_path):
    path, _ = _state(tmp_path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the tensor bytes
    path.write_bytes(bytes(data))
    w, opt, gen = _fresh()
    assert training.load_state(path, "k", [w], opt, gen, 8) is None
    assert list(tmp_path.glob("state.safetensors.bad-*"))


def test_the_state_key_follows_every_result_knob_but_not_the_save_interval(tmp_path):
    torch.manual_seed(0)
    model = make_tiny("llama", num_hidden_layers=6)
    adapter = get_adapter(model)
    calib = Calibration(tokens=tiny_calibration().tokens, seed=0, cache_dir=tmp_path, model_key="tiny")
    sol = DeltaLLM().solve(adapter, 0.1)
    params = [torch.nn.Parameter(torch.zeros(2))]
    rows = calib.tokens[:6]

    def key(**knobs):
        return DeltaLLM(**knobs)._state_file(calib, sol, rows, params)[1]

    assert key() == key(save_every=5.0)
    assert len({key(), key(lr=2e-3), key(train_tokens=1024), key(pmr_warmup=0.3), key(lr_schedule="cosine"),
                key(lr_warmup=0.1)}) == 6
    # knobs added later leave the key of a run at their default as it was before they existed
    assert key() == key(lr_schedule="constant", lr_warmup=0.0)
    assert "lr_schedule" in DeltaLLM().knob_dict() and "lr_schedule" not in DeltaLLM().result_knobs()
    assert DeltaLLM(lr_schedule="cosine").result_knobs()["lr_schedule"] == "cosine"
    assert DeltaLLM(save_every=0)._state_file(calib, sol, rows, params) == (None, "")
    assert "save_every" in DeltaLLM().knob_dict() and "save_every" not in DeltaLLM().result_knobs()
    assert DeltaLLM.operational_knobs() == {"save_every"}


def _bench_run(tmp_path, model_dir, *extra):
    """`bench run` of DeltaLLM at 20 % on the tiny model, 512 tokens in steps of 2 windows x 32, perplexity only,
    results in tmp_path/results and states in tmp_path/cache; ``extra``: more arguments."""
    from bench.cli import main

    return main(["run", "--model", str(model_dir), "--methods", "delta", "--ratio", "0.2", "--train-tokens", "512",
                 "--set", "delta.batch_size=2", *extra, "--results-dir", str(tmp_path / "results"),
                 "--leaderboard-dir", str(tmp_path / "lb"), "--cache-dir", str(tmp_path / "cache"), "--tasks", "none",
                 "--calib-samples", "4", "--calib-seq-len", "32", "--no-save"])


def _delta_records(tmp_path):
    """The delta records a `bench run` with ``--results-dir tmp_path/results`` wrote."""
    from bench.records import load_records

    return [r for r in load_records(tmp_path / "results")[0] if r.method == "delta"]


def _states(tmp_path):
    """The training states in the run's cache (``--cache-dir tmp_path/cache``)."""
    return list((tmp_path / "cache").rglob("delta-train-*.safetensors"))


def test_bench_run_resumes_a_failed_cell_and_a_save_interval_keeps_its_record(tmp_path, tiny_model_dir, monkeypatch):
    """Through the runner: a cell that died mid-training is recomputed from its saved state (found in the run's
    cache by its key); setting delta.save_every changes neither the cell's key nor its record's file."""
    def run(*extra):
        return _bench_run(tmp_path, tiny_model_dir, "--set", "delta.save_every=0.000001", *extra)

    schedule = training.replace_probability

    def kill_at_5(step, *args):
        if step == 5:
            raise Killed("the node went away")
        return schedule(step, *args)

    monkeypatch.setattr(training, "replace_probability", kill_at_5)
    run()
    (rec,) = _delta_records(tmp_path)
    assert rec.status != "ok" and "the node went away" in rec.error
    assert len(_states(tmp_path)) == 1
    monkeypatch.setattr(training, "replace_probability", schedule)
    assert run() == 0
    (rec,) = _delta_records(tmp_path)
    assert rec.status == "ok" and [r["step"] for r in rec.details["train"]["resumed"]] == [5]
    assert rec.cost["train_tokens"] == 512 and "save_every" not in rec.knob_overrides
    assert not _states(tmp_path)
    files = sorted(p.name for p in (tmp_path / "results").rglob("delta*.json"))
    assert run("--set", "delta.save_every=30") == 0  # same key: the record is reused, not recomputed
    assert sorted(p.name for p in (tmp_path / "results").rglob("delta*.json")) == files
    (again,) = _delta_records(tmp_path)
    assert again.started == rec.started


def test_bench_run_killed_while_evaluating_keeps_the_trained_state_until_the_record(tmp_path, tiny_model_dir,
                                                                                     monkeypatch):
    """A cell that dies after training, in its evaluation, keeps the finished state; the rerun evaluates the same
    trained model without a training step, and the state is removed once that record is on disk."""
    from bench import runner

    def run():
        return _bench_run(tmp_path, tiny_model_dir)

    evaluate = runner.evaluate

    def killed_unless_dense(*args, dense=False, **kw):
        if not dense:
            raise Killed("the job's time ran out")
        return evaluate(*args, dense=dense, **kw)

    monkeypatch.setattr(runner, "evaluate", killed_unless_dense)
    run()
    (rec,) = _delta_records(tmp_path)
    assert rec.status != "ok" and "time ran out" in rec.error
    assert len(_states(tmp_path)) == 1
    monkeypatch.setattr(runner, "evaluate", evaluate)
    schedule = training.replace_probability
    monkeypatch.setattr(training, "replace_probability", lambda *a: pytest.fail("trained again"))
    assert run() == 0
    monkeypatch.setattr(training, "replace_probability", schedule)
    (rec,) = _delta_records(tmp_path)
    assert rec.status == "ok" and rec.details["train"]["resumed"][0]["step"] == rec.details["train"]["steps"] == 8
    assert rec.cost["train_tokens"] == 512
    assert not _states(tmp_path)
