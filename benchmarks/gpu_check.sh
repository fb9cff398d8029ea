#!/usr/bin/env bash
# The GPU check: one command on one H100 / H200 machine without network, under 8 minutes.
#   1. fla vs the torch references, bf16, T = 2048, every op the dispatch sends to fla, forward +
#      backward: relative error of each output and gradient (benchmarks/kernel_parity.py)
#   2. 100 bf16 steps of the 125M softmax and DeltaNet models through the real trainer
#      (python -m llm train configs/recipe/125m.yaml ...) on the offline python-docs
#      corpus, eager and with train.compile=true; the loss must fall by 10% in each, and the
#      compiled run's losses must follow the eager run's (bf16 rounding apart)
#   3. the mixer throughput table, 125M shape, T = 2048 (benchmarks/mixers.py)
# Each stage has its own time limit, cut to what is left of the whole budget (GPU_CHECK_BUDGET_S,
# default 600 s); a failed stage is reported and the next one runs; the exit status is 1 if any
# stage failed. Everything goes to the terminal and to the log (GPU_CHECK_LOG, default
# $GPU_CHECK_WORK/gpu_check.log; GPU_CHECK_WORK, default /tmp/gpu_check, holds the installed
# wheels, the corpus and the runs). GPU_CHECK_DATA names a tokenized corpus to use instead of
# making one there (the data directory of `python -m data_prep tokenize ... --vocab-size 8192`).
#
# Such a machine has Python 3.12, torch and triton but not fla, deepspeed, omegaconf or wandb
# (wandb is switched off here). Their pure-Python wheels (DeepSpeed built without its compiled
# ops) come along in .whl/ (gitignored), made beforehand from the repo root on a machine with
# network and the project installed (its venv has the torch DeepSpeed's build imports):
#   benchmarks/gpu_check.sh --prep
# Then copy the repo (with .whl/) to the GPU machine and, from its root:
#   benchmarks/gpu_check.sh                 # everything
#   benchmarks/gpu_check.sh --train-only    # stage 2 alone
# Gated DeltaNet is not among the training runs: fla refuses its chunked backward on Hopper under
# Triton >= 3.4, < 3.7.1 (wrong results, fla issue #640), which such images ship.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
PY=${PYTHON:-python3}

prep() {
    local plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
                --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    local ds_version
    ds_version=$("$PY" -c "import importlib.metadata as m; print(m.version('deepspeed'))" 2>/dev/null || echo 0.19.8)
    mkdir -p "$WHEELS"
    # with their dependencies (pydantic's compiled core for CPython 3.12 included)
    "$PY" -m pip download -q -d "$WHEELS" "${plat[@]}" fla-core==0.6.0 "pydantic>=2,<3" hjson
    "$PY" -m pip download -q -d "$WHEELS" "${plat[@]}" --no-deps omegaconf==2.3.0  # PyYAML is there
    # source-only on PyPI, pure Python: build the wheels here
    "$PY" -m pip wheel -q -w "$WHEELS" --no-deps antlr4-python3-runtime==4.9.3
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q -w "$WHEELS" --no-deps --no-build-isolation "deepspeed==$ds_version"
    ls -l "$WHEELS"
}

if [[ ${1:-} == --prep ]]; then
    prep
    exit 0
