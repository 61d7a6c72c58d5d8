"""``bench scaling``: compression time and peak memory per method on random-weight Llama models of growing size.

Nothing is downloaded: a model is built from a named shape (or ``HIDDENxINTERMEDIATExBLOCKS[xHEADS[xKV]]``) on
the meta device and materialised in place in the target dtype, each weight drawn N(0, 0.02) from one seeded
generator (norms are ones), so a 7B model costs its bf16 weights and no second copy. Every (shape, method) cell
compresses a fresh build of the same seed on random calibration tokens and records the seconds of ``solve`` and
``compress``, the device and host peaks during ``compress``, the achieved ratio by counting, and per-block figures.
Shapes too big to measure (llama2-70b) are *projected* from the per-block figures of the measured ones.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import time
import traceback
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import transformers
from torch import nn

from bench import hostheap
from bench.adapters import get_adapter
from bench.budget import count_bytes, count_params
from bench.calibration import Calibration
from bench.errors import UserError
from bench.evaluate.efficiency import PeakMemory, _rss_bytes
from bench.placement import Placement
from bench.registry import available, get_method

SCHEMA = "slimbench.scaling"
SCHEMA_VERSION = 1
#: the default for --methods all: DeltaLLM without training (its distillation would dominate every figure)
UNTRAINED = {"delta": {"train_tokens": "0"}}
#: the shape too big to measure on one 80 GB GPU with its host; always projected
PROJECTED = "llama2-70b"
GB = 1e9
#: a seconds projection from a block more than this many times smaller than the target's is flagged as no forecast
MAX_GROWTH = 10


@dataclass(frozen=True)
class Shape:
    """A Llama model's size: everything else comes from the modules built from it."""

    name: str
    hidden: int
    intermediate: int
    blocks: int
    heads: int
    kv_heads: int
    vocab: int = 32000
    tied: bool = False

    def config(self) -> transformers.LlamaConfig:
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise UserError(f"shape {self.name}: {self.heads} heads must divide hidden {self.hidden} and be a multiple "
                            f"of {self.kv_heads} kv heads")
        return transformers.LlamaConfig(hidden_size=self.hidden, intermediate_size=self.intermediate,
                                        num_hidden_layers=self.blocks, num_attention_heads=self.heads,
                                        num_key_value_heads=self.kv_heads, vocab_size=self.vocab,
                                        tie_word_embeddings=self.tied, max_position_embeddings=4096)


SHAPES = {s.name: s for s in (
    Shape("tiny", 64, 128, 4, 4, 2, vocab=512, tied=True),
    Shape("small", 256, 688, 8, 8, 8, vocab=4096, tied=True),
    Shape("smollm2-135m", 576, 1536, 30, 9, 3, vocab=49152, tied=True),
    Shape("llama2-7b", 4096, 11008, 32, 32, 32),
    Shape("llama2-13b", 5120, 13824, 40, 40, 40),
    Shape("llama2-70b", 8192, 28672, 80, 64, 8),
)}


