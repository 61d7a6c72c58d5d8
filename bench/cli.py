"""The ``bench`` command: run, leaderboard, list, generate."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench.errors import UserError


def _items(text: str, flag: str, example: str) -> list[str]:
    """The comma-separated values of ``flag``: none empty, at least one, no repeats."""
    items = [x.strip() for x in text.split(",")]
    if not text.strip() or any(not x for x in items):
        raise UserError(f"{flag} {text!r} has an empty value; give e.g. {example}")
    if len(set(items)) != len(items):
        raise UserError(f"{flag} {text!r} repeats a value; give each once, e.g. {example}")
    return items


def _floats(text: str, flag: str = "--ratio") -> list[float]:
    try:
        values = [float(x) for x in _items(text, flag, "0.12 or 0.12,0.24")]
    except ValueError:
        raise UserError(f"{flag} {text!r}: give numbers like 0.12 or 0.12,0.24") from None
    if any(v != v for v in values):
        raise UserError(f"{flag} {text!r}: NaN is not a ratio; give numbers like 0.12")
    return values


def _ints(text: str, flag: str = "--seeds") -> list[int]:
    try:
        return [int(x) for x in _items(text, flag, "0 or 0,1,2")]
    except ValueError:
        raise UserError(f"{flag} {text!r}: give integers like 0 or 0,1,2") from None


def _positive(value: int | None, flag: str, example: str) -> None:
    if value is not None and value < 1:
        raise UserError(f"{flag} {value}: give a positive number, e.g. {flag} {example}")


def _writable(folder: str | None, flag: str) -> None:
    """Refuse, before any work, a folder that is a file, cannot be created or written, or sits on a full disk."""
    if folder is None:
        return
    path = Path(folder).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the folder is created later, by the work itself
    if not existing.is_dir():
        what = "this is a file" if existing == path else f"{existing} is a file"
        raise UserError(f"{flag} {folder}: {what}, not a folder; give a folder path")
    try:
        probe = existing / f".slimbench-probe-{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * 65536)  # a full disk refuses data, not always an empty file
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as err:
        raise UserError(f"{flag} {folder}: cannot write there ({err.strerror or err}); give a writable folder "
                        "with free space") from None


def _knobs(pairs: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        method, dot, knob = name.partition(".")
        if not eq or not dot or not method or not knob:
            raise UserError(f"--set {pair!r}: write METHOD.KNOB=VALUE, e.g. --set basis.group_size=3")
        out.setdefault(method, {})[knob] = value
    return out


def _ray_flags(parser: argparse.ArgumentParser, executor: str | None) -> None:
    """Where the cells run; the per-cell resources apply to --executor ray."""
    parser.add_argument("--executor", default=executor, choices=["local", "ray"],
                        help="local: one cell after another in this process (default); ray: one Ray task per cell")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: start a local Ray instance)")
    parser.add_argument("--cpus-per-cell", type=float, default=None, help="Ray: CPUs per cell (default 1)")
    parser.add_argument("--gpus-per-cell", type=float, default=None,
                        help="Ray: GPUs per cell (default 1 when the cluster has GPUs, else 0)")
    parser.add_argument("--memory-per-cell", type=float, default=None, help="Ray: memory per cell in GiB")
    parser.add_argument("--max-retries", type=int, default=None,
                        help="Ray: times a cell whose worker died is retried (default 2)")


def _executor(args):
    """The function running a grid: the local runner, or Ray with the per-cell resources (all checked here)."""
    executor = getattr(args, "executor", None) or "local"
    if executor == "local":
        if args.address:
            raise UserError(f"--address {args.address} joins a Ray cluster; add --executor ray")
        from bench.runner import run

        return run
    import functools

    from bench import ray_exec

    ray_exec.require_ray()
    for flag, value, zero_ok in (("--cpus-per-cell", args.cpus_per_cell, False), ("--gpus-per-cell", args.gpus_per_cell, True),
                                 ("--memory-per-cell", args.memory_per_cell, False), ("--max-retries", args.max_retries, True)):
        if value is not None and not (value > 0 or (zero_ok and value == 0)):  # NaN fails both
            raise UserError(f"{flag} {value}: give a {'non-negative' if zero_ok else 'positive'} number, e.g. {flag} 1")
    res = ray_exec.Resources(cpus=args.cpus_per_cell or 1.0, gpus=args.gpus_per_cell, memory_gb=args.memory_per_cell,
                             max_retries=2 if args.max_retries is None else args.max_retries)
    return functools.partial(ray_exec.run, address=args.address, resources=res)


def _parser() -> argparse.ArgumentParser:
    from bench.models import DEFAULT_MODEL
    from bench.suites import SUITES

    p = argparse.ArgumentParser(prog="bench", description="Compress LLMs at matched parameter budgets and compare.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="compress a model with several methods at matched budgets and evaluate")
    r.add_argument("--model", default=DEFAULT_MODEL, help=f"alias, folder, .gguf file or hub id (default {DEFAULT_MODEL})")
    r.add_argument("--methods", default="all", help="comma-separated method names, or 'all' (see `bench list`)")
    r.add_argument("--ratio", default="0.12", help="whole-model share of parameters to remove; several: 0.12,0.24")
    r.add_argument("--seeds", default="0", help="calibration seeds, e.g. 0 or 0,1,2")
    r.add_argument("--suite", default="quick", choices=sorted(SUITES), help="how much data to use (default quick)")
    r.add_argument("--tasks", default=None, help="override the suite's zero-shot tasks (comma-separated; 'none' skips)")
    r.add_argument("--limit", type=int, default=None, help="override documents per zero-shot task")
    r.add_argument("--calib-samples", type=int, default=None, help="override calibration windows")
    r.add_argument("--calib-seq-len", type=int, default=None, help="override calibration window length")
    r.add_argument("--set", dest="knobs", action="append", default=[], metavar="METHOD.KNOB=VALUE",
                   help="set a method knob, e.g. --set basis.group_size=4 (repeatable)")
    r.add_argument("--train-tokens", type=int, default=None,
                   help="training tokens for every selected method that trains (a train_tokens knob); "
                        "0 = untrained; GPU users give the papers' tens of millions")
    r.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    r.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16")
    r.add_argument("--offload", default="auto", choices=["auto", "on", "off"],
                   help="keep the blocks in host memory and move one at a time to the device (auto: when the model "
                        "does not fit the device budget)")
    r.add_argument("--device-memory", type=float, default=None, metavar="GIB",
                   help="device memory slimbench may use, in GiB (default: 90%% of the GPU's; none on CPU); a "
                        "smaller figure simulates a smaller device")
    r.add_argument("--engine", default="blockwise", choices=["blockwise", "whole"],
                   help="blockwise: statistics one block at a time (default); whole: the whole-model reference path")
    r.add_argument("--tolerance", type=float, default=None, help="allowed |achieved - target| ratio (default 0.02)")
    r.add_argument("--results-dir", default="results", help="where records go (default results/)")
    r.add_argument("--leaderboard-dir", default="leaderboard", help="where tables go (default leaderboard/)")
    r.add_argument("--cache-dir", default=None, help="model and checkpoint cache (default $SLIMBENCH_CACHE or "
                                                       "~/.cache/slimbench)")
    r.add_argument("--no-save", action="store_true", help="do not keep compressed checkpoints (size is still measured)")
    r.add_argument("--force", action="store_true", help="recompute cells that already have a complete record")
    r.add_argument("--no-cache", action="store_true", help="recompute everything: no reused records, no stored or "
                                                         "shared calibration statistics (to measure the caches)")
    r.add_argument("--rescore", action="store_true", help="reused records written without per-window perplexity "
                   "and KL get them from their cells' checkpoints (for `bench compare`'s paired SEs); a checkpoint "
                   "that does not reproduce its record is reported and left alone")
    _ray_flags(r, "local")

    sw = sub.add_parser("sweep", help="run the grid a sweep file describes (see sweeps/default.toml)")
    sw.add_argument("file", help="TOML sweep file")
    for flag, kw in (("--device", {"default": "auto"}), ("--dtype", {"default": "auto"}),
                     ("--results-dir", {"default": "results"}), ("--leaderboard-dir", {"default": "leaderboard"}),
                     ("--cache-dir", {"default": None})):
        sw.add_argument(flag, **kw)
    sw.add_argument("--no-save", action="store_true", help="do not keep compressed checkpoints")
    sw.add_argument("--force", action="store_true", help="recompute cells that already have a complete record")
    sw.add_argument("--no-cache", action="store_true", help="recompute everything (see bench run --help)")
    sw.add_argument("--rescore", action="store_true", help="add per-window figures to reused records (see bench run "
                                                           "--help)")
    _ray_flags(sw, None)  # given here, they override the sweep file's

    lb = sub.add_parser("leaderboard", help="regenerate leaderboard/ from the records in results/")
    lb.add_argument("--results-dir", default="results")
    lb.add_argument("--out", default="leaderboard")

    c = sub.add_parser("compare", help="compare two methods (every ratio and seed both have) or two record files, "
                                       "with standard errors and a verdict")
    c.add_argument("a", metavar="A", help="method name (see the leaderboard) or a record file")
    c.add_argument("b", metavar="B", help="method name or a record file; B-A is reported")
    c.add_argument("--results-dir", default="results")
    c.add_argument("--model", default=None, help="only this model's records (by name, as in results/<model>/)")
    c.add_argument("--suite", default=None, help="only this suite's records")
    c.add_argument("--ratio", default=None, help="only these target ratios, e.g. 0.12 or 0.12,0.3")
    c.add_argument("--without", default=None, metavar="TASKS",
                   help="leave these zero-shot tasks out of both sides, e.g. boolq (mean_acc over the rest)")

    ls = sub.add_parser("list", help="show methods, models, tasks and suites")
    ls.add_argument("what", nargs="?", default="all", choices=["all", "methods", "models", "tasks", "suites"])

    g = sub.add_parser("generate", help="try a prompt on a model or a saved compressed checkpoint")
    g.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint folder (see a record's `checkpoint`), alias, ...")
    g.add_argument("--prompt", default="The capital of France is")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (1 or more)")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto")
    g.add_argument("--cache-dir", default=None)
    tp = sub.add_parser("throughput", help="zero-shot evaluation tokens/s against the raw batched forward, in one run")
    tp.add_argument("--model", default=DEFAULT_MODEL)
    tp.add_argument("--tasks", default=None, help="comma-separated (default: the quick suite's)")
    tp.add_argument("--limit", type=int, default=40, help="documents per task")
    tp.add_argument("--stock", action="store_true", help="also time stock lm-eval HFLM, for before and after")
    tp.add_argument("--heap-compare", action="store_true",
                    help="also time the passes with the C library's default heap (freed pages not kept for reuse)")
    tp.add_argument("--cache-dir", default=None)

    sc = sub.add_parser("scaling", help="compression seconds and peak memory per method on random-weight Llama models "
                                        "of growing size (nothing downloaded; llama2-70b is projected)")
    sc.add_argument("--shape", action="append", default=None, metavar="SHAPE[,SHAPE]",
                    help="tiny, small, smollm2-135m, llama2-7b, llama2-13b, llama2-70b (projected only) or "
                         "HIDDENxINTERMEDIATExBLOCKS[xHEADS[xKV]]; repeatable (default tiny,small)")
    sc.add_argument("--blocks", type=int, default=None, help="override every shape's block count")
    sc.add_argument("--methods", default="all", help="comma-separated, or 'all' (DeltaLLM untrained: delta.train_tokens=0)")
    sc.add_argument("--set", dest="knobs", action="append", default=[], metavar="METHOD.KNOB=VALUE",
                    help="set a method knob, e.g. --set delta.train_tokens=4096 (repeatable)")
    sc.add_argument("--ratio", default="0.2", help="whole-model share of parameters to remove (default 0.2)")
    sc.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    sc.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16")
    sc.add_argument("--offload", default="off", choices=["on", "off"],
                    help="on: blocks rest in host memory, only the block at work goes to the device (default off)")
    sc.add_argument("--calib-samples", type=int, default=None, help="random token windows (default 8 on CPU, 128 on CUDA)")
    sc.add_argument("--calib-seq-len", type=int, default=None, help="window length (default 256 on CPU, 2048 on CUDA)")
    sc.add_argument("--json", default=None, metavar="PATH", help="write every figure here (rewritten after each cell)")
    sc.add_argument("--from-json", action="append", default=[], metavar="PATH",
                    help="measure nothing: the table and the projection from stored --json files (repeatable)")
    return p


def cmd_throughput(args) -> int:
    from bench.adapters import get_adapter
    from bench.evaluate import throughput
    from bench.evaluate.suite_eval import ppl_batch, suite_windows
    from bench.evaluate.zeroshot import resolve_tasks
    from bench.models import load_model
    from bench.suites import TASKS, get_suite

    tasks = args.tasks.split(",") if args.tasks else list(TASKS)
    resolve_tasks(tasks)
    if args.limit < 1:
        raise UserError(f"--limit {args.limit}: give a positive number of documents per task")
    loaded = load_model(args.model, "auto", "auto", args.cache_dir)
    quick = get_suite("quick")
    windows = suite_windows(loaded.tokenizer, get_adapter(loaded.model), quick)
    print(throughput.report(throughput.measure(loaded.model, loaded.tokenizer, tasks, args.limit, args.stock,
                                               windows=windows, ppl_batch=ppl_batch(quick),
                                               heap_compare=args.heap_compare)))
    return 0


def cmd_scaling(args) -> int:
    from bench import scaling
    from bench.models import resolve_device, resolve_dtype

    if args.from_json:
        cells, setup = scaling.load(args.from_json)
        return scaling.show(_console(), cells, scaling.project(cells, setup))
    shapes = [scaling.parse_shape(x) for x in _items(",".join(args.shape or ["tiny,small"]), "--shape", "tiny,small")]
    if scaling.PROJECTED in {s.name for s in shapes}:
        raise UserError(f"--shape {scaling.PROJECTED} is always projected from the measured shapes, never built; "
                        "measure llama2-7b or llama2-13b and read the projection line")
    _positive(args.blocks, "--blocks", "4")
    _positive(args.calib_samples, "--calib-samples", "8")
    _positive(args.calib_seq_len, "--calib-seq-len", "256")
    ratios = _floats(args.ratio)
    if len(ratios) != 1 or not 0.0 < ratios[0] < 1.0:
        raise UserError(f"--ratio {args.ratio}: give one share in (0, 1), e.g. 0.2")
    methods = None if args.methods == "all" else _items(args.methods, "--methods", "svdllm,basis")
    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    setup = scaling.Setup(device=device, dtype=str(resolve_dtype(args.dtype, device)).removeprefix("torch."),
                          offload=args.offload == "on", ratio=ratios[0],
                          calib_samples=args.calib_samples or (128 if cuda else 8),
                          calib_seq_len=args.calib_seq_len or (2048 if cuda else 256))
    if args.json:
        _writable(str(Path(args.json).parent), "--json")
    console = _console()
    report = scaling.run(shapes, scaling.methods_and_knobs(methods, _knobs(args.knobs)), setup, args.json, args.blocks,
                         on_cell=lambda c: console.print(scaling.progress_line(c), soft_wrap=True, markup=False))
    cells = [scaling.Cell(**c) for c in report.cells]
    rc = scaling.show(console, cells, report.projections)
    if cuda and setup.offload and cells and not any(c.placement_peak_bytes for c in cells):
        console.print("note: --offload on, but no method moved a block through the placement: the work ran where "
                      "the model rests (the host)", soft_wrap=True)
    if args.json:
        console.print(f"figures in {args.json}")
    return rc


def _console():
    """A rich console; when output goes to a file or pipe, wide enough that the leaderboard is not folded."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=220)