fi
TRAIN_ONLY=false
[[ ${1:-} == --train-only ]] && { TRAIN_ONLY=true; shift; }
if [[ $# -gt 0 ]]; then
    echo "usage: benchmarks/gpu_check.sh [--prep | --train-only]" >&2
    exit 2
fi

WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}  # wheels' install target, the corpus, the runs
LOG=${GPU_CHECK_LOG:-$WORK/gpu_check.log}
BUDGET_S=${GPU_CHECK_BUDGET_S:-600}  # + up to 10 s to kill the last stage: under 10.5 minutes
mkdir -p "$WORK"
exec > >(tee "$LOG") 2>&1
DEADLINE=$((SECONDS + BUDGET_S))
FAILED=()

# stage NAME LIMIT_S COMMAND...: run COMMAND for at most LIMIT_S seconds (or what is left of the
# budget); record a failure and carry on.
stage() {
    local name=$1 limit=$2 start=$SECONDS rc=0
    shift 2
    local left=$((DEADLINE - SECONDS))
    ((limit > left)) && limit=$left
    echo
    if ((limit < 10)); then
        echo "=== $name: SKIPPED, the ${BUDGET_S} s budget is spent"
        FAILED+=("$name (no time left)")
        return 0
    fi
    echo "=== $name (limit ${limit} s) ==="
    # the trainer checkpoints on SIGTERM (preemption): give it 10 s, then kill
    timeout --kill-after=10 "$limit" "$@" || rc=$?
    if ((rc == 0)); then
        echo "--- $name: ok in $((SECONDS - start)) s"
    else
        echo "--- $name: FAILED (exit $rc$( ((rc == 124 || rc == 137)) && echo ', timed out')) after $((SECONDS - start)) s"
        FAILED+=("$name")
    fi
}

echo "gpu_check $(date -u +%FT%TZ) on ${HOSTNAME:-?}; budget ${BUDGET_S} s; log $LOG"
nvidia-smi -L || true
[[ -d $WHEELS ]] || { echo "no $WHEELS/ here: make it first with benchmarks/gpu_check.sh --prep"; exit 1; }
stage "install wheels" 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "$WHEELS"/*.whl
export PYTHONPATH="$PWD:$WORK/site" PYTHONUNBUFFERED=1
stage "environment" 60 "$PY" -c "
import sys, torch, triton, deepspeed, omegaconf, fla, llm.train
print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__,
      '| deepspeed', deepspeed.__version__, '| fla', fla.__version__)
assert torch.cuda.is_available(), 'no CUDA device'
print(torch.cuda.get_device_name(0))"

DATA=${GPU_CHECK_DATA:-$WORK/pydocs}
VOCAB=8192
if [[ ! -f $DATA/meta.json ]]; then  # written last: the corpus is complete
    stage "corpus (builtin:python-docs, ${VOCAB}-piece tokenizer)" 120 \
        "$PY" -m data_prep tokenize --source builtin:python-docs --out "$DATA" --vocab-size "$VOCAB"
fi

# 125M's head shape (12 heads of 64): the Triton kernels compiled and tuned here serve the runs below.
# Most of this stage is fla's first-call compilation and autotuning (on an H200: chunk_delta_rule's
# forward and backward, with the torch reference, took 90 s).
$TRAIN_ONLY || stage "fla vs torch parity (bf16, T = 2048)" 240 \
    "$PY" benchmarks/kernel_parity.py --T 2048 --B 2 --H 12 --D 64 --dtype bf16

# The same config for every run (model/125m.yaml's shape), only the mixer differs; DeltaNet must
# run on fla's kernels (kernels=fla fails where it cannot), softmax takes torch's SDPA.
TRAIN=(configs/recipe/125m.yaml model.vocab_size=$VOCAB "data.path=$DATA" data.seq_len=2048
       train.max_steps=100 train.global_batch_size=8 train.micro_batch_size=8 train.dtype=bf16 train.zero_stage=0
       train.eval_every=50 train.ckpt_every=1000 eval.windows=8 optim.warmup_steps=10 logging.log_every=10
       logging.wandb=disabled)
for mixer_kernels in softmax:auto deltanet:fla; do
    mixer=${mixer_kernels%:*}
    for compile in false true; do
        run=$WORK/runs/${mixer}_compile_$compile
        rm -rf "$run"
        stage "train $mixer 125M, 100 bf16 steps, compile=$compile" 120 "$PY" -m llm train "${TRAIN[@]}" \
            "model.mixer=$mixer" "model.kernels=${mixer_kernels#*:}" "train.compile=$compile" "train.out_dir=$run"
    done
    stage "loss falls, compiled follows eager ($mixer)" 20 "$PY" - "$WORK/runs/${mixer}_compile_"{false,true} <<'PY'
import json, sys
runs = {}
for run in sys.argv[1:]:
    records = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    train = [r for r in records if "loss" in r]
    first, last = train[0], train[-1]
    print(f"{run}: loss {first['loss']:.3f} (step {first['step']}) -> {last['loss']:.3f} (step {last['step']}); "
          f"val_loss {[round(r['val_loss'], 3) for r in records if 'val_loss' in r]}; "
          f"median tokens/s {sorted(r['tokens_per_s'] for r in train[1:])[len(train[1:]) // 2]:,.0f}, "
          f"last mfu {last.get('mfu')}")
    assert last["step"] >= 100, f"the run stopped at step {last['step']}"
    assert last["loss"] < 0.9 * first["loss"], "the loss did not fall by 10%"
    runs[run] = [r["loss"] for r in train]
eager, compiled = runs.values()
gap = max(abs(a - b) for a, b in zip(eager, compiled))
print(f"compiled vs eager: largest gap between logged losses {gap:.4f}")
assert gap < 0.05 * eager[0], "the compiled run's losses left the eager run's"
PY
done

# Last: it gets what is left of the budget.
$TRAIN_ONLY || stage "mixer throughput (125M, T = 2048)" 200 "$PY" benchmarks/mixers.py --sizes 125m --seq-lens 2048 --steps 5 --json "$WORK/mixers.json"

echo
if ((${#FAILED[@]})); then
    echo "gpu_check: FAILED after $SECONDS s:"
    printf '  %s\n' "${FAILED[@]}"
    exit 1
fi
echo "gpu_check: all stages passed in $SECONDS s"
