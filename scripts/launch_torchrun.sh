#!/usr/bin/env bash
# Multi-node DDP with torchrun. Run this on every node (same command, its own NODE_RANK):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 GPUS=8 scripts/launch_torchrun.sh recipe=dc-ae-f32c32-sana-1.1 phase=1 data.train=...
# Every rank must agree on the run folder: torchrun's --rdzv-id names it (runs/<recipe>/phase<N>/job-<id>),
# or pass run_dir=<shared path> yourself. Resume after a failure with the same command plus resume=auto.
set -euo pipefail
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RUN_ID=${RUN_ID:-$(date +%Y%m%d-%H%M)}
exec torchrun \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RUN_ID" \
  -m dcae_train trainer.devices="$GPUS" trainer.num_nodes="$NNODES" trainer.strategy=ddp "$@"
