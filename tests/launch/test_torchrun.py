"""launch/torchrun.sh: real torchrun jobs (one node; two "nodes" at an explicit rendezvous) reproduce the
plain run's loss curve."""

import subprocess

import pytest

from specforge_mcore.parallel import free_port


@pytest.mark.slow
def test_torchrun_one_node(tmp_path, launch):
    out, logs = tmp_path / "run", tmp_path / "logs"
    text = launch.run(["bash", "launch/torchrun.sh", "--nproc-per-node", str(launch.world), *launch.train_args(out)],
                      launch.env(LOG_DIR=str(logs)), tmp_path / "torchrun.log")
    assert "launcher: torchrun" in text and "EP groups: [0,1]" in text, text[-2000:]
    launch.assert_same_curve(out, "torchrun")
    rank_logs = sorted(p.parent.name for p in logs.rglob("stdout.log"))
    assert rank_logs == ["0", "1"], f"expected one log per rank under {logs}, found {rank_logs}"


@pytest.mark.slow
def test_torchrun_two_nodes_meet_at_rendezvous_endpoint(tmp_path, launch):
    """Each 'node' is its own torchrun with one process; they meet at --rdzv-endpoint, as on a cluster."""
    out = tmp_path / "run"
    cmd = ["bash", "launch/torchrun.sh", "--nproc-per-node", "1", "--nnodes", str(launch.world),
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "test-two-nodes", *launch.train_args(out)]
    logs = [tmp_path / f"node{i}.log" for i in range(launch.world)]
    handles = [open(path, "w") for path in logs]
    nodes = [subprocess.Popen(cmd, cwd=launch.root, env=launch.env(), stdout=fh, stderr=subprocess.STDOUT)
             for fh in handles]
    try:
        codes = [node.wait(timeout=900) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
        for fh in handles:
            fh.close()
    assert codes == [0] * launch.world, "\n\n".join(p.read_text(errors="replace")[-3000:] for p in logs)
    launch.assert_same_curve(out, "torchrun --nnodes 2")
