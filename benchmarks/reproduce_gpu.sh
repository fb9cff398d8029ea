#!/usr/bin/env bash
# PD-SSM state tracking (docs/reproductions.md) at GPU budgets, as parallel processes on one GPU
# (benchmarks/reproduce_cells.py), batch 256 and 4 heads x 32 states (the paper: batch 256, one
# head of 128 states):
#   survey  14 cells, one seed: all four tasks, PD-SSM variants and Gated DeltaNet, each trained for
#           the steps that fit in TRAIN_S seconds (default 360; DEADLINE_S 510)
#   seeds   14 cells: seeds 0-2 of the best PD-SSM variant and Gated DeltaNet on cycle navigation and
#           modular arithmetic, +state_norm on even pairs and mod arith, STEPS steps each (default
#           2000; DEADLINE_S 300)
# Writes pdssm_state_tracking.json / .png and cells.log to OUT_DIR (default $OUT, else
# /tmp/reproduce_gpu); cells still running at DEADLINE_S are stopped and listed as unfinished.
#
#   benchmarks/reproduce_gpu.sh survey|seeds [OUT_DIR]
#
# The GPU image lacks omegaconf (llm.config needs it): its wheels come in .whl/ (gitignored; made by
# benchmarks/gpu_check.sh --prep). fla is left out on purpose: the torch references run these tiny
# models, and fla refuses Gated DeltaNet's backward on Hopper with the images' Triton.
set -euo pipefail
cd "$(dirname "$0")/.."
SET=${1:-}
OUT_DIR=${2:-${OUT:-/tmp/reproduce_gpu}}
PY=${PYTHON:-python3}

CELLS=()
case $SET in
survey)
    BUDGET=(--deadline-s "${DEADLINE_S:-510}" --budget train_seconds="${TRAIN_S:-360}")
    for model in "pdssm" "pdssm +state_norm" "pdssm +state_norm -phase" "pdssm_diag" "gated_deltanet"; do
        CELLS+=("cycle_nav:$model")
    done
    for task in parity even_pairs mod_arith; do
        for model in "pdssm" "pdssm +state_norm -phase" "gated_deltanet"; do
            CELLS+=("$task:$model")
        done
    done ;;
seeds)
    BUDGET=(--deadline-s "${DEADLINE_S:-300}" --budget steps="${STEPS:-2000}")
    for seed in 0 1 2; do
        CELLS+=("cycle_nav:pdssm +state_norm:$seed" "cycle_nav:gated_deltanet:$seed"
                "mod_arith:pdssm:$seed" "mod_arith:gated_deltanet:$seed")
    done
    CELLS+=("even_pairs:pdssm +state_norm" "mod_arith:pdssm +state_norm") ;;
*)
    echo "usage: benchmarks/reproduce_gpu.sh survey|seeds [OUT_DIR]" >&2
    exit 2 ;;
esac

if ! "$PY" -c "import omegaconf" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/omegaconf-*.whl .whl/antlr4*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the repo, not installed there
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" benchmarks/reproduce_cells.py --out "$OUT_DIR" "${BUDGET[@]}" \
    --budget batch=256 --budget state_size=32 --budget eval_batch=512 "${CELLS[@]}"
rm -rf "$OUT_DIR/cells"  # each cell's json is in the merged one, its log in cells.log
