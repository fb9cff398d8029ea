#!/usr/bin/env bash
# Launch `python -m llm train` under torchrun on one or many nodes (c10d rendezvous).
#
#   launch/torchrun.sh CONFIG [key=value ...]
#
# Environment (defaults in brackets):
#   NPROC_PER_NODE  ranks per node [number of GPUs, or 1 without GPUs]
#   NNODES          nodes [1]; more than one needs MASTER_ADDR
#   MASTER_ADDR     rendezvous host, any one of the nodes    MASTER_PORT  its port [29500]
#   RDZV_ID         job id shared by all nodes [llm]
# Example, two nodes: on each, MASTER_ADDR=node1 NNODES=2 launch/torchrun.sh cfg.yaml
#
# Preemption: SIGTERM or SIGUSR1 to this script (or to all its processes, as Slurm sends them)
# reaches every local rank, which checkpoints at the next step boundary and exits 0. torchrun
# itself ignores both: it would die on SIGUSR1, and answer SIGTERM by killing the ranks 30 s later.
# Ctrl-C (SIGINT to this script, or to the terminal's foreground group: the ranks are in a session of
# their own) goes the same way: the first checkpoints and exits, a second aborts.
set -euo pipefail
if [ $# -lt 1 ]; then
  sed -n '2,17p' "$0"; exit 2
fi
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
NNODES=${NNODES:-1}
if [ "$NNODES" = 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  rdzv=(--standalone)  # one node: a private rendezvous on a free port
elif [ -n "${MASTER_ADDR:-}" ]; then
  rdzv=(--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id "${RDZV_ID:-llm}")
else
  echo "launch/torchrun.sh: NNODES=$NNODES needs MASTER_ADDR (the rendezvous host)" >&2; exit 2
fi

launcher=
trap 'pkill -USR1 -P "$launcher" || true' USR1  # the ranks are torchrun's children
trap 'pkill -TERM -P "$launcher" || true' TERM
trap 'pkill -INT -P "$launcher" || true' INT
# torchrun's own signal handlers: not for TERM / USR1 / INT (older torch reads the first variable;
# newer ones overwrite it from --signals-to-handle, whose default the second sets)
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGHUP,SIGQUIT PET_SIGNALS_TO_HANDLE=SIGHUP,SIGQUIT
(trap '' TERM USR1 INT; exec torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" "${rdzv[@]}" \
  -m llm train "$@") &
launcher=$!
while kill -0 "$launcher" 2>/dev/null; do
  wait "$launcher" || true  # returns early when a signal is forwarded
done
wait "$launcher"  # torchrun's exit status