def _apply_train_tokens(methods: list[str], knobs: dict[str, dict], tokens: int) -> None:
    """Set ``train_tokens`` for every selected method that has that knob (an explicit --set wins)."""
    import dataclasses

    from bench.registry import get_method

    if tokens < 0:
        raise UserError(f"--train-tokens {tokens}: give 0 (untrained) or a positive number of tokens")
    trainers = [m for m in methods if "train_tokens" in {f.name for f in dataclasses.fields(get_method(m).Knobs)}]
    if not trainers:
        raise UserError(f"--train-tokens: none of {', '.join(methods)} trains; it applies to methods with a "
                        f"train_tokens knob (see `bench list methods`)")
    for m in trainers:
        knobs.setdefault(m, {}).setdefault("train_tokens", str(tokens))


def run_config(args):
    """Every flag of ``bench run`` checked and turned into a RunConfig; UserError before any work."""
    from bench.budget import DEFAULT_TOLERANCE
    from bench.models import cache_dir, locate
    from bench.registry import available
    from bench.runner import RunConfig
    from bench.suites import get_suite

    if args.methods == "all":
        methods = list(available())
    else:
        methods = _items(args.methods, "--methods", "svdllm,basis (see `bench list methods`)")
    tasks = None
    if args.tasks is not None:
        tasks = () if args.tasks == "none" else tuple(_items(args.tasks, "--tasks", "arc_easy,piqa or none"))
    _positive(args.limit, "--limit", "40")
    _positive(args.calib_samples, "--calib-samples", "32")
    _positive(args.calib_seq_len, "--calib-seq-len", "512")
    if args.tolerance is not None and not 0 <= args.tolerance < 1:
        raise UserError(f"--tolerance {args.tolerance}: give a share of the model in [0, 1), e.g. 0.02")
    suite = get_suite(args.suite, tasks=tasks, task_limit=args.limit, calib_samples=args.calib_samples,
                      calib_seq_len=args.calib_seq_len)
    knobs = _knobs(args.knobs)
    if args.train_tokens is not None:
        _apply_train_tokens(methods, knobs, args.train_tokens)
    for flag, folder in (("--results-dir", args.results_dir), ("--leaderboard-dir", args.leaderboard_dir),
                         ("--cache-dir", str(cache_dir(args.cache_dir)))):
        _writable(folder, flag)
    if args.rescore and (args.force or args.no_cache):
        raise UserError(f"--rescore adds figures to reused records and {'--force' if args.force else '--no-cache'} "
                        "reuses none: give one of them")
    locate(args.model, cache_dir(args.cache_dir))  # a missing or damaged model is refused here, not mid-run
    _executor(args)  # Ray missing or a bad per-cell resource: refused before any work
    return RunConfig(model=args.model, methods=methods, ratios=_floats(args.ratio), seeds=_ints(args.seeds),
                     suite=suite, knobs=knobs, device=args.device, dtype=args.dtype,
                     cache=args.cache_dir, results_dir=args.results_dir, save_checkpoints=not args.no_save,
                     tolerance=DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance, force=args.force,
                     record_refusals=args.methods == "all", no_cache=args.no_cache, offload=args.offload,
                     device_memory=args.device_memory, engine=args.engine, rescore=args.rescore)


