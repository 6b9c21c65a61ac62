#!/usr/bin/env bash
# SLURM: 2 nodes x 8 GPUs, one task per GPU; Lightning reads the SLURM environment.
#   sbatch scripts/launch_slurm.sh recipe=dc-ae-f32c32-sana-1.1 phase=1 data.train='/data/shards/train-{000000..000999}.tar'
# SIGUSR1 arrives 90 s before the time limit: Lightning saves an hpc checkpoint in the run folder
# (runs/<recipe>/phase<N>/job-<SLURM_JOB_ID>) and requeues the job, which resumes from it by itself.
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
srun python -m dcae_train trainer.devices=8 trainer.num_nodes="$SLURM_NNODES" trainer.strategy=ddp "$@"
