"""The documented recovery paths, through the launch scripts themselves: a rank killed under
`launch/torchrun.sh --max-restarts 1`, and a stopped job rerun with `launch/mpirun.sh ... --resume`, each
end with the plain run's loss curve (every step once, the same supervised positions)."""

import pytest


@pytest.mark.slow
def test_torchrun_script_restarts_a_killed_rank(tmp_path, launch):
    out = tmp_path / "run"
    env = launch.env(SPECFORGE_MCORE_FAULT="kill:2:1")  # rank 1 dies right after step 2 (first attempt only)
    text = launch.run(["bash", "launch/torchrun.sh", "--nproc-per-node", str(launch.world), "--max-restarts", "1",
                       *launch.train_args(out), "train.save_every=1"], env, tmp_path / "torchrun.log")
    assert "exitcode: -9" in text and "resumed from" in text, text[-3000:]
    launch.assert_same_curve(out, "torchrun.sh --max-restarts 1 after a SIGKILL")


@pytest.mark.slow
def test_mpirun_script_resume_continues_a_stopped_job(tmp_path, launch):
    launch.require("mpirun", modules=("mpi4py",))
    out = tmp_path / "run"
    env = launch.env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    mpirun = ["bash", "launch/mpirun.sh", "-np", str(launch.world), "--oversubscribe", "--"]
    launch.run(mpirun + [*launch.train_args(out), "train.save_every=1", "train.exit_after_step=1"], env,
               tmp_path / "first.log")
    text = launch.run(mpirun + [*launch.train_args(out), "train.save_every=1", "--resume"], env, tmp_path / "second.log")
    assert "resumed from" in text and "at step 1" in text, text[-3000:]
    launch.assert_same_curve(out, "mpirun.sh, stopped after step 1 and rerun with --resume")
