"""Freed host memory kept for reuse within a phase (bench.hostheap): fewer page faults, same results, and the
user's own allocator settings respected. The timings are pytest-benchmark's (never asserted); the page faults,
which the kernel counts exactly, are."""

import resource
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from bench import hostheap

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or hostheap._glibc() is None,
                           reason=f"needs glibc: {hostheap.policy()}")
STEPS = 4


def _models():
    """A teacher and a student whose logits are as large as SmolLM2's (512 tokens x 49,152: 100 MB in float32)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    teacher, student = LlamaForCausalLM(cfg).eval(), LlamaForCausalLM(cfg)
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        for p in student.model.layers.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return teacher, student, torch.randint(0, 49152, (1, 512), generator=torch.Generator().manual_seed(1))


def _step(teacher, student, ids) -> float:
    """One distillation step as DeltaLLM takes it (KL of next-token distributions, backward)."""
    with torch.no_grad():
        target = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), -1).flatten(0, -2)
    own = F.log_softmax(student(input_ids=ids, use_cache=False).logits.float(), -1).flatten(0, -2)
    loss = F.kl_div(own, target, log_target=True, reduction="batchmean")
    loss.backward()
    student.zero_grad(set_to_none=True)
    return loss.item()


def _faults(fn) -> tuple[int, list[float]]:
    fn()  # the first step sizes the heap
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = [fn() for _ in range(STEPS)]
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, out


@glibc
def test_reused_pages_cut_the_page_faults_of_a_step_and_change_no_result():
    teacher, student, ids = _models()
    step = lambda: _step(teacher, student, ids)  # noqa: E731
    system, losses = _faults(step)
    with hostheap.reuse_freed_pages():
        with hostheap.reuse_freed_pages():  # nested: one setting, restored by the outer block only
            pass
        reused, same = _faults(step)
    after, _ = _faults(step)
    assert same == losses  # where the bytes come from changes nothing computed
    # several 100 MB tensors per step, each faulted in afresh (25,600 pages apiece) unless kept; measured on 2 cores
    assert system > STEPS * 25_600
    assert reused < system / 5, (reused, system)  # 0-18,000 a step measured against 246,000
    # restored on leaving, the setting does not leak into the next phase: each 100 MB tensor is mapped afresh again
    # (about half the first count: glibc's thresholds are then the settled ones, so blocks under 32 MiB stay)
    assert after > STEPS * 25_600


def test_the_users_allocator_settings_are_left_alone(monkeypatch):
    for name, value, why in (("MALLOC_ARENA_MAX", "2", "set by MALLOC_ARENA_MAX"),
                             ("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0", "set by GLIBC_TUNABLES"),
                             ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2", "LD_PRELOAD names another library"),
                             (hostheap.ENV_SWITCH, "system", f"{hostheap.ENV_SWITCH}=system")):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            m.setattr(hostheap, "_libc", None)
            m.setattr(hostheap, "_why_not", None)
            assert hostheap.policy() == f"system default ({why})"
            with hostheap.reuse_freed_pages():  # a no-op: nothing to restore, nothing raised
                assert hostheap._depth == 0


@glibc
@pytest.mark.parametrize("heap", ["system", "reuse"])
def test_distillation_step_time(benchmark, heap):
    """Median step of the model above with glibc's default and with freed pages reused (compare in one run)."""
    teacher, student, ids = _models()
    holder = hostheap.reuse_freed_pages() if heap == "reuse" else None
    if holder is not None:
        holder.__enter__()
    try:
        _step(teacher, student, ids)
        benchmark.pedantic(_step, args=(teacher, student, ids), rounds=5, iterations=1)
    finally:
        if holder is not None:
            holder.__exit__(None, None, None)
