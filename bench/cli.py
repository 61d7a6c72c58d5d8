"""The ``bench`` command: run, leaderboard, list, generate."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench.errors import UserError


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--ratio {text!r}: give numbers like 0.12 or 0.12,0.24") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r}: give integers like 0 or 0,1,2") from None


def _knobs(pairs: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        method, dot, knob = name.partition(".")
        if not eq or not dot or not method or not knob:
            raise UserError(f"--set {pair!r}: write METHOD.KNOB=VALUE, e.g. --set basis.group_size=3")
        out.setdefault(method, {})[knob] = value
    return out


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
    r.add_argument("--tolerance", type=float, default=None, help="allowed |achieved - target| ratio (default 0.02)")
    r.add_argument("--results-dir", default="results", help="where records go (default results/)")
    r.add_argument("--leaderboard-dir", default="leaderboard", help="where tables go (default leaderboard/)")
    r.add_argument("--cache-dir", default=None, help="model and checkpoint cache (default $SLIMBENCH_CACHE or "
                                                       "~/.cache/slimbench)")
    r.add_argument("--no-save", action="store_true", help="do not keep compressed checkpoints (size is still measured)")
    r.add_argument("--force", action="store_true", help="recompute cells that already have a complete record")
    r.add_argument("--no-cache", action="store_true", help="recompute everything: no reused records, no stored or "
                                                         "shared calibration statistics (to measure the caches)")

    sw = sub.add_parser("sweep", help="run the grid a sweep file describes (see sweeps/default.toml)")
    sw.add_argument("file", help="TOML sweep file")
    for flag, kw in (("--device", {"default": "auto"}), ("--dtype", {"default": "auto"}),
                     ("--results-dir", {"default": "results"}), ("--leaderboard-dir", {"default": "leaderboard"}),
                     ("--cache-dir", {"default": None})):
        sw.add_argument(flag, **kw)
    sw.add_argument("--no-save", action="store_true", help="do not keep compressed checkpoints")
    sw.add_argument("--force", action="store_true", help="recompute cells that already have a complete record")
    sw.add_argument("--no-cache", action="store_true", help="recompute everything (see bench run --help)")

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

    ls = sub.add_parser("list", help="show methods, models, tasks and suites")
    ls.add_argument("what", nargs="?", default="all", choices=["all", "methods", "models", "tasks", "suites"])

    g = sub.add_parser("generate", help="try a prompt on a model or a saved compressed checkpoint")
    g.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint folder (see a record's `checkpoint`), alias, ...")
    g.add_argument("--prompt", default="The capital of France is")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto")
    g.add_argument("--cache-dir", default=None)
    tp = sub.add_parser("throughput", help="zero-shot evaluation tokens/s against the raw batched forward, in one run")
    tp.add_argument("--model", default=DEFAULT_MODEL)
    tp.add_argument("--tasks", default=None, help="comma-separated (default: the quick suite's)")
    tp.add_argument("--limit", type=int, default=40, help="documents per task")
    tp.add_argument("--stock", action="store_true", help="also time stock lm-eval HFLM, for before and after")
    tp.add_argument("--cache-dir", default=None)
    return p


def cmd_throughput(args) -> int:
    from bench.evaluate import throughput
    from bench.evaluate.zeroshot import resolve_tasks
    from bench.models import load_model
    from bench.suites import TASKS

    tasks = args.tasks.split(",") if args.tasks else list(TASKS)
    resolve_tasks(tasks)
    if args.limit < 1:
        raise UserError(f"--limit {args.limit}: give a positive number of documents per task")
    loaded = load_model(args.model, "auto", "auto", args.cache_dir)
    print(throughput.report(throughput.measure(loaded.model, loaded.tokenizer, tasks, args.limit, args.stock)))
    return 0


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


def cmd_run(args) -> int:
    from bench import leaderboard
    from bench.budget import DEFAULT_TOLERANCE
    from bench.display import RichEvents
    from bench.registry import available
    from bench.runner import RunConfig, run
    from bench.suites import get_suite

    methods = list(available()) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    tasks = None
    if args.tasks is not None:
        tasks = () if args.tasks == "none" else tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    suite = get_suite(args.suite, tasks=tasks, task_limit=args.limit, calib_samples=args.calib_samples,
                      calib_seq_len=args.calib_seq_len)
    knobs = _knobs(args.knobs)
    if args.train_tokens is not None:
        _apply_train_tokens(methods, knobs, args.train_tokens)
    cfg = RunConfig(model=args.model, methods=methods, ratios=_floats(args.ratio), seeds=_ints(args.seeds),
                    suite=suite, knobs=knobs, device=args.device, dtype=args.dtype,
                    cache=args.cache_dir, results_dir=args.results_dir, save_checkpoints=not args.no_save,
                    tolerance=DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance, force=args.force,
                    record_refusals=args.methods == "all", no_cache=args.no_cache)
    console = _console()
    t0 = time.perf_counter()
    with RichEvents(console) as events:
        records = run(cfg, events)
    df, problems, paths = leaderboard.write(args.results_dir, args.leaderboard_dir)
    for line in problems:
        console.print(f"[yellow]warning:[/] {line}", soft_wrap=True)
    keys = {r.key for r in records}
    mine = leaderboard.frame(records)
    console.print(leaderboard.rich_table(mine, title=f"{records[0].model['name']} — suite {suite.name}"))
    console.print(f"records in {args.results_dir}/, leaderboard in {', '.join(map(str, paths))}; "
                  f"{len(keys)} cells, {time.perf_counter() - t0:.0f} s")
    failed = [r for r in records if r.status != "ok"]
    for r in failed:
        console.print(f"[red]failed:[/] {r.method} at {r.target_ratio}: {r.error}")
    return 1 if failed else 0


def cmd_sweep(args) -> int:
    """Each model of the sweep is one `bench run`; the exit code is the worst of them."""
    from bench import sweep

    runs = sweep.load(args.file)
    extra = ["--device", args.device, "--dtype", args.dtype, "--results-dir", args.results_dir,
             "--leaderboard-dir", args.leaderboard_dir]
    extra += (["--cache-dir", args.cache_dir] if args.cache_dir else []) + (["--no-save"] if args.no_save else [])
    extra += (["--force"] if args.force else []) + (["--no-cache"] if args.no_cache else [])
    parsed = [_parser().parse_args([*argv, *extra]) for argv in runs]  # every run is checked before any starts
    codes = [cmd_run(a) for a in parsed]
    return max(codes)


def cmd_leaderboard(args) -> int:
    from bench import leaderboard

    if not Path(args.results_dir).is_dir():
        raise UserError(f"no results folder {args.results_dir!r}; run `bench run` first or pass --results-dir")
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
    for c in compare.compare(args.a, args.b, args.results_dir, args.model, args.suite, ratios):
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
               "compare": cmd_compare, "throughput": cmd_throughput}
    try:
        return handler[args.command](args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished cells are saved under results/; run the same command again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