def parse_shape(text: str) -> Shape:
    """A named shape, or ``HIDDENxINTERMEDIATExBLOCKS[xHEADS[xKV]]`` (heads default hidden/128, or /64; vocab 32000)."""
    if text in SHAPES:
        return SHAPES[text]
    try:
        sizes = [int(x) for x in text.lower().split("x")]
    except ValueError:
        sizes = []
    if not 3 <= len(sizes) <= 5 or min(sizes) < 1:
        raise UserError(f"--shape {text!r}: give one of {', '.join(SHAPES)} or HIDDENxINTERMEDIATExBLOCKS[xHEADS[xKV]], "
                        "e.g. 1024x2752x8")
    hidden, inter, blocks = sizes[:3]
    heads = sizes[3] if len(sizes) > 3 else (hidden // 128 if hidden % 128 == 0 else max(1, hidden // 64))
    shape = Shape(text, hidden, inter, blocks, heads, sizes[4] if len(sizes) > 4 else heads)
    shape.config()  # heads that do not divide are refused here
    return shape


def build(shape: Shape, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
          seed: int = 0, draw_on: torch.device | str | None = None) -> nn.Module:
    """A random-weight LlamaForCausalLM of ``shape`` on ``device`` ("meta": no memory), eval mode.

    Parameters are created on the meta device and each is materialised once, in ``dtype``, on ``device``;
    rotary buffers are computed as transformers computes them. Tied weights stay one tensor. ``draw_on`` (default
    ``device``) is where the random numbers are drawn: an offloaded model rests on the host but is drawn on the GPU
    and copied home, one weight at a time (an H100 session spent 25-35 s per 7B-shaped cell drawing on the host).
    The weights depend on the seed and on where they are drawn.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(shape.config(), dtype=dtype)
    model.tie_weights()  # empty-weight construction leaves a tied head its own meta tensor
    device = torch.device(device)
    if device.type == "meta":
        return model.eval()
    draw = torch.device(draw_on) if draw_on is not None else device
    gen = torch.Generator(device=draw).manual_seed(seed)
    made: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                if id(p) not in made:
                    if p.dim() == 1:  # norm gains
                        t = torch.ones(p.shape, dtype=dtype, device=device)
                    else:
                        t = torch.empty(p.shape, dtype=dtype, device=draw).normal_(0.0, 0.02, generator=gen)
                        t = t.to(device)
                    made[id(p)] = nn.Parameter(t, requires_grad=p.requires_grad)
                module._parameters[name] = made[id(p)]
    return model.to(device).eval()  # the buffers


def random_calibration(vocab: int, n: int, seq_len: int, seed: int = 0, batch_size: int = 4,
                       placement: Placement | None = None) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    return Calibration(tokens=torch.randint(0, vocab, (n, seq_len), generator=g), seed=seed,
                       source="random tokens", batch_size=batch_size, placement=placement)


@dataclass
class Setup:
    """Where and how every cell runs."""

    device: str = "cpu"
    dtype: str = "float32"
    offload: bool = False
    calib_samples: int = 8
    calib_seq_len: int = 256
    batch_size: int = 4
    ratio: float = 0.2
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def home(self) -> str:
        """Where the model rests: the host with offload, else the device."""
        return "cpu" if self.offload else self.device


def block_facts(model: nn.Module, setup: Setup) -> dict:
    """Sizes of one block and what working on it alone holds, from the modules (works on the meta device).

    statistics: one float64 Gram matrix (in_features^2 * 8 bytes) per linear role, the most any method keeps per
    block; activations (an estimate): every calibration window's residual stream into and out of the block, plus
    one batch's three widest intermediates (gate, up, their product), in the model's dtype.
    """
    adapter = get_adapter(model)
    block = adapter.block(0)
    by_role: dict[str, nn.Module] = {}  # the first linear of each role reads that role's input
    for slot in adapter.slots:
        by_role.setdefault(slot.role, adapter.linear(0, slot.kind))
    stats = sum(lin.in_features ** 2 * 8 for lin in by_role.values())
    hidden = adapter.embeddings().weight.shape[1]
    widest = max(max(adapter.linear(0, k).in_features, adapter.linear(0, k).out_features) for k in adapter.kinds())
    elem = next(model.parameters()).element_size()
    tokens = setup.calib_samples * setup.calib_seq_len
    acts = (2 * tokens * hidden + 3 * min(setup.batch_size, setup.calib_samples) * setup.calib_seq_len * widest) * elem
    model_bytes = count_bytes(model)
    blocks_bytes = sum(count_bytes(b) for b in adapter.blocks())
    facts = {"blocks": adapter.num_blocks, "params": count_params(model), "block_params": count_params(block),
             "block_bytes": count_bytes(block), "statistics_bytes_per_block": stats, "activation_bytes": acts,
             "non_block_bytes": model_bytes - blocks_bytes, "model_bytes": model_bytes}
    facts["one_block_bytes"] = facts["non_block_bytes"] + facts["block_bytes"] + stats + acts
    return facts


@dataclass
class Cell:
    """One (shape, method) measurement."""

    shape: str
    method: str
    knobs: dict
    blocks: int
    params: int
    device: str
    dtype: str
    offload: bool
    status: str = "ok"  # ok | refused (the solver said no) | failed
    error: str = ""
    build_seconds: float = 0.0
    solve_seconds: float = 0.0
    compress_seconds: float = 0.0
    seconds: float = 0.0  # solve + compress
    seconds_per_block: float = 0.0
    #: peaks during compress: the accelerator's allocator (None on CPU) and the process RSS, sampled
    peak_device_bytes: int | None = None
    peak_host_bytes: int | None = None
    #: the work's own memory: the peak where the work runs minus what was in use there when compress began
    work_bytes: int | None = None
    peak_sources: dict = field(default_factory=dict)
    #: bytes slimbench placed on the device as accounted by the Placement (0: the methods did not use it)
    placement_peak_bytes: int = 0
    params_after: int = 0
    predicted_params: int = 0
    #: training inside compress (DeltaLLM's distillation): tokens and the seconds they took; 0 when untrained
    train_tokens: int = 0
    train_seconds: float = 0.0
    achieved_ratio: float | None = None
    facts: dict = field(default_factory=dict)
    traceback: str = ""
    #: the host's 1-minute load average and torch's threads when compress ended: CPU seconds taken beside other work
    #: mean little (on a busy 2-core host a float64 SVD-heavy compress ran 30x slower with 2 threads than with 1)
    load_average: float | None = None
    threads: int = 0


def methods_and_knobs(methods: list[str] | None, knobs: dict[str, dict]) -> dict[str, dict]:
    """{method: knobs}: ``None`` means every registered method, DeltaLLM untrained unless ``knobs`` says otherwise."""
    names = list(available()) if methods is None else methods
    for name in names:
        get_method(name)  # unknown names refused here
    unknown = set(knobs) - set(names)
    if unknown:
        raise UserError(f"--set names method(s) {', '.join(sorted(unknown))} that are not in --methods")
    out = {m: {**UNTRAINED.get(m, {}), **knobs.get(m, {})} for m in names}
    for m, k in out.items():
        get_method(m)(**k)  # unknown or mistyped knobs refused before any model is built
    return out


def _free(device: str) -> None:
    """Release what the last cell held, to the OS too: freed heap pages that glibc keeps would stay in the RSS and
    hide the next cell's host memory (its work was read as 0.02 GB or 0.13 GB depending on the cells before it)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the RSS figures may include freed memory
        pass


def measure(shape: Shape, method: str, knobs: dict, setup: Setup) -> Cell:
    """Build a fresh model of ``shape``, solve and compress it with ``method``; failures are recorded, not raised."""
    _free(setup.device)
    cell = Cell(shape=shape.name, method=method, knobs=knobs, blocks=shape.blocks, params=0, device=setup.device,
                dtype=setup.dtype, offload=setup.offload)
    cuda = torch.device(setup.device).type == "cuda"
    model = adapter = calib = None
    try:
        t0 = time.perf_counter()
        model = build(shape, setup.home, setup.torch_dtype, setup.seed, draw_on=setup.device)
        cell.build_seconds = time.perf_counter() - t0
        adapter = get_adapter(model)
        cell.facts = block_facts(model, setup)
        cell.params = cell.facts["params"]
        placement = Placement(device=setup.device, offload=setup.offload)
        calib = random_calibration(shape.vocab, setup.calib_samples, setup.calib_seq_len, setup.seed,
                                   setup.batch_size, placement)
        inst = get_method(method)(**knobs)
        t0 = time.perf_counter()
        try:
            solution = inst.solve(adapter, setup.ratio)
        except UserError as err:
            cell.status, cell.error = "refused", str(err)
            return cell
        cell.solve_seconds = time.perf_counter() - t0
        before = torch.cuda.memory_allocated(setup.device) if cuda else _rss_bytes()
        with PeakMemory(setup.device) as mem, PeakMemory("cpu") as host, hostheap.reuse_freed_pages():
            t0 = time.perf_counter()
            info = inst.compress(model, adapter, calib, solution)
            cell.compress_seconds = time.perf_counter() - t0
        cell.train_tokens, cell.train_seconds = info.train_tokens, info.train_seconds
        cell.load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        cell.threads = torch.get_num_threads()
        cell.peak_device_bytes = mem.device_peak_bytes if cuda else None  # on CPU the "device" is the host: no own peak
        cell.peak_host_bytes = getattr(mem, "host_peak_bytes", None) or host.peak_bytes
        cell.work_bytes = (cell.peak_device_bytes if cuda else cell.peak_host_bytes) - before
        cell.peak_sources = {"device": mem.source if cuda else None, "host": host.source}
        cell.placement_peak_bytes = placement.peak
        cell.seconds = cell.solve_seconds + cell.compress_seconds
        cell.seconds_per_block = cell.seconds / cell.blocks
        cell.params_after = count_params(model)
        cell.predicted_params = solution.predicted_params
        cell.achieved_ratio = 1.0 - cell.params_after / cell.params
    except Exception as err:  # out of memory, a method's crash: this cell fails, the others go on
        cell.status = "failed"
        cell.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        cell.traceback = traceback.format_exc(limit=6)
    finally:
        del model, adapter, calib  # the statistics live in the calibration's memo
        _free(setup.device)
    return cell


def project(cells: list[Cell], setup: Setup, target: Shape = SHAPES[PROJECTED]) -> list[dict]:
    """Per method, the ``target`` shape's seconds and peaks, computed (never measured) from the measured cells.

    Seconds: the largest measured shape's seconds per block, scaled by (block params ratio)^k, times the target's
    blocks; k is fitted between the two largest measured shapes and kept within [1, 1.5] (a block's forward grows as
    its parameters, its SVDs and eigendecompositions as width^3 = params^1.5), 1.5 when only one shape was measured.
    Memory: :func:`block_facts` of the target built on the meta device: with offload, the device holds the non-block
    parts and one block with its statistics and activations, and the host holds the whole model. Where a GPU measured
    the method with offload, its device peak is also projected from that measurement: the measured peak times the
    target's one-block formula over the measured shape's (on an H200, SliceGPT's 7B peak was 2.3x the formula, so
    the formula alone would promise 70B a peak it does not have).
    Cells that trained are left out: their seconds are the token budget's, not the blocks' (their tokens/s is shown).
    """
    facts = block_facts(build(target, "meta", setup.torch_dtype), setup)
    out = []
    for method in dict.fromkeys(c.method for c in cells):
        ok = sorted((c for c in cells if c.method == method and c.status == "ok" and c.seconds_per_block > 0
                     and not c.train_tokens), key=lambda c: c.facts["block_params"])
        sizes = {c.facts["block_params"]: c for c in ok}  # the last cell of each block size
        if not sizes:
            continue
        ref = sizes[max(sizes)]
        if len(sizes) >= 2:
            small = sizes[sorted(sizes)[-2]]
            fitted = (math.log(ref.seconds_per_block / small.seconds_per_block)
                      / math.log(ref.facts["block_params"] / small.facts["block_params"]))
            k, how = min(max(fitted, 1.0), 1.5), f"fitted {fitted:.2f} between {small.shape} and {ref.shape}"
        else:
            k, how = 1.5, "assumed (one measured shape)"
        growth = facts["block_params"] / ref.facts["block_params"]
        per_block = ref.seconds_per_block * growth ** k
        check = _check(cells, method)
        scaled = (None if check is None
                  else round(check["measured_device_peak_bytes"] * facts["one_block_bytes"] / check["formula_bytes"]))
        out.append({"projected": True, "shape": target.name, "method": method, "blocks": facts["blocks"],
                    "params": facts["params"], "dtype": setup.dtype, "from_shape": ref.shape, "exponent": k,
                    "exponent_source": how, "block_growth": growth, "seconds_per_block": per_block, "seconds": per_block * facts["blocks"],
                    "device_peak_bytes_offload": facts["one_block_bytes"], "host_bytes_offload": facts["model_bytes"],
                    "device_peak_bytes_scaled": scaled, "facts": facts, "check": check})
    return out


def _check(cells: list[Cell], method: str) -> dict | None:
    """The one-block formula against the device peak of the largest shape measured with offload on a GPU, if any
    (of several such cells, the highest peak: the projection is there to say whether the target fits)."""
    offloaded = [c for c in cells if c.method == method and c.status == "ok" and c.offload
                 and c.peak_device_bytes is not None]
    if not offloaded:
        return None
    c = max(offloaded, key=lambda c: (c.facts["block_params"], c.peak_device_bytes))
    return {"shape": c.shape, "blocks": c.blocks, "formula_bytes": c.facts["one_block_bytes"],
            "measured_device_peak_bytes": c.peak_device_bytes}


def projection_lines(projections: list[dict]) -> list[str]:
    """One line for the memory of the projected shape (the same formula for every method), one per method's seconds."""
    if not projections:
        return []
    p, f = projections[0], projections[0]["facts"]
    lines = [f"PROJECTED, not measured: {p['shape']} ({p['blocks']} blocks, {p['params'] / 1e9:.1f}B params, "
             f"{p['dtype']}, calibration as above) with --offload on: device peak {f['one_block_bytes'] / GB:.1f} GB "
             f"(block {f['block_bytes'] / GB:.2f} + Gram statistics {f['statistics_bytes_per_block'] / GB:.2f} + "
             f"activations {f['activation_bytes'] / GB:.2f} + embeddings/head {f['non_block_bytes'] / GB:.2f}); the "
             f"host holds the whole model, {f['model_bytes'] / GB:.0f} GB"]
    for p in projections:
        c = p["check"]
        far = (f"; NOT A FORECAST: {p['block_growth']:,.0f}x beyond the largest measured block, where fixed overheads "
               "dominate; measure llama2-7b or llama2-13b" if p["block_growth"] > MAX_GROWTH else "")
        check = ("" if c is None else f"; device peak {p['device_peak_bytes_scaled'] / GB:.1f} GB = "
                 f"{c['measured_device_peak_bytes'] / GB:.2f} GB measured on {c['shape']} ({c['blocks']} blocks) x "
                 f"{p['facts']['one_block_bytes'] / c['formula_bytes']:.2f}, the one-block formula's growth "
                 f"({c['formula_bytes'] / GB:.2f} GB there)")
        lines.append(f"PROJECTED, not measured: {p['shape']} {p['method']}: {_duration(p['seconds'])} "
                     f"({p['seconds_per_block']:.3g} s/block = {p['from_shape']}'s x {p['block_growth']:,.1f}^"
                     f"{p['exponent']:.2f}, the block-size ratio to the power {p['exponent_source']}{far}{check})")
    return lines


def progress_line(c: Cell) -> str:
    head = f"{c.method} on {c.shape} ({c.blocks} blocks): "
    if c.status != "ok":
        return head + f"{c.status}: {c.error}"
    return head + (f"{c.seconds:.2f} s (build {c.build_seconds:.1f} s), achieved ratio {c.achieved_ratio:.4f}, "
                   f"work {_gb(c.work_bytes)} GB{_training(c)}")


def _train_rate(c: Cell) -> float | None:
    """Training tokens per second of a cell that trained, else None."""
    return c.train_tokens / c.train_seconds if c.train_tokens and c.train_seconds > 0 else None


def _training(c: Cell) -> str:
    """``, trained 65,536 tokens at 2,900 tokens/s (40M tokens: 3.8 h)``; empty for a cell that did not train."""
    rate = _train_rate(c)
    if rate is None:
        return ""
    return f", trained {c.train_tokens:,} tokens at {rate:,.0f} tokens/s (40M tokens: {_duration(40e6 / rate)})"


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / GB:.3f}"


