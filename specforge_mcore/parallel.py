"""Process groups and launch environments.

* ``spawn``: run a function in N local processes with a real ``torch.distributed`` (gloo on CPU);
  used by ``verify-target --nproc``, the tests and the benchmarks.
* ``init_distributed``: join the job from whatever launched us (torchrun, Slurm, MPI, ``spawn``).
* ``init_model_parallel``: Megatron-Core's TP/PP/EP groups for the frozen target.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn_entry(rank: int, fn: Callable, world_size: int, port: int, result_dir: str, args: tuple,
                 threads: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(threads)
    try:
        result = fn(rank, world_size, *args)
    except BaseException:
        # The parent re-raises with this text; the child's own traceback is otherwise lost.
        with open(os.path.join(result_dir, f"error_{rank}.txt"), "w") as fh:
            fh.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, os.path.join(result_dir, f"result_{rank}.pt"))


class SpawnError(RuntimeError):
    pass


def spawn(fn: Callable, world_size: int, *args: Any, threads: Optional[int] = None,
          start_method: Optional[str] = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; return their results.

    ``fn`` must be importable (a module-level function). The environment variables torchrun would set
    are set, so ``init_distributed()`` inside ``fn`` joins a gloo group.

    ``start_method``: "fork" (default on Linux when each rank gets one thread and the parent has no
    process group) starts ranks in milliseconds with the parent's imports (torch + Megatron take ~10 s
    per process to import); "spawn" starts clean interpreters. Single-threaded ranks never enter an
    OpenMP parallel region, so forking after the parent used OpenMP is safe.
    """
    import torch.multiprocessing as mp

    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // world_size)
    if start_method is None:
        fork_ok = os.name == "posix" and threads == 1 and not dist.is_initialized() and not torch.cuda.is_initialized()
        start_method = "fork" if fork_ok else "spawn"
    with tempfile.TemporaryDirectory(prefix="specforge_spawn_") as result_dir:
        try:
            mp.start_processes(
                _spawn_entry,
                args=(fn, world_size, free_port(), result_dir, args, threads),
                nprocs=world_size,
                join=True,
                start_method=start_method,
            )
        except Exception as exc:
            errors = sorted(f for f in os.listdir(result_dir) if f.startswith("error_"))
            details = "\n".join(open(os.path.join(result_dir, f)).read() for f in errors[:2])
            raise SpawnError(f"{len(errors)} of {world_size} spawned ranks failed:\n{details or exc}") from exc
        return [torch.load(os.path.join(result_dir, f"result_{r}.pt"), weights_only=False) for r in range(world_size)]


# ----------------------------------------------------------------------------------------------
# Joining a job
# ----------------------------------------------------------------------------------------------


@dataclass
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "mpi" | "single"


def _first_host(nodelist: str) -> str:
    """First host of a Slurm node list such as ``node[01-04,07],gpu3``."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist
    if "[" not in head:
        return head
    prefix, rest = nodelist.split("[", 1)
    first = rest.split("]", 1)[0].split(",")[0].split("-")[0]
    return prefix + first


def read_launch_env() -> LaunchEnv:
    """Rank, world size and rendezvous from torchrun, Slurm or MPI; one process when none is found.

    torchrun's variables win (``srun torchrun`` sets both); then Open MPI / MPICH (PMI) variables, with
    mpi4py as the fallback when only an MPI communicator knows; then Slurm's own per-task variables.
    """
    env = os.environ
    port = int(env.get("MASTER_PORT", "29500"))
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
                         env.get("MASTER_ADDR", "127.0.0.1"), port, "torchrun")
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env or "PMIX_RANK" in env:
        rank = int(env.get("OMPI_COMM_WORLD_RANK", env.get("PMI_RANK", env.get("PMIX_RANK", 0))))
        world = int(env.get("OMPI_COMM_WORLD_SIZE", env.get("PMI_SIZE", 0)) or 0)
        local = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("MPI_LOCALRANKID", 0)))
        local_world = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", env.get("MPI_LOCALNRANKS", 0)) or 0)
        master = env.get("MASTER_ADDR")
        if not world or master is None:
            from mpi4py import MPI  # only needed when the MPI environment does not say it all

            comm = MPI.COMM_WORLD
            rank, world = comm.Get_rank(), comm.Get_size()
            master = comm.bcast(socket.gethostname() if rank == 0 else None, root=0)
            port = comm.bcast(port, root=0)
            if not local_world:
                hosts = comm.allgather(socket.gethostname())
                local_world = hosts.count(socket.gethostname())
                local = hosts[:rank].count(socket.gethostname())
        return LaunchEnv(rank, world, local, local_world or world, master, port, "mpi")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                         int(env.get("SLURM_NTASKS_PER_NODE", env["SLURM_NTASKS"]).split("(")[0]),
                         env.get("MASTER_ADDR") or _first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
                         port, "slurm")
    return LaunchEnv(0, 1, 0, 1, "127.0.0.1", port, "single")


def init_distributed(backend: Optional[str] = None) -> LaunchEnv:
    """Join (or create) the default process group; gloo on CPU, NCCL with CUDA."""
    launch = read_launch_env()
    if dist.is_initialized():
        return launch
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank)
    if launch.launcher == "single" and "MASTER_PORT" not in os.environ:
        launch.master_port = free_port()
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
        rank=launch.rank,
        world_size=launch.world_size,
    )
    return launch


def describe_topology(layout, world_size: int, launch: LaunchEnv) -> str:
    """Collective (every rank calls it): the resolved groups, and which ranks hold which pipeline stage."""
    import socket

    from megatron.core import parallel_state as ps

    mine = dict(rank=dist.get_rank(), host=socket.gethostname(), local=launch.local_rank,
                pp=ps.get_pipeline_model_parallel_rank(), tp=ps.get_tensor_model_parallel_rank(),
                dp=ps.get_data_parallel_rank(), ep=ps.get_expert_model_parallel_rank())
    everyone = [None] * world_size
    dist.all_gather_object(everyone, mine)
    dp = ps.get_data_parallel_world_size()
    lines = [f"topology: world={world_size} (launcher: {launch.launcher}, master {launch.master_addr}:{launch.master_port}) "
             f"target layout {layout}: TP={layout.tp} PP={layout.pp} EP={layout.ep} ETP={layout.expert_tp} "
             f"SP={'on' if layout.sp else 'off'} DP={dp}; the draft trains data-parallel on all {world_size} ranks"]
    for stage in range(layout.pp):
        ranks = [r for r in everyone if r["pp"] == stage]
        cells = ", ".join(f"r{r['rank']}(tp{r['tp']} dp{r['dp']} ep{r['ep']} @{r['host']}:{r['local']})" for r in ranks)
        lines.append(f"  stage {stage}: {cells}")
    return "\n".join(lines)