def cmd_run(args, cfg=None) -> int:
    from bench import leaderboard
    from bench.display import RichEvents

    cfg = cfg or run_config(args)
    run = _executor(args)
    console = _console()
    t0 = time.perf_counter()
    with RichEvents(console) as events:
        records = run(cfg, events)
    try:
        df, problems, paths = leaderboard.write(args.results_dir, args.leaderboard_dir)
    except Exception as exc:  # the cells' records are on disk already: say so, and how to draw it from them
        paths, problems = [], []
        console.print(f"[red]error:[/] the leaderboard could not be written ({type(exc).__name__}: {exc}); this run's "
                      f"records are safe in {args.results_dir}/: once the cause is fixed, `bench leaderboard "
                      f"--results-dir {args.results_dir} --out {args.leaderboard_dir}` writes it from them",
                      soft_wrap=True)
    for line in problems:
        console.print(f"[yellow]warning:[/] {line}", soft_wrap=True)
    keys = {r.key for r in records}
    from bench.evaluate import docs as docs_io

    mine = leaderboard.frame(records, docs_io.read_each(args.results_dir, records))
    console.print(leaderboard.rich_table(mine, title=f"{records[0].model['name']} — suite {cfg.suite.name}"))
    computed = getattr(events, "counts", {}).get("ok", 0) + getattr(events, "counts", {}).get("failed", 0)
    board = f"leaderboard in {', '.join(map(str, paths))}" if paths else "leaderboard NOT written (above)"
    console.print(f"records in {args.results_dir}/, {board}; "
                  f"{len(keys)} cells ({computed} computed here), {time.perf_counter() - t0:.0f} s")
    failed = [r for r in records if r.status != "ok"]
    for r in failed:
        console.print(f"[red]failed:[/] {r.method} at {r.target_ratio}: {r.error}")
    return 1 if failed or not paths else 0


