#!/usr/bin/env bash
# Train under MPI (Open MPI, MPICH, Intel MPI): one MPI rank per GPU (or per CPU process).
#
#   launch/mpirun.sh -np 16 [--hostfile hosts] [other mpirun options] -- --config configs/X.yaml [key=value ...]
#
# Options before `--` go to mpirun, the rest to `specforge-mcore train`. Each rank learns its rank, the
# world size and its local rank from the MPI communicator (mpi4py); rank 0 then names the address and a
# free port, and torch.distributed (NCCL on GPUs, gloo on CPU) meets there. MPI itself carries no tensors.
# * LOG_DIR=dir: one log per rank (Open MPI: dir/1/rank.N/{stdout,stderr}; MPICH: dir/rank-N.log).
# * PYTHON: the interpreter with specforge_mcore and mpi4py installed (default: python3 on PATH).
# * Open MPI refuses to run as root unless OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
#   (containers): set them yourself if that is what you mean.
set -euo pipefail

PYTHON=${PYTHON:-python3}
MPIRUN=${MPIRUN:-mpirun}
mpi_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    mpi_args+=("$1")
    shift
done
if [ $# -eq 0 ]; then
    echo "usage: launch/mpirun.sh [mpirun options] -- --config configs/X.yaml [key=value ...]" >&2
    exit 2
fi
shift

if "$MPIRUN" --version 2>/dev/null | grep -q "Open MPI"; then
    # Open MPI passes the environment only to ranks on this node; these must reach the others too.
    for var in PATH LD_LIBRARY_PATH PYTHONPATH MASTER_ADDR MASTER_PORT; do
        if [ -n "${!var:-}" ]; then mpi_args+=(-x "$var"); fi
    done
    if [ -n "${LOG_DIR:-}" ]; then mpi_args+=(--output-filename "$LOG_DIR"); fi
elif [ -n "${LOG_DIR:-}" ]; then
    mpi_args+=(-outfile-pattern "$LOG_DIR/rank-%r.log" -errfile-pattern "$LOG_DIR/rank-%r.log")
fi
if [ -n "${LOG_DIR:-}" ]; then mkdir -p "$LOG_DIR"; fi
exec "$MPIRUN" "${mpi_args[@]}" "$PYTHON" -m specforge_mcore.cli train "$@"
