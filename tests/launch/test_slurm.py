"""launch/slurm.sbatch and launch/srun.sh on a real one-node Slurm cluster that this module starts.

The cluster (Debian's slurm-wlm) runs from a generated config in a temporary directory: slurmctld and
slurmd in the foreground on free ports, auth/none (no munge needed on a single test host), the node's
CPU count taken from the config. Both daemons, and any job left in the queue, are stopped even when a
test fails.
"""

import json
import os
import re
import socket
import subprocess
import time

import pytest

from specforge_mcore.parallel import free_port

SLURM_CONF = """\
ClusterName=specforge-test
SlurmctldHost={node}(127.0.0.1)
SlurmUser={user}
SlurmdUser={user}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/none
# Job credentials live 15 s (default 120); a requeued job waits this long before it starts again.
AuthInfo=cred_expire=15
CredType=cred/none
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SchedulerType=sched/builtin
ReturnToService=2
# A job told to stop (scancel, requeue, preemption) gets SIGTERM, then SIGKILL this many seconds later.
KillWait=5
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# Trust the CPU count below rather than the hardware: the job needs one CPU per rank.
SlurmdParameters=config_overrides
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node cluster; yields the environment (SLURM_CONF) its clients need."""
    for tool in ("slurmctld", "slurmd", "sbatch", "srun", "scontrol"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            message = f"{tool} not found (installed by .ci/install-system-deps.sh)"
            pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root to start job steps")
    directory = tmp_path_factory.mktemp("slurm")
    (directory / "state").mkdir()
    (directory / "spool").mkdir()
    node = socket.gethostname().split(".")[0]
    conf = directory / "slurm.conf"
    conf.write_text(SLURM_CONF.format(node=node, user="root", ctld_port=free_port(), slurmd_port=free_port(),
                                      dir=directory, cpus=max(2, os.cpu_count() or 1)))
    env = dict(os.environ, SLURM_CONF=str(conf))
    daemons = []
    try:
        for cmd in (["slurmctld", "-D", "-i"], ["slurmd", "-D", "-N", node]):
            log = open(directory / f"{cmd[0]}.out", "w")
            daemons.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.time() + 60
        state = ""
        while time.time() < deadline:
            probe = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=env, capture_output=True, text=True)
            state = probe.stdout.strip()
            if state == "idle":
                break
            time.sleep(0.5)
        else:
            logs = "\n".join((directory / f).read_text(errors="replace")[-1500:]
                             for f in ("slurmctld.out", "slurmd.out") if (directory / f).exists())
            pytest.fail(f"the test cluster's node never became idle (state {state!r}):\n{logs}")
        yield env
    finally:
        jobs = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True).stdout.split()
        if jobs:
            subprocess.run(["scancel", *jobs], env=env)
            time.sleep(2)
        for proc in reversed(daemons):
            _stop(proc)


def _rank_logs(directory) -> list[str]:
    return sorted(p.name.rsplit("-", 1)[-1] for p in directory.glob("*-rank*.log"))


@pytest.mark.slow
def test_sbatch_job(tmp_path, launch, slurm):
    out, logs = tmp_path / "run", tmp_path / "logs"
    env = dict(launch.env(LOG_DIR=str(logs)), SLURM_CONF=slurm["SLURM_CONF"])
    launch.run(["sbatch", "--wait", f"--ntasks-per-node={launch.world}", f"--output={tmp_path}/%x-%j.out",
                "launch/slurm.sbatch", *launch.train_args(out)], env, tmp_path / "sbatch.log")
    (job_out,) = tmp_path.glob("specforge-mcore-*.out")
    assert "rendezvous" in job_out.read_text(), job_out.read_text()
    assert _rank_logs(logs) == ["rank0.log", "rank1.log"], list(logs.iterdir())
    rank0 = (logs / next(p.name for p in logs.iterdir() if p.name.endswith("rank0.log"))).read_text(errors="replace")
    assert "launcher: slurm" in rank0, rank0[-2000:]
    launch.assert_same_curve(out, "sbatch")


def _job_state(job: str, env: dict) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def _wait_for(what: str, predicate, timeout: float, describe) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}:\n{describe()}")