def cmd_sweep(args) -> int:
    """Each model of the sweep is one `bench run`, all checked before any starts; the exit code is the worst."""
    from bench import sweep

    runs = sweep.load(args.file)
    extra = ["--device", args.device, "--dtype", args.dtype, "--results-dir", args.results_dir,
             "--leaderboard-dir", args.leaderboard_dir]
    extra += (["--cache-dir", args.cache_dir] if args.cache_dir else []) + (["--no-save"] if args.no_save else [])
    extra += (["--force"] if args.force else []) + (["--no-cache"] if args.no_cache else [])
    extra += ["--rescore"] if args.rescore else []
    for flag in ("--executor", "--address", "--cpus-per-cell", "--gpus-per-cell", "--memory-per-cell", "--max-retries"):
        value = getattr(args, flag[2:].replace("-", "_"))
        extra += [flag, str(value)] if value is not None else []
    planned = []
    for argv in runs:
        parsed = _parser().parse_args([*argv, *extra])
        try:
            planned.append((parsed, run_config(parsed)))
        except UserError as err:
            raise UserError(f"{args.file}: {sweep.in_toml_terms(str(err))}") from None
    return max(cmd_run(a, cfg) for a, cfg in planned)


def cmd_leaderboard(args) -> int:
    from bench import leaderboard

    if not Path(args.results_dir).is_dir():
        raise UserError(f"no results folder {args.results_dir!r}; run `bench run` first or pass --results-dir")
    _writable(args.out, "--out")
    df, problems, paths = leaderboard.write(args.results_dir, args.out)
    console = _console()
    for line in problems:
        console.print(f"[yellow]warning:[/] {line}", soft_wrap=True)
    if not df.empty:
        for (model, suite), group in df.groupby(["model", "suite"]):
            console.print(leaderboard.rich_table(group, title=f"{model} — suite {suite}"))
    console.print(f"wrote {', '.join(map(str, paths))} from {len(df)} records")
    return 0


