"""launch/mpirun.sh: a real Open MPI job (ranks from mpi4py, gloo for the tensors) reproduces the plain
run's loss curve."""

import pytest


@pytest.mark.slow
def test_mpirun_two_ranks(tmp_path, launch):
    launch.require("mpirun", modules=("mpi4py",))
    out, logs = tmp_path / "run", tmp_path / "logs"
    # Open MPI refuses root unless told (CI runs as root); --oversubscribe: 2 ranks even on 1 core.
    env = launch.env(LOG_DIR=str(logs), OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    text = launch.run(["bash", "launch/mpirun.sh", "-np", str(launch.world), "--oversubscribe", "--",
                       *launch.train_args(out)], env, tmp_path / "mpirun.log")
    assert "launcher: mpi" in text, text[-2000:]
    launch.assert_same_curve(out, "mpirun")
    per_rank = sorted(p.parent.name for p in logs.rglob("stdout"))
    assert per_rank == ["rank.0", "rank.1"], f"expected one log per rank under {logs}, found {per_rank}"
