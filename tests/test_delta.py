"""DeltaLLM: exact at full rank, counted budget, one stored base, distillation that helps, the PMR schedule."""

import copy

import pytest
import torch
from conftest import make_tiny, tiny_calibration

from bench import checkpoint, structure
from bench.adapters import get_adapter
from bench.budget import count_params
from bench.errors import UserError
from bench.registry import Solution
from methods._delta_train import hybrid, lr_factor, replace_probability
from methods.delta import DeltaLinear, DeltaLLM, block_groups, plan, svd_factors


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _effective(delta: DeltaLinear) -> torch.Tensor:
    return delta.base.weight + delta.up.weight @ delta.down.weight


def _deltas(adapter, knobs: dict):
    """(base block, follower block, kind, DeltaLinear) of every delta of a plan."""
    return [(g[0], f, k, adapter.linear(f, k)) for g in knobs["groups"] for f in g[1:] for k in knobs["kinds"]]


def test_groups_keep_the_ends_and_leave_a_lone_block_unshared():
    assert block_groups(8, 2, True) == [[1, 2], [3, 4], [5, 6]]
    assert block_groups(7, 2, True) == [[1, 2], [3, 4], [5]]
    assert block_groups(6, 3, False) == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize(("group_size", "keep_ends"), [(2, True), (3, False)])
def test_full_rank_deltas_reproduce_the_dense_model(family, group_size, keep_ends):
    model = make_tiny(family, num_hidden_layers=6)
    dense = copy.deepcopy(model)
    adapter = get_adapter(model)
    knobs = {"rank": 10**6, "kinds": adapter.kinds(), "groups": block_groups(6, group_size, keep_ends)}
    info = DeltaLLM(train_tokens=0, eval_windows=0).compress(model, adapter, tiny_calibration(), Solution(knobs, 0))
    assert info.train_tokens == 0 and info.details["deltas"] == len(_deltas(adapter, knobs))
    dense_adapter = get_adapter(dense)
    for _b, f, kind, delta in _deltas(adapter, knobs):
        ref = dense_adapter.linear(f, kind)
        assert isinstance(delta, DeltaLinear) and delta.rank == min(ref.out_features, ref.in_features)
        torch.testing.assert_close(_effective(delta), ref.weight, rtol=0, atol=1e-5)
        if ref.bias is not None:  # the follower keeps its own bias
            assert torch.equal(delta.up.bias, ref.bias)
    ids = tiny_calibration().tokens[:2]
    torch.testing.assert_close(_logits(model, ids), _logits(dense, ids), rtol=0, atol=1e-4)


def test_predicted_params_are_the_counted_params(family):
    for ratio in (0.03, 0.12, 0.2, 0.25):
        model = make_tiny(family, num_hidden_layers=6)
        adapter = get_adapter(model)
        dense = count_params(model)
        method = DeltaLLM(train_tokens=0, eval_windows=0)
        sol = method.solve(adapter, ratio)
        target = (1 - ratio) * dense
        # at or just above the target: one rank lower would fall below it
        assert sol.predicted_params >= target
        assert plan(adapter, sol.knobs["kinds"], sol.knobs["rank"] - 1, sol.knobs["groups"], dense).params < target
        method.compress(model, adapter, tiny_calibration(), sol)
        assert count_params(model) == sol.predicted_params
        mlp = {k for k in adapter.kinds() if adapter.role_of(k).startswith("mlp")}
        if ratio == 0.03:  # MLP first: attention is shared only when MLP alone cannot reach the target
            assert set(sol.knobs["kinds"]) == mlp
        if ratio == 0.25:
            assert set(sol.knobs["kinds"]) > mlp