def cmd_compare(args) -> int:
    from bench import compare

    ratios = _floats(args.ratio) if args.ratio else None
    console = _console()
    without = _items(args.without, "--without", "boolq or boolq,winogrande") if args.without else None
    for c in compare.compare(args.a, args.b, args.results_dir, args.model, args.suite, ratios, without):
        console.print(compare.table(c))
    return 0


def cmd_list(args) -> int:
    from rich.table import Table

    console = _console()
    if args.what in ("all", "methods"):
        from bench.registry import available

        t = Table(title="methods")
        for col in ("name", "method", "kind", "knobs (defaults)", "paper"):
            t.add_column(col)
        for name, cls in available().items():
            inst = cls()
            knobs = ", ".join(f"{k}={v}" for k, v in inst.knob_dict().items())
            t.add_row(name, cls.title, "coarse" if cls.coarse else "fine", knobs, cls.paper)
        console.print(t)
    if args.what in ("all", "models"):
        from bench.adapters import supported_model_types
        from bench.models import ALIASES

        t = Table(title="models")
        t.add_column("alias")
        t.add_column("what")
        for name, alias in ALIASES.items():
            t.add_row(name, f"{alias.note}; install: {alias.install}")
        console.print(t)
        console.print(f"any local folder, .gguf file or hub id of these families also works: "
                      f"{', '.join(supported_model_types())}")
    if args.what in ("all", "tasks"):
        from bench.evaluate.zeroshot import LOCAL_TASKS

        console.print("zero-shot tasks shipped offline: " + ", ".join(LOCAL_TASKS)
                      + "; any other lm-eval task name passes through (needs the hub)")
    if args.what in ("all", "suites"):
        from bench.suites import SUITES

        t = Table(title="suites")
        for col in ("suite", "calibration", "perplexity", "docs per task"):
            t.add_column(col)
        for s in SUITES.values():
            t.add_row(s.name, f"{s.calib_samples} x {s.calib_seq_len}",
                      f"{s.ppl_windows or 'all'} x {s.ppl_seq_len}", str(s.task_limit or "all"))
        console.print(t)
    return 0


def cmd_generate(args) -> int:
    import torch

    from bench.models import load_model

    _positive(args.max_new_tokens, "--max-new-tokens", "32")
    loaded = load_model(args.model, args.device, args.dtype, args.cache_dir)
    tok = loaded.tokenizer
    ids = tok(args.prompt, return_tensors="pt").to(loaded.device)
    with torch.inference_mode():
        out = loaded.model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                                    pad_token_id=tok.pad_token_id)
    print(tok.decode(out[0], skip_special_tokens=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not sys.stderr.isatty():  # libraries' tqdm bars would flood logs; rich shows the progress that matters
        os.environ.setdefault("TQDM_DISABLE", "1")
    args = _parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    handler = {"run": cmd_run, "sweep": cmd_sweep, "leaderboard": cmd_leaderboard, "list": cmd_list, "generate": cmd_generate,
               "compare": cmd_compare, "throughput": cmd_throughput, "scaling": cmd_scaling}
    try:
        return handler[args.command](args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = getattr(args, "results_dir", None)
        saved = f"finished cells are saved under {where}/; " if where else ""
        print(f"interrupted: {saved}run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
