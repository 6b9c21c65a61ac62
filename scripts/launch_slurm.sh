#!/usr/bin/env bash
# SLURM: 2 nodes x 8 GPUs, one task per GPU; srun starts every rank and Lightning reads the SLURM environment:
#   sbatch scripts/launch_slurm.sh recipe=dc-ae-f32c32-sana-1.1 phase=1 data.train='/data/shards/train-{000000..000999}.tar'
# Rank 0 listens on the job's first node (MASTER_ADDR) at a port derived from the job id (MASTER_PORT); set either
# to override. Preemption: SIGUSR1 90 s before the time limit (--signal) or SIGTERM: every rank saves a checkpoint
# at the next step and exits 75; this script then requeues the job, which keeps its id and so its run folder
# (runs/<recipe>/phase<N>/job-<SLURM_JOB_ID>) and continues there with resume=auto.
#SBATCH --job-name=dcae-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@90
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail
fail() { echo "launch_slurm.sh: $1" >&2; exit 2; }
[[ -n "${SLURM_JOB_ID:-}" ]] || fail "not inside a SLURM job: submit it with sbatch scripts/launch_slurm.sh ..."
[[ -n "${SLURM_NTASKS_PER_NODE:-}" ]] || fail "the job needs --ntasks-per-node (one task per GPU)"
PER_NODE=${SLURM_NTASKS_PER_NODE%%[(,]*}  # "8", or "8(x2)" on some clusters
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
RESUME=()
if (( ${SLURM_RESTART_COUNT:-0} > 0 )); then RESUME=(resume=auto); fi  # a requeued job continues its run
# SLURM sends SIGTERM to this script too on preemption: keep waiting for srun while the ranks save.
trap 'echo "launch_slurm.sh: SIGTERM: waiting for the ranks to save a checkpoint" >&2' TERM
status=0
srun python -m dcae_train trainer.devices="$PER_NODE" trainer.num_nodes="$SLURM_NNODES" trainer.strategy=ddp \
  "$@" "${RESUME[@]}" || status=$?
if (( status == 75 )); then
  echo "launch_slurm.sh: preempted; requeueing job $SLURM_JOB_ID (it continues with resume=auto)" >&2
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