def test_out_of_reach_and_bad_knobs_are_refused(family):
    adapter = get_adapter(make_tiny(family))
    with pytest.raises(UserError, match="removes at most"):
        DeltaLLM().solve(adapter, 0.5)
    with pytest.raises(UserError, match="no linear"):
        DeltaLLM(shared=["nope"]).solve(adapter, 0.1)
    with pytest.raises(UserError, match="group_size"):
        DeltaLLM(group_size=1).solve(adapter, 0.1)
    with pytest.raises(UserError, match="lr_schedule must be one of constant, cosine, linear"):
        DeltaLLM(lr_schedule="step").solve(adapter, 0.1)
    with pytest.raises(UserError, match="lr_warmup"):
        DeltaLLM(lr_warmup=1.0).solve(adapter, 0.1)
    assert DeltaLLM().solve(adapter, 0.0).knobs["kinds"] == []


def test_shared_bases_are_one_module_stored_once(family, tiny_tokenizer, tmp_path):
    model = make_tiny(family, vocab_size=len(tiny_tokenizer), num_hidden_layers=6)
    dense_ck = checkpoint.save(copy.deepcopy(model), tiny_tokenizer, tmp_path / "dense")
    adapter = get_adapter(model)
    calib = tiny_calibration(vocab_size=len(tiny_tokenizer))
    method = DeltaLLM(train_tokens=64, eval_windows=0, lr=1e-3)
    sol = method.solve(adapter, 0.25)
    method.compress(model, adapter, calib, sol)
    for b, _f, kind, delta in _deltas(adapter, sol.knobs):
        assert delta.base is adapter.linear(b, kind)
    ops = structure.structure_log(model)
    assert [o["op"] for o in ops] == ["delta_share"] * len(_deltas(adapter, sol.knobs))

    ck = checkpoint.save(model, tiny_tokenizer, tmp_path / "delta")
    size = (ck / checkpoint.WEIGHTS).stat().st_size
    assert count_params(model) * 4 <= size < count_params(model) * 4 + 64 * 1024  # each base weight once
    assert size < (dense_ck / checkpoint.WEIGHTS).stat().st_size - 0.2 * count_params(model) * 4
    loaded, _ = checkpoint.load(ck)
    la = get_adapter(loaded)
    for b, f, kind, _delta in _deltas(adapter, sol.knobs):
        assert la.linear(f, kind).base is la.linear(b, kind)
    assert count_params(loaded) == sol.predicted_params
    ids = calib.tokens[:2]
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_training_lowers_the_distillation_loss_and_touches_only_deltas(family):
    model = make_tiny(family, num_hidden_layers=6)
    dense = copy.deepcopy(model)
    adapter = get_adapter(model)
    method = DeltaLLM(train_tokens=768, lr=1e-3, eval_windows=2)
    sol = method.solve(adapter, 0.2)
    calib = tiny_calibration()
    info = method.compress(model, adapter, calib, sol)
    kl, train = info.details["kl"], info.details["train"]
    assert info.train_tokens == train["tokens"] == 24 * calib.seq_len  # 768 tokens = 24 windows of 32
    assert kl["train_trained"] < 0.7 * kl["train_untrained"]
    assert train["curve"][0][1] == pytest.approx(0.1) and train["curve"][-1][1] == 1.0
    touched = {id(p) for *_, d in _deltas(adapter, sol.knobs) for p in (d.up.weight, d.down.weight)}
    before = dict(dense.named_parameters())
    for name, p in model.named_parameters():
        assert p.requires_grad  # flags restored
        if id(p) not in touched:  # bases, norms, embeddings and the followers' own biases are frozen
            assert torch.equal(p, before[name.replace(".up.bias", ".bias")]), name


def test_training_reports_its_progress_to_the_harness(monkeypatch):
    from methods import _delta_train

    monkeypatch.setattr(_delta_train, "REPORT_EVERY", 0.0)  # a report after every step
    model = make_tiny("llama", num_hidden_layers=4)
    adapter = get_adapter(model)
    method = DeltaLLM(train_tokens=128, eval_windows=1)
    calib = tiny_calibration()
    lines: list[str] = []
    calib.report = lines.append
    method.compress(model, adapter, calib, method.solve(adapter, 0.1))
    assert [line.split(" / ")[0] for line in lines] == ["training 32", "training 64", "training 96", "training 128"]
    assert all(" / 128 tokens (" in line and "left, loss " in line for line in lines)


