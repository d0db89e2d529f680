#!/usr/bin/env bash
# System packages the launcher tests need: Open MPI (mpirun, and the headers mpi4py compiles against)
# and Slurm (slurmctld/slurmd/srun/sbatch for a one-node cluster the test starts itself).
# Idempotent and quiet; needs root (CI runs as root). Run before `pip install -r requirements/base.txt`,
# because mpi4py builds against the Open MPI found here.
set -euo pipefail

packages=(openmpi-bin libopenmpi-dev slurm-wlm)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    # A developer without root can still do everything else; the launcher tests skip (and fail in CI).
    echo "install-system-deps: not root: install ${missing[*]} yourself for the mpirun/Slurm launcher tests" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# No recommends: slurm-wlm would otherwise pull in mail and X11 bits the tests never use.
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-system-deps: installed ${missing[*]}"