@pytest.mark.slow
def test_sbatch_requeue_resumes_from_the_last_checkpoint(tmp_path, launch, slurm):
    """The documented recovery path on Slurm: ``sbatch --requeue ... --resume``. The first attempt hangs at
    the end of step 3 (fault ``stall``), after step_2 is saved; ``scontrol requeue`` (what preemption or a
    failed node does) stops it with SIGTERM then SIGKILL; Slurm runs the batch script again with
    SLURM_RESTART_COUNT=1, which resumes from step_2 and finishes: the same loss curve as an uninterrupted
    run, every step in metrics.jsonl and in the append-only step ledger exactly once."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    env = dict(launch.env(LOG_DIR=str(logs), SPECFORGE_MCORE_FAULT="stall:3:600"), SLURM_CONF=slurm["SLURM_CONF"])
    submit = subprocess.run(["sbatch", "--parsable", "--requeue", "--open-mode=append", f"--ntasks-per-node={launch.world}",
                             f"--output={tmp_path}/%x-%j.out", "launch/slurm.sbatch", *launch.train_args(out),
                             "train.save_every=1", "--resume"],
                            cwd=launch.root, env=env, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    job_out = tmp_path / f"specforge-mcore-{job}.out"

    def describe() -> str:
        state = _job_state(job, env)
        text = job_out.read_text(errors="replace")[-3000:] if job_out.exists() else "(no job output yet)"
        ranks = "".join(p.read_text(errors="replace")[-1500:] for p in sorted(logs.rglob("*rank0.log")))
        return f"job {job}: {state.get('JobState')} restarts={state.get('Restarts')}\n{text}\n{ranks}"

    _wait_for("checkpoint step_2 of the first attempt", lambda: (out / "checkpoints/step_2/COMPLETE").exists(), 600, describe)
    requeue = subprocess.run(["scontrol", "requeue", job], env=env, capture_output=True, text=True, timeout=60)
    assert requeue.returncode == 0, requeue.stderr
    _wait_for("the requeued job to finish", lambda: _job_state(job, env).get("JobState") in ("COMPLETED", "FAILED",
              "CANCELLED", "TIMEOUT", "NODE_FAIL"), 900, describe)
    state = _job_state(job, env)
    assert state["JobState"] == "COMPLETED" and state.get("Restarts") == "1", describe()
    text = job_out.read_text(errors="replace")
    assert text.count(f"job {job}:") == 2, text[-3000:]  # the batch script ran twice, output appended
    rank0 = "".join(p.read_text(errors="replace") for p in logs.rglob("*rank0.log"))
    assert "resumed from" in rank0 and "step_2" in rank0, rank0[-3000:]
    launch.assert_same_curve(out, "sbatch --requeue")
    with open(out / "steps.ledger.jsonl") as fh:
        ledger = [json.loads(line)["step"] for line in fh]
    assert ledger == [1, 2, 3], f"steps in the ledger: {ledger} (step 3 of the first attempt never completed)"


@pytest.mark.slow
def test_srun_without_allocation(tmp_path, launch, slurm):
    """srun.sh outside any allocation: srun allocates, and the package derives the rendezvous itself."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    env = dict(launch.env(LOG_DIR=str(logs), NTASKS_PER_NODE=str(launch.world)), SLURM_CONF=slurm["SLURM_CONF"])
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    launch.run(["bash", "launch/srun.sh", *launch.train_args(out)], env, tmp_path / "srun.log")
    assert _rank_logs(logs) == ["rank0.log", "rank1.log"], list(logs.iterdir())
    launch.assert_same_curve(out, "srun")


# ---- reading a Slurm environment (no cluster needed) ---------------------------------------------


def test_slurm_node_lists_and_task_counts():
    from specforge_mcore.parallel import slurm_first_host, slurm_tasks_per_node

    assert slurm_first_host("node[01-04,07],gpu3") == "node01"
    assert slurm_first_host("gpu3,node[1-2]") == "gpu3"
    assert slurm_first_host("rack[2-3]-n[07-08]") == "rack2-n07"
    assert slurm_tasks_per_node("8(x3),4") == [8, 8, 8, 4]
    assert slurm_tasks_per_node("2") == [2]


def test_launch_env_precedence(monkeypatch):
    from specforge_mcore.parallel import read_launch_env

    for var in list(os.environ):
        if var.startswith(("SLURM_", "OMPI_", "PMI", "MASTER_")) or var in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                             "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
            monkeypatch.delenv(var)
    # The batch script of an allocation: no job step, so one process (not a job waiting for peers).
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert read_launch_env().launcher == "single"
    # A task of `srun` on the second of two nodes.
    monkeypatch.setenv("SLURM_PROCID", "11")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "3")
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "8(x2)")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[07-08]")
    env = read_launch_env()
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size) == ("slurm", 11, 16, 3, 8)
    assert (env.master_addr, env.master_port) == ("gpu07", 15000 + 4242 % 20000)
    # torchrun started by srun: torchrun's variables win.
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert (read_launch_env().launcher, read_launch_env().rank) == ("torchrun", 5)
