"""Process groups and launch environments.

* ``spawn``: run a function in N local processes with a real ``torch.distributed`` (gloo on CPU);
  used by ``verify-target --nproc``, the tests and the benchmarks.
* ``init_distributed``: join the job from whatever launched us (torchrun, Slurm, MPI, ``spawn``).
* ``init_model_parallel``: Megatron-Core's TP/PP/EP groups for the frozen target.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from specforge_mcore import collectives
from specforge_mcore.errors import UserError


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
    from specforge_mcore.platform import quiet_known_warnings

    quiet_known_warnings()
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
    launcher: str  # "torchrun" | "env" (spawn, or variables set by hand) | "mpi" | "slurm" | "single"


def slurm_first_host(nodelist: str) -> str:
    """First host of a Slurm node list: ``node[01-04,07],gpu3`` -> ``node01``, ``r[1-2]-n[3-4]`` -> ``r1-n3``."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first host expression ends at the first comma outside brackets
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], nodelist[:end])


def slurm_tasks_per_node(spec: str) -> list[int]:
    """Slurm's compressed per-node task counts: ``2(x3),1`` -> ``[2, 2, 2, 1]``."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise ValueError(f"cannot parse Slurm tasks-per-node {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def slurm_master_port(job_id: str) -> int:
    """A port every task of a job derives alike (the same rule as launch/srun.sh): 15000 + job id mod 20000."""
    return 15000 + int(job_id) % 20000


def _from_mpi(env: os._Environ) -> LaunchEnv:
    """Rank, world and local rank from the MPI communicator; rank 0 names the rendezvous for gloo/NCCL."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise UserError("launched under MPI, but mpi4py is not installed: it provides the ranks and the rendezvous "
                        "(`pip install mpi4py`, after an MPI such as Open MPI is installed)") from None
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)  # the ranks sharing this node's memory
    local, local_world = node.Get_rank(), node.Get_size()
    node.Free()
    if rank == 0:
        rendezvous = (env.get("MASTER_ADDR") or socket.gethostname(),
                      int(env["MASTER_PORT"]) if "MASTER_PORT" in env else free_port())
    else:
        rendezvous = None
    master, port = comm.bcast(rendezvous, root=0)
    return LaunchEnv(rank, world, local, local_world, master, port, "mpi")


def read_launch_env() -> LaunchEnv:
    """Where this process sits in the job, from whichever launcher started it; one process when none did.

    Precedence, and why:
    1. ``RANK``/``WORLD_SIZE`` (torchrun, ``spawn``, or set by hand): ``srun torchrun`` sets Slurm's too.
    2. Open MPI (``OMPI_COMM_WORLD_SIZE``): ``mpirun`` inside a Slurm allocation inherits the allocation's
       Slurm variables, which describe its daemons, not the ranks.
    3. A Slurm job step (``srun``): ``SLURM_PROCID`` / ``SLURM_STEP_NUM_TASKS``. The batch script itself
       has no step variables, so a missing ``srun`` is one process, not a job waiting for absent peers.
    4. Other MPIs (MPICH/Intel Hydra ``PMI_SIZE``, PMIx ``PMIX_RANK``).
    MPI ranks always come from ``mpi4py``, which also spreads rank 0's address and port.
    """
    env = os.environ
    port = int(env.get("MASTER_PORT", "29500"))
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])), env.get("MASTER_ADDR", "127.0.0.1"),
                         port, "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env")
    if "OMPI_COMM_WORLD_SIZE" in env:
        return _from_mpi(env)
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        per_node = slurm_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", env["SLURM_STEP_NUM_TASKS"]))
        node = int(env.get("SLURM_NODEID", 0))
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", 0)),
                         per_node[min(node, len(per_node) - 1)],
                         env.get("MASTER_ADDR") or slurm_first_host(nodelist),
                         int(env["MASTER_PORT"]) if "MASTER_PORT" in env else slurm_master_port(env["SLURM_JOB_ID"]),
                         "slurm")
    if "PMI_SIZE" in env or "PMIX_RANK" in env:
        return _from_mpi(env)
    return LaunchEnv(0, 1, 0, 1, "127.0.0.1", port, "single")


