#!/usr/bin/env bash
# Train as one Slurm job step: one task per GPU on every node of the allocation.
#
#   launch/srun.sh --config configs/X.yaml [--out DIR] [key=value ...]
#
# Inside an allocation (launch/slurm.sbatch, salloc) it uses all of it; outside one, srun allocates
# (NNODES, default 1). Tasks per node: the allocation's --ntasks-per-node, else one per allocated GPU,
# else NTASKS_PER_NODE (default 1). Each task reads its rank (SLURM_PROCID), the world
# (SLURM_STEP_NUM_TASKS) and its local rank (SLURM_LOCALID); the rendezvous is MASTER_ADDR:MASTER_PORT
# when set (slurm.sbatch sets them), else the step's first node and port 15000 + job id mod 20000.
# * LOG_DIR (default logs/): one log per rank, LOG_DIR/<job name>-<job id>-rank<N>.log.
# * PYTHON: the interpreter with specforge_mcore installed (default: python3 on PATH).
set -euo pipefail

PYTHON=${PYTHON:-python3}
LOG_DIR=${LOG_DIR:-logs}
tasks=${SLURM_NTASKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${NTASKS_PER_NODE:-1}}}
nodes=${SLURM_JOB_NUM_NODES:-${NNODES:-1}}
mkdir -p "$LOG_DIR"
# A job name without slashes: %x in the log pattern is the job name, by default the command's path.
exec srun --nodes="$nodes" --ntasks-per-node="$tasks" --kill-on-bad-exit=1 \
    --job-name="${SLURM_JOB_NAME:-specforge-mcore}" --output="$LOG_DIR/%x-%j-rank%t.log" \
    "$PYTHON" -m specforge_mcore.cli train "$@"