def table(cells: list[Cell]):
    """A rich table, one row per cell."""
    from rich.table import Table

    t = Table(title="bench scaling: solve + compress of random-weight Llama models (peaks during compress)")
    trained = any(c.train_tokens for c in cells)
    cols = ("method", "shape", "blocks", "params", "device", "dtype", "offload", "seconds", "s/block",
            "peak device GB", "peak host GB", "work GB", "achieved ratio", *(("train tokens/s",) if trained else ()))
    for col in cols:
        t.add_column(col, justify="left" if col in ("method", "shape", "device", "dtype", "offload") else "right")
    for c in cells:
        ok = c.status == "ok"
        t.add_row(c.method, c.shape, str(c.blocks), f"{c.params / 1e6:,.1f}M", c.device, c.dtype,
                  "on" if c.offload else "off", f"{c.seconds:.2f}" if ok else c.status,
                  f"{c.seconds_per_block:.3f}" if ok else "-", _gb(c.peak_device_bytes), _gb(c.peak_host_bytes),
                  _gb(c.work_bytes), f"{c.achieved_ratio:.4f}" if ok else "-",
                  *((f"{rate:,.0f}" if (rate := _train_rate(c)) is not None else "-",) if trained else ()))
    return t


def show(console, cells: list[Cell], projections: list[dict]) -> int:
    """Print the table and the projection lines; 1 when a cell failed (a refusal is not a failure), else 0."""
    console.print(table(cells))
    for line in projection_lines(projections):
        console.print(line, soft_wrap=True, markup=False)
    return 1 if any(c.status == "failed" for c in cells) else 0