def init_distributed(backend: Optional[str] = None) -> LaunchEnv:
    """Join (or create) the default process group; gloo on CPU, NCCL with CUDA."""
    launch = read_launch_env()
    if dist.is_initialized():
        return launch
    if backend is None:
        backend = collectives.init_backend()
    if "nccl" in backend:
        if launch.local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {launch.local_rank} of {launch.local_world_size} on this node, but only "
                            f"{torch.cuda.device_count()} GPU(s) are visible: NCCL needs one GPU per rank (start "
                            "as many ranks per node as GPUs, or check CUDA_VISIBLE_DEVICES)")
        torch.cuda.set_device(launch.local_rank)
    elif launch.launcher in ("mpi", "slurm") and launch.local_world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks sharing a node would each start one thread per core and fight over them
        # (torchrun sets OMP_NUM_THREADS=1 for this reason; mpirun and srun do not).
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, min(cores, (os.cpu_count() or 1) // launch.local_world_size)))
    if launch.launcher == "single" and "MASTER_PORT" not in os.environ:
        launch.master_port = free_port()
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent keeps one store (same MASTER_PORT) across --max-restarts attempts, and the
        # process group's keys would be read back from the attempt that died: the restarted ranks would
        # dial the dead ranks' gloo/NCCL addresses. A prefix per attempt keeps each attempt's keys apart.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size, is_master=False)
        dist.init_process_group(backend=backend, store=dist.PrefixStore(f"specforge_mcore/attempt_{attempt}", store),
                                rank=launch.rank, world_size=launch.world_size)
        return launch
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
        rank=launch.rank,
        world_size=launch.world_size,
    )
    return launch


def _groups_line(name: str, groups: list[tuple[int, ...]], limit: int = 8) -> str:
    shown = ", ".join("[" + ",".join(map(str, g)) + "]" for g in groups[:limit])
    more = f", ... ({len(groups)} groups)" if len(groups) > limit else ""
    return f"  {name} groups: {shown}{more}"


def describe_topology(layout, world_size: int, launch: LaunchEnv) -> str:
    """Collective (every rank calls it): the resolved groups, and which ranks hold which pipeline stage."""
    from megatron.core import parallel_state as ps

    groups = {
        "TP": ps.get_tensor_model_parallel_group(),
        "PP": ps.get_pipeline_model_parallel_group(),
        "EP": ps.get_expert_model_parallel_group(),
        "DP": ps.get_data_parallel_group(),
    }
    mine = dict(rank=dist.get_rank(), host=socket.gethostname(), local=launch.local_rank,
                pp=ps.get_pipeline_model_parallel_rank(), tp=ps.get_tensor_model_parallel_rank(),
                dp=ps.get_data_parallel_rank(), ep=ps.get_expert_model_parallel_rank(),
                groups={name: tuple(dist.get_process_group_ranks(g)) for name, g in groups.items()})
    everyone = collectives.all_gather_object(mine)
    dp = ps.get_data_parallel_world_size()
    hosts = sorted({r["host"] for r in everyone})
    lines = [f"topology: world={world_size} on {len(hosts)} node(s) (launcher: {launch.launcher}, rendezvous "
             f"{launch.master_addr}:{launch.master_port}); target layout {layout}: TP={layout.tp} PP={layout.pp} "
             f"EP={layout.ep} ETP={layout.expert_tp} SP={'on' if layout.sp else 'off'} DP={dp}; "
             f"the draft trains data-parallel on all {world_size} ranks"]
    for name in groups:
        lines.append(_groups_line(name, sorted({r["groups"][name] for r in everyone})))
    for stage in range(layout.pp):
        ranks = [r for r in everyone if r["pp"] == stage]
        cells = ", ".join(f"r{r['rank']}(tp{r['tp']} dp{r['dp']} ep{r['ep']} @{r['host']}:{r['local']})" for r in ranks)
        lines.append(f"  stage {stage}: {cells}")
    return "\n".join(lines)


def raise_together(error: Optional[BaseException], src: int = 0) -> None:
    """Collective: if rank ``src`` hit ``error``, every rank raises it (a UserError with its message);
    nobody is left waiting in a later collective."""
    verdict = collectives.broadcast_object(
        None if error is None else (type(error).__name__, str(error), isinstance(error, UserError)), src=src)
    if verdict is None:
        return
    if error is not None:
        raise error
    name, message, is_user = verdict
    raise (UserError(message) if is_user else RuntimeError(f"rank {src} failed with {name}: {message}"))
