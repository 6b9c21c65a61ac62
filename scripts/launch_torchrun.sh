#!/usr/bin/env bash
# Multi-node DDP with torchrun. Run this on every node: the same command, with that node's NODE_RANK:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 RUN_ID=sana-p1 scripts/launch_torchrun.sh recipe=dc-ae-f32c32-sana-1.1 phase=1 data.train=...
# NNODES      nodes in the run (default 1)
# NODE_RANK   this node, 0 .. NNODES-1; node 0 holds global rank 0, which writes the run folder
# MASTER_ADDR the address of node 0, reachable from every node (default 127.0.0.1: one node)
# MASTER_PORT a free port on node 0 (default 29500)
# GPUS        processes on this node (default: the GPUs nvidia-smi lists)
# RUN_ID      names the run folder runs/<recipe>/phase<N>/job-<RUN_ID>; required with NNODES > 1 (the same on every
#             node; a new one for a new run). Resume after a failure: the same command, same RUN_ID, plus resume=auto.
# Fixed ranks (torchrun's static rendezvous): node NODE_RANK holds global ranks NODE_RANK*GPUS .. +GPUS-1.
set -euo pipefail
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS=${GPUS:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
fail() { echo "launch_torchrun.sh: $1" >&2; exit 2; }
(( GPUS >= 1 )) || fail "no GPU listed by nvidia-smi: set GPUS=<processes per node> (on CPU add trainer.accelerator=cpu)"
(( NODE_RANK >= 0 && NODE_RANK < NNODES )) || fail "NODE_RANK=$NODE_RANK must be in 0..$((NNODES - 1)) for NNODES=$NNODES"
if (( NNODES > 1 )) && [[ -z "${RUN_ID:-}" ]]; then
  fail "NNODES=$NNODES needs RUN_ID=<name>, the same on every node (it names the run folder; reuse it to resume)"
fi
RUN_ID=${RUN_ID:-$(date +%Y%m%d-%H%M%S)}
exec torchrun \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" --rdzv-id "$RUN_ID" \
  -m dcae_train trainer.devices="$GPUS" trainer.num_nodes="$NNODES" trainer.strategy=ddp "$@"
