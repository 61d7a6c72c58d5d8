"""bench scaling: the random-weight Llama builder against the parameter-count formula (every shape, 70B included,
on the meta device), and the command end to end on the tiny shape."""

import dataclasses
import json

import pytest
import torch
import transformers

from bench import scaling
from bench.budget import count_params
from bench.cli import main
from bench.errors import UserError


def llama_params(s: scaling.Shape) -> int:
    """A Llama's parameters: per block q, o (h x h), k, v (h x kv_heads * head_dim), gate, up, down (h x i) and two
    norms; then the embedding, an untied head and the final norm."""
    kv = s.kv_heads * (s.hidden // s.heads)
    block = 2 * s.hidden * s.hidden + 2 * s.hidden * kv + 3 * s.hidden * s.intermediate + 2 * s.hidden
    return s.blocks * block + s.vocab * s.hidden * (1 if s.tied else 2) + s.hidden


@pytest.mark.parametrize("name", sorted(scaling.SHAPES))
def test_every_shape_has_the_llama_parameter_count(name):
    shape = scaling.SHAPES[name]
    model = scaling.build(shape, "meta", torch.bfloat16)
    assert count_params(model) == llama_params(shape)
    assert len(model.model.layers) == shape.blocks
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == shape.tied


def test_published_sizes():
    """The formula itself, against the sizes the model cards give."""
    assert llama_params(scaling.SHAPES["llama2-7b"]) == 6_738_415_616
    assert llama_params(scaling.SHAPES["llama2-13b"]) == 13_015_864_320
    assert llama_params(scaling.SHAPES["llama2-70b"]) == 68_976_648_192
    assert llama_params(scaling.SHAPES["smollm2-135m"]) == 134_515_008


def test_built_weights_are_seeded_tied_and_the_rotary_buffers_real():
    shape = scaling.SHAPES["tiny"]
    a, b = scaling.build(shape, seed=3), scaling.build(shape, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, scaling.build(shape, seed=4).model.layers[0].mlp.up_proj.weight)
    # drawn elsewhere and copied home (a GPU draws an offloaded model's weights): the same draws, resting on the host
    c = scaling.build(shape, "cpu", seed=3, draw_on="cpu")
    assert all(torch.equal(x, y) and y.device.type == "cpu" for x, y in zip(a.parameters(), c.parameters(), strict=True))
    w = torch.cat([p.detach().flatten() for p in a.parameters() if p.dim() == 2])
    assert abs(float(w.std()) - 0.02) < 0.001 and abs(float(w.mean())) < 0.001
    assert all(bool((p == 1).all()) for p in a.parameters() if p.dim() == 1)
    reference = transformers.AutoModelForCausalLM.from_config(shape.config())
    assert torch.equal(a.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    ids = torch.randint(0, shape.vocab, (2, 16))
    with torch.no_grad():
        assert torch.isfinite(a(input_ids=ids).logits).all()


def test_explicit_sizes_and_bad_shapes():
    s = scaling.parse_shape("1024x2752x8")
    assert (s.hidden, s.intermediate, s.blocks, s.heads, s.kv_heads) == (1024, 2752, 8, 8, 8)
    assert scaling.parse_shape("576x1536x2x9x3").kv_heads == 3
    for bad in ("huge", "64x128", "64x128x0", "64x128x2x5"):
        with pytest.raises(UserError):
            scaling.parse_shape(bad)


def test_bench_scaling_tiny_end_to_end(tmp_path, capsys):
    path = tmp_path / "figures" / "tiny.json"
    rc = main(["scaling", "--shape", "tiny", "--methods", "svdllm,shortgpt,delta", "--device", "cpu",
               "--calib-samples", "4", "--calib-seq-len", "32", "--blocks", "6", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0
    report = json.loads(path.read_text())
    assert report["schema"] == "slimbench.scaling" and report["settings"]["dtype"] == "float32"
    cells = {c["method"]: c for c in report["cells"]}
    assert set(cells) == {"svdllm", "shortgpt", "delta"}
    assert cells["delta"]["knobs"] == {"train_tokens": "0"}  # untrained unless --set says otherwise
    for c in cells.values():
        assert c["blocks"] == 6 and c["shape"] == "tiny"
        assert c["params"] == llama_params(dataclasses.replace(scaling.SHAPES["tiny"], blocks=6))
        if c["status"] == "ok":
            assert c["params_after"] == c["predicted_params"]
            assert c["seconds"] > 0 and c["peak_host_bytes"] > 0 and c["peak_device_bytes"] is None
    assert abs(cells["svdllm"]["achieved_ratio"] - 0.2) < 0.02
    projected = {p["method"]: p for p in report["projections"]}
    assert set(projected) == {m for m, c in cells.items() if c["status"] == "ok"}
    for p in projected.values():
        assert p["projected"] and p["shape"] == "llama2-70b" and p["blocks"] == 80
        assert 0 <= p["host_bytes_offload"] - 68_976_648_192 * 4 < 2**20  # float32 on CPU, plus the rotary buffers
    assert "PROJECTED, not measured" in out and "NOT A FORECAST" in out and "svdllm" in out
    assert main(["scaling", "--from-json", str(path)]) == 0  # the same table and projection from the stored file
    again = capsys.readouterr().out
    def rows(text):
        return [line for line in text.splitlines() if line.startswith(("│", "PROJECTED"))]

    assert rows(again) == rows(out) and len(rows(out)) == len(cells) + 1 + len(projected)  # + the memory line


@pytest.mark.parametrize("argv", [["--shape", "llama2-70b"], ["--shape", "tiny,tiny"], ["--blocks", "0"],
                                  ["--methods", "svdllm", "--set", "basis.group_size=3"], ["--ratio", "1.5"],
                                  ["--methods", "nosuch"], ["--set", "delta.train_tokens=many"],
                                  ["--from-json", "pyproject.toml"]])
def test_bench_scaling_refuses_bad_input(argv, capsys):
    assert main(["scaling", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def _cell(shape: scaling.Shape, seconds_per_block: float, setup: scaling.Setup) -> scaling.Cell:
    facts = scaling.block_facts(scaling.build(shape, "meta"), setup)
    return scaling.Cell(shape=shape.name, method="m", knobs={}, blocks=shape.blocks, params=facts["params"],
                        device="cpu", dtype="float32", offload=False, seconds=seconds_per_block * shape.blocks,
                        seconds_per_block=seconds_per_block, facts=facts)


def test_projection_fits_the_exponent_and_says_when_it_is_no_forecast():
    """Seconds per block growing as block params^1.2 between two shapes: the fit finds 1.2 and carries it to 70B;
    memory is the one-block formula of 70B's own modules."""
    setup = scaling.Setup(calib_samples=128, calib_seq_len=2048, dtype="bfloat16")
    a, b = scaling.SHAPES["llama2-7b"], scaling.SHAPES["llama2-13b"]
    pa = scaling.block_facts(scaling.build(a, "meta"), setup)["block_params"]
    pb = scaling.block_facts(scaling.build(b, "meta"), setup)["block_params"]
    (p,) = scaling.project([_cell(a, 10.0, setup), _cell(b, 10.0 * (pb / pa) ** 1.2, setup)], setup)
    assert p["exponent"] == pytest.approx(1.2) and p["from_shape"] == "llama2-13b"
    growth = p["facts"]["block_params"] / pb
    assert p["seconds"] == pytest.approx(10.0 * (pb / pa) ** 1.2 * growth ** 1.2 * 80)
    f = p["facts"]
    assert f["block_params"] == 2 * 8192**2 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192
    assert f["statistics_bytes_per_block"] == (3 * 8192**2 + 28672**2) * 8  # attn_in, attn_out, mlp_in, mlp_out
    assert f["one_block_bytes"] == f["non_block_bytes"] + f["block_bytes"] + f["statistics_bytes_per_block"] \
        + f["activation_bytes"]
    lines = scaling.projection_lines([p])
    assert all(line.startswith("PROJECTED, not measured") for line in lines) and "NOT A FORECAST" not in lines[1]
    (tiny,) = scaling.project([_cell(scaling.SHAPES["tiny"], 0.5, setup)], setup)
    assert tiny["exponent"] == 1.5 and "NOT A FORECAST" in scaling.projection_lines([tiny])[1]


def test_a_trained_cell_records_its_tokens_per_second_and_is_not_projected(tmp_path, capsys):
    """DeltaLLM with training (its 7B memory and throughput on a GPU are measured this way): the cell holds the
    tokens and the seconds they took, the table shows tokens/s, and the 70B time is not projected from it."""
    path = tmp_path / "trained.json"
    rc = main(["scaling", "--shape", "tiny", "--methods", "delta,shortgpt", "--device", "cpu", "--calib-samples", "4",
               "--calib-seq-len", "32", "--blocks", "6", "--set", "delta.train_tokens=64", "--set",
               "delta.eval_windows=1", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0
    cells = {c["method"]: c for c in json.loads(path.read_text())["cells"]}
    assert cells["delta"]["train_tokens"] == 64 and 0 < cells["delta"]["train_seconds"] < cells["delta"]["seconds"]
    assert cells["shortgpt"]["train_tokens"] == 0 and cells["shortgpt"]["train_seconds"] == 0.0
    assert "trained 64 tokens at" in out and "train tokens/s" in out
    projected = {p["method"] for p in json.loads(path.read_text())["projections"]}
    assert projected == {"shortgpt"}


def test_a_gpu_measured_peak_is_projected_by_the_formulas_growth_and_the_highest_of_a_shape_counts():
    """SliceGPT's 7B peak on an H200 was 2.3x the one-block formula: the 70B projection carries the measured excess
    (measured x formula(70B) / formula(7B)), from the highest peak measured at the largest shape; without an
    offloaded GPU measurement there is no such figure."""
    setup = scaling.Setup(calib_samples=128, calib_seq_len=2048, dtype="bfloat16")
    seven = scaling.SHAPES["llama2-7b"]
    low, high = _cell(seven, 2.0, setup), _cell(seven, 2.0, setup)
    formula = low.facts["one_block_bytes"]
    for cell, times in ((low, 1.5), (high, 2.3)):
        cell.offload, cell.device, cell.peak_device_bytes = True, "cuda", round(times * formula)
    (p,) = scaling.project([low, high], setup)
    target = p["facts"]["one_block_bytes"]
    assert p["check"]["measured_device_peak_bytes"] == high.peak_device_bytes
    assert p["device_peak_bytes_scaled"] == pytest.approx(2.3 * target, rel=1e-9)
    assert f"device peak {2.3 * target / scaling.GB:.1f} GB" in scaling.projection_lines([p])[1]
    (unmeasured,) = scaling.project([_cell(seven, 2.0, setup)], setup)
    assert unmeasured["device_peak_bytes_scaled"] is None and "device peak" not in scaling.projection_lines(
        [unmeasured])[1]