def test_progress_line_reads_as_an_eta():
    from methods._delta_train import progress_line

    assert progress_line(200_000, 1_000_000, 1_000.0, 1.2345) == \
        "training 200,000 / 1,000,000 tokens (20 %), 200 tokens/s, ~1:06:40 left, loss 1.234"


def test_a_distillation_the_device_cannot_hold_is_refused_before_the_teacher_is_copied():
    """Issue 8: the teacher copy and the training's activations and logits must fit beside the resident model."""
    from bench.placement import Placement, module_bytes
    from methods._delta_train import optimizer_bytes, training_bytes
    from methods.delta import trained_params

    model = make_tiny("llama", num_hidden_layers=4)
    adapter = get_adapter(model)
    weights, per_forward = module_bytes(model), training_bytes(adapter, 2, 32, 4)
    assert training_bytes(adapter, 4, 32, 4) == 2 * per_forward == training_bytes(adapter, 2, 64, 4)  # per token
    method = DeltaLLM(train_tokens=64, eval_windows=1, batch_size=4, micro_batch=2)
    sol = method.solve(adapter, 0.1)
    optim = optimizer_bytes(trained_params(adapter, sol.knobs), 4)
    assert optim == trained_params(adapter, sol.knobs) * 12  # float32: gradient and two AdamW moments, no master
    calib = tiny_calibration()
    calib.placement = Placement(budget_bytes=2 * weights + per_forward + optim - 1)  # one byte short
    with pytest.raises(UserError, match=r"a dense teacher copy .* of 2 x 32 tokens a forward .* AdamW moments .* "
                                        r"budget is left"):
        method.compress(model, adapter, calib, sol)
    assert all(not isinstance(m, DeltaLinear) for m in model.modules())  # refused before any change
    calib.placement = Placement(budget_bytes=2 * weights + per_forward + optim)
    assert method.compress(model, adapter, calib, sol).train_tokens == 128  # one whole step: 4 windows of 32
    untrained = DeltaLLM(train_tokens=0, eval_windows=1)  # the held-out KL alone needs the teacher, not training
    fresh = make_tiny("llama", num_hidden_layers=4)
    calib.placement = Placement(budget_bytes=2 * module_bytes(fresh))
    untrained.compress(fresh, get_adapter(fresh), calib, untrained.solve(get_adapter(fresh), 0.1))


def test_untrained_variant_is_the_truncated_svd(family):
    model = make_tiny(family, num_hidden_layers=6)
    dense_adapter = get_adapter(copy.deepcopy(model))
    adapter = get_adapter(model)
    method = DeltaLLM(train_tokens=0)
    sol = method.solve(adapter, 0.12)
    info = method.compress(model, adapter, tiny_calibration(), sol)
    assert info.train_tokens == 0 and "train" not in info.details
    assert set(info.details["kl"]) == {"heldout_untrained", "train_untrained"}
    for b, f, kind, delta in _deltas(adapter, sol.knobs):
        diff = dense_adapter.linear(f, kind).weight - dense_adapter.linear(b, kind).weight
        a, bb = svd_factors(diff, sol.knobs["rank"])
        torch.testing.assert_close(delta.up.weight @ delta.down.weight, a @ bb)
        s = torch.linalg.svdvals(diff.double())  # Eckart-Young: the error is the dropped singular values
        err = torch.linalg.matrix_norm((_effective(delta) - dense_adapter.linear(f, kind).weight).double())
        assert err.item() == pytest.approx(s[sol.knobs["rank"]:].norm().item(), rel=1e-4)


def test_train_base_moves_the_shared_base_and_keeps_it_shared():
    model = make_tiny("llama", num_hidden_layers=6)
    dense_adapter = get_adapter(copy.deepcopy(model))
    adapter = get_adapter(model)
    method = DeltaLLM(train_tokens=256, lr=1e-3, train_base=True)
    sol = method.solve(adapter, 0.12)
    method.compress(model, adapter, tiny_calibration(), sol)
    b, _f, kind, delta = _deltas(adapter, sol.knobs)[0]
    assert delta.base is adapter.linear(b, kind)
    assert not torch.equal(delta.base.weight, dense_adapter.linear(b, kind).weight)