@dataclass
class Report:
    """What ``--json`` writes: settings, environment, every cell and the projections."""

    settings: dict
    environment: dict
    cells: list[dict] = field(default_factory=list)
    projections: list[dict] = field(default_factory=list)
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION


def write(path: str | Path, report: Report) -> None:
    """Atomically, so a run killed by a timeout leaves the cells finished so far."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(report), indent=1, default=str))
    tmp.replace(path)


def load(paths: list[str | Path]) -> tuple[list[Cell], Setup]:
    """The cells of stored reports (several runs, e.g. one per GPU step) and their common setup, for one projection.

    Reports whose calibration or dtype differ are refused: their per-block seconds do not compare.
    """
    cells, setup = [], None
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"--from-json {path}: cannot read it ({err})") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA or data.get("schema_version") != SCHEMA_VERSION:
            raise UserError(f"--from-json {path}: not a {SCHEMA} version {SCHEMA_VERSION} file (written by bench scaling --json)")
        names = {f.name for f in fields(Setup)}
        this = Setup(**{k: v for k, v in data["settings"].items() if k in names})
        same = ("dtype", "calib_samples", "calib_seq_len", "batch_size", "ratio")
        if setup is not None and any(getattr(this, k) != getattr(setup, k) for k in same):
            raise UserError(f"--from-json {path}: its {', '.join(same)} differ from {paths[0]}'s; project runs of one setup")
        setup = setup or this
        cells += [Cell(**c) for c in data["cells"]]
    return cells, setup


def run(shapes: list[Shape], methods: dict[str, dict], setup: Setup, json_path: str | Path | None = None,
        blocks: int | None = None, on_cell=None) -> Report:
    """Every (shape, method) cell in order, then the projections; ``json_path`` is rewritten after each cell."""
    from bench.records import environment

    shapes = [replace(s, blocks=blocks) if blocks else s for s in shapes]
    report = Report(settings={**asdict(setup), "shapes": [asdict(s) for s in shapes], "methods": methods},
                    environment=environment(setup.device))
    cells: list[Cell] = []
    for shape in shapes:
        for method, knobs in methods.items():
            cells.append(measure(shape, method, knobs, setup))
            report.cells = [asdict(c) for c in cells]
            if on_cell:
                on_cell(cells[-1])
            if json_path:
                write(json_path, report)
    report.projections = project(cells, setup)
    if json_path:
        write(json_path, report)
    return report
