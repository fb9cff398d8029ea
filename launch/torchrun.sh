#!/usr/bin/env bash
# Launch `python -m llm train` under torchrun on one or many nodes (c10d rendezvous).
#
#   launch/torchrun.sh CONFIG [key=value ...]
#
# Environment (defaults in brackets):
#   NPROC_PER_NODE  ranks per node [number of GPUs, or 1 without GPUs]
#   NNODES          nodes [1]         NODE_RANK  this node's index [0]
#   MASTER_ADDR     rendezvous host [127.0.0.1]   MASTER_PORT  its port [29500]
#   RDZV_ID         job id shared by all nodes [llm]
# Example, two nodes: on each, MASTER_ADDR=node1 NNODES=2 NODE_RANK=<0|1> launch/torchrun.sh cfg.yaml
set -euo pipefail
if [ $# -lt 1 ]; then
  sed -n '2,12p' "$0"; exit 2
fi
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
NNODES=${NNODES:-1}
rdzv=(--rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" --rdzv_id "${RDZV_ID:-llm}")
if [ "$NNODES" = 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  rdzv=(--standalone)  # one node: a private rendezvous on a free port
fi
exec torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" --node_rank "${NODE_RANK:-0}" \
  "${rdzv[@]}" -m llm train "$@"
