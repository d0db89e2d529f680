#!/usr/bin/env bash
# Train with torchrun, on one node or many.
#
#   launch/torchrun.sh [--nproc-per-node N] [--nnodes M --rdzv-endpoint HOST:PORT [--rdzv-id ID]] \
#       --config configs/X.yaml [--out DIR] [key=value ...]
#
# Everything after the launcher options goes to `specforge-mcore train` unchanged.
# * One node (default): a standalone rendezvous on a free local port; N defaults to the number of GPUs
#   (1 without any).
# * Many nodes: run the same command on every node with the same --nnodes and --rdzv-endpoint (HOST is
#   any one of the nodes, reachable from the others); torchrun's c10d rendezvous numbers the nodes.
# * --max-restarts K: torchrun restarts the whole job up to K times when a rank dies; the restarted ranks
#   resume by themselves from the latest complete checkpoint (save often: train.save_every).
# * LOG_DIR=dir: per-rank logs under dir/<run id>/attempt_0/<rank>/{stdout,stderr}.log, still echoed here.
# * PYTHON: the interpreter with specforge_mcore installed (default: python3 on PATH, e.g. the .venv's).
set -euo pipefail

PYTHON=${PYTHON:-python3}
if command -v nvidia-smi >/dev/null 2>&1; then nproc=$(nvidia-smi -L | wc -l); else nproc=1; fi
nnodes=1
endpoint=""
run_id=${RUN_ID:-specforge-mcore}
max_restarts=0
while [ $# -gt 0 ]; do
    case "$1" in
        --nproc-per-node) nproc=$2; shift 2 ;;
        --nnodes) nnodes=$2; shift 2 ;;
        --rdzv-endpoint) endpoint=$2; shift 2 ;;
        --rdzv-id) run_id=$2; shift 2 ;;
        --max-restarts) max_restarts=$2; shift 2 ;;
        --) shift; break ;;
        *) break ;;
    esac
done

args=(--nproc-per-node "$nproc" --max-restarts "$max_restarts")
if [ "$nnodes" = 1 ] && [ -z "$endpoint" ]; then
    args+=(--standalone)
else
    if [ -z "$endpoint" ]; then
        echo "torchrun.sh: --nnodes $nnodes needs --rdzv-endpoint HOST:PORT (the same on every node)" >&2
        exit 2
    fi
    args+=(--nnodes "$nnodes" --rdzv-backend c10d --rdzv-endpoint "$endpoint" --rdzv-id "$run_id")
fi
if [ -n "${LOG_DIR:-}" ]; then
    mkdir -p "$LOG_DIR"
    args+=(--log-dir "$LOG_DIR" --redirects 3 --tee 3)
fi
exec "$PYTHON" -m torch.distributed.run "${args[@]}" -m specforge_mcore.cli train "$@"
