"""Evaluation suites: how much data calibration and evaluation use. ``quick`` fits a 2-core CPU in minutes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from bench.errors import UserError

TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq", "openbookqa")


@dataclass(frozen=True)
class Suite:
    name: str
    calib_samples: int
    calib_seq_len: int
    ppl_seq_len: int
    ppl_windows: int | None
    tasks: tuple[str, ...]
    task_limit: int | None
    latency_prompt: int = 128
    latency_new_tokens: int = 32
    latency_repeats: int = 5
    eval_batch_size: int = 8

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SUITES: dict[str, Suite] = {
    "quick": Suite("quick", calib_samples=32, calib_seq_len=512, ppl_seq_len=512, ppl_windows=16,
                   tasks=TASKS, task_limit=40, latency_repeats=3),
    "standard": Suite("standard", calib_samples=128, calib_seq_len=1024, ppl_seq_len=1024, ppl_windows=64,
                      tasks=TASKS, task_limit=300),
    "full": Suite("full", calib_samples=256, calib_seq_len=2048, ppl_seq_len=2048, ppl_windows=None,
                  tasks=TASKS, task_limit=None, latency_repeats=10),
}


def get_suite(name: str, **overrides) -> Suite:
    if name not in SUITES:
        raise UserError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)}")
    suite = SUITES[name]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(suite, **overrides) if overrides else suite