def test_pmr_schedule_rises_linearly_then_stays_at_one():
    assert replace_probability(0, 100, 0.1, 0.5) == pytest.approx(0.1)
    assert replace_probability(25, 100, 0.1, 0.5) == pytest.approx(0.55)
    assert replace_probability(50, 100, 0.1, 0.5) == 1.0
    assert replace_probability(99, 100, 0.1, 0.5) == 1.0
    assert replace_probability(0, 100, 0.1, 0.0) == 1.0


def test_learning_rate_schedules_warm_up_then_decay_to_zero_after_the_last_step():
    assert [lr_factor(s, 10, "constant", 0.0) for s in range(10)] == [1.0] * 10
    warm = [lr_factor(s, 100, "constant", 0.2) for s in range(100)]
    assert warm[:20] == pytest.approx([(s + 1) / 20 for s in range(20)]) and warm[19:] == [1.0] * 81
    for shape in ("cosine", "linear"):
        rates = [lr_factor(s, 100, shape, 0.1) for s in range(100)]
        assert rates[9] == 1.0 and rates[10] == 1.0  # the peak at the end of the warm-up and the first decay step
        assert all(a > b for a, b in zip(rates[10:], rates[11:], strict=False)) and 0 < rates[-1] < 0.03
    assert lr_factor(55, 100, "cosine", 0.1) == pytest.approx(0.5)  # halfway through the decay
    assert lr_factor(55, 100, "linear", 0.1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, 10, "step", 0.0)


@pytest.mark.parametrize("shape", ["constant", "cosine"])
def test_each_step_trains_at_the_scheduled_rate(monkeypatch, shape):
    """The rate AdamW steps with is lr x the schedule's factor at that step (24 steps of one window)."""
    seen = []
    step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    model = make_tiny("llama", num_hidden_layers=6)
    method = DeltaLLM(train_tokens=768, lr=2e-3, eval_windows=2, lr_schedule=shape, lr_warmup=0.25)
    adapter = get_adapter(model)
    info = method.compress(model, adapter, tiny_calibration(), method.solve(adapter, 0.2))
    assert seen == pytest.approx([2e-3 * lr_factor(s, 24, shape, 0.25) for s in range(24)])
    assert seen[0] == pytest.approx(2e-3 / 6) and max(seen) == pytest.approx(2e-3)
    assert info.details["train"]["lr_schedule"] == {"shape": shape, "warmup": 0.25}


def test_hybrid_with_every_block_from_the_teacher_is_the_teacher(family):
    model = make_tiny(family, num_hidden_layers=6)
    teacher = copy.deepcopy(model)
    adapter = get_adapter(model)
    method = DeltaLLM(train_tokens=0, eval_windows=0)
    method.compress(model, adapter, tiny_calibration(), method.solve(adapter, 0.25))
    ids = tiny_calibration().tokens[:2]
    own = list(adapter.blocks())
    with hybrid(adapter, get_adapter(teacher).blocks(), list(range(6))):
        assert torch.equal(_logits(model, ids), _logits(teacher, ids))
    assert all(a is b for a, b in zip(adapter.blocks(), own, strict=True))
    assert not torch.equal(_logits(model, ids), _logits(teacher, ids))


@pytest.mark.parametrize("train_base", [False, True])
def test_trained_params_counts_exactly_what_the_distillation_trains(family, train_base):
    from methods.delta import trained_params

    model = make_tiny(family, num_hidden_layers=6)
    adapter = get_adapter(model)
    method = DeltaLLM(train_tokens=0, eval_windows=0, train_base=train_base)
    sol = method.solve(adapter, 0.12)
    method.compress(model, adapter, tiny_calibration(), sol)
    deltas = [m for m in model.modules() if isinstance(m, DeltaLinear)]
    trained = {id(p): p for d in deltas for p in (d.down.weight, d.up.weight)}
    if train_base:
        trained |= {id(d.base.weight): d.base.weight for d in deltas}
    assert deltas and trained_params(adapter, sol.knobs, train_base) == sum(p.numel() for p in trained.values())
