"""Reliability under real faults (docs/design.md §8): each test injects the fault into a real run.

Faults are injected with ``SPECFORGE_MCORE_FAULT`` (specforge_mcore/train/faults.py): a SIGKILL of one
rank after a step, a SIGKILL in the middle of a checkpoint write, ENOSPC during a write, a NaN loss.
"""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from specforge_mcore.config import config_to_dict, load_config
from specforge_mcore.parallel import free_port, spawn
from specforge_mcore.train.checkpoint import latest_checkpoint, list_checkpoints
from specforge_mcore.train.run import train_worker

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = [sys.executable, "-m", "specforge_mcore.cli"]
COMMON = ["train.eval_every=0", "train.plot=false", "train.keep_checkpoints=10"]


def cli(args, env_extra=None, timeout=900):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.run(CLI + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def torchrun(nproc, args, env_extra=None, max_restarts=0, timeout=900):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "specforge_mcore.cli"] + args
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def reference_run(world, out_dir, *overrides):
    cfg = load_config("configs/tiny.yaml", [f"train.out_dir={out_dir}", *COMMON, *overrides])
    return spawn(train_worker, world, config_to_dict(cfg), str(out_dir))[0]


def final_weights(out_dir):
    return load_file(os.path.join(latest_checkpoint(str(out_dir)), "draft.safetensors"))


def ledger_lineage(out_dir):
    """(step, rows) of the steps the final weights descend from, read from the append-only step ledger
    (the last line of each step wins), and the steps that some attempt ran more than once."""
    with open(os.path.join(out_dir, "steps.ledger.jsonl")) as fh:
        lines = [json.loads(line) for line in fh]
    last = {}
    for line in lines:
        last[line["step"]] = line["rows"]
    counts = {}
    for line in lines:
        counts[line["step"]] = counts.get(line["step"], 0) + 1
    return sorted(last.items()), sorted(step for step, n in counts.items() if n > 1)


def logged_rows(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return [(r["step"], r["rows"]) for r in map(json.loads, fh) if "rows" in r]


def assert_one_clean_error(proc, pattern):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and pattern in errors[0], proc.stderr[-3000:]


@pytest.mark.slow
def test_killed_rank_restarts_from_checkpoint_and_matches_uninterrupted(tmp_path):
    args = ["target.ep=2", "train.max_steps=6", "train.save_every=2"]
    reference = reference_run(2, tmp_path / "reference", *args)
    out = tmp_path / "killed"
    proc = torchrun(2, ["train", "--config", "configs/tiny.yaml", "--out", str(out), *COMMON, *args],
                    env_extra={"SPECFORGE_MCORE_FAULT": "kill:3:1"}, max_restarts=1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stdout + proc.stderr  # the restarted job found its checkpoint by itself
    for key, value in reference["weights"].items():
        assert torch.equal(final_weights(out)[key], value), f"{key} differs from the uninterrupted run"
    # every step's data exactly once, and the same data as the uninterrupted run
    assert logged_rows(out) == logged_rows(tmp_path / "reference")
    assert [s for s, _ in logged_rows(out)] == [1, 2, 3, 4, 5, 6]
    # The ledger (never rewritten by a resume) shows step 3 ran twice: in the killed attempt (after it, the
    # rank died) and again after the restart from step_2; the final weights descend from steps 1..6 once.
    lineage, repeated = ledger_lineage(out)
    assert lineage == logged_rows(tmp_path / "reference") and repeated == [3]


@pytest.mark.slow
def test_killed_while_writing_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--config", "configs/tiny.yaml", "--out", str(out), *COMMON, "train.max_steps=5", "train.save_every=2"]
    proc = cli(args, {"SPECFORGE_MCORE_FAULT": "kill_in_save:4"})
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL
    assert [step for step, _ in list_checkpoints(str(out))] == [2]  # the partial step_4 is not a checkpoint
    assert os.path.isdir(out / "checkpoints" / ".tmp-step_4")
    resumed = cli(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_2 at step 2" in resumed.stdout
    reference = reference_run(1, tmp_path / "reference", "train.max_steps=5", "train.save_every=2")
    for key, value in reference["weights"].items():
        assert torch.equal(final_weights(out)[key], value)


def test_unwritable_output_directory_fails_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = cli(["train", "--config", "configs/tiny.yaml", "--out", str(blocker / "run")], timeout=300)
    assert_one_clean_error(proc, f"output directory {blocker / 'run'} is not writable")


@pytest.mark.slow
def test_disk_full_while_saving_stops_and_names_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = cli(["train", "--config", "configs/tiny.yaml", "--out", str(out), *COMMON, "train.max_steps=4",
                "train.save_every=1"], {"SPECFORGE_MCORE_FAULT": "enospc_in_save:2"})
    assert_one_clean_error(proc, "No space left on device")
    assert f"Last good checkpoint: {out / 'checkpoints' / 'step_1'}" in proc.stderr
    assert [step for step, _ in list_checkpoints(str(out))] == [1]


@pytest.mark.slow
def test_resume_at_another_world_size(tmp_path):
    """Saved by 2 ranks, resumed by 1: the replicated draft and AdamW state need no resharding."""
    args = ["train.max_steps=4", "train.save_every=2", "train.global_batch_size=2"]
    straight = reference_run(2, tmp_path / "straight", "target.ep=2", *args)
    reference_run(2, tmp_path / "moved", "target.ep=2", "train.exit_after_step=2", *args)
    resumed = reference_run(1, tmp_path / "moved", "train.resume=true", *args)
    assert [r["step"] for r in resumed["history"] if "loss" in r] == [3, 4]
    for key, value in straight["weights"].items():
        torch.testing.assert_close(resumed["weights"][key], value, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_nonfinite_step_is_skipped_and_repeated_ones_abort(tmp_path):
    out = tmp_path / "one"
    proc = cli(["train", "--config", "configs/tiny.yaml", "--out", str(out), *COMMON, "train.max_steps=3"],
               {"SPECFORGE_MCORE_FAULT": "nan:2:0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2: non-finite loss or gradient on rank(s) [0]" in proc.stderr
    records = [json.loads(line) for line in open(out / "metrics.jsonl") if '"skipped"' in line]
    assert [r["skipped"] for r in records] == [False, True, False]
    proc = cli(["train", "--config", "configs/tiny.yaml", "--out", str(tmp_path / "all"), *COMMON,
                "train.max_steps=6", "train.max_nonfinite_steps=3"], {"SPECFORGE_MCORE_FAULT": "nan:*:0"})
    assert_one_clean_error(proc, "3 consecutive steps had a non-finite loss or gradient")


def test_config_errors_are_one_clear_line(tmp_path):
    proc = cli(["train", "--config", "configs/tiny.yaml", "--out", str(tmp_path), "optim.learning_rate=1"], timeout=300)
    assert_one_clean_error(proc, "unknown key optim.learning_rate")
    proc = cli(["train", "--config", "configs/tiny.yaml", "--out", str(tmp_path), "train.max_steps=ten"], timeout=300)
    assert_one_clean_error(proc, "train.max_steps: expected an integer, got 'ten'")


@pytest.mark.slow
def test_tokenizer_that_does_not_fit_the_target(tmp_path):
    proc = cli(["train", "--config", "configs/tiny.yaml", "--out", str(tmp_path), "target.random.hf_config.vocab_size=512"])
    assert_one_clean_error(proc, "512")


@pytest.mark.slow
def test_draft_checkpoint_for_another_target(tmp_path):
    first = reference_run(1, tmp_path / "small", "train.max_steps=1", "train.save_every=1")
    assert first["history"]
    ckpt = latest_checkpoint(str(tmp_path / "small"))
    proc = cli(["train", "--config", "configs/tiny.yaml", "--out", str(tmp_path / "other"),
                "target.random.hf_config.hidden_size=96", f"draft.init_from={ckpt}"])
    assert_one_clean_error(proc, "target hidden states of size 64, this target's hidden_size is 96")


class _RunsCode:
    """Unpickling this would call os.system: what a booby-trapped checkpoint looks like."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /tmp/specforge_mcore_pwned",))


def test_checkpoint_files_are_never_unpickled_as_code(tmp_path):
    from specforge_mcore.errors import UserError
    from specforge_mcore.train.checkpoint import load_plain

    plain = tmp_path / "optimizer.pt"
    torch.save({"optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"betas": (0.9, 0.95)}]},
                "rng": random.getstate()}, plain)
    assert load_plain(str(plain))["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    trap = tmp_path / "trap.pt"
    torch.save({"optimizer": _RunsCode()}, trap)
    with pytest.raises(UserError, match="refusing to load"):
        load_plain(str(trap))
    assert not os.path.exists("/tmp/specforge_mcore_pwned")


def test_sigterm_checkpoints_and_exits_cleanly_then_resume_finishes(tmp_path):
    """What Slurm sends before a time limit (and preemption): the step in flight ends, a checkpoint is
    written, the process exits 0, and --resume finishes the run."""
    import signal
    import time

    out = tmp_path / "run"
    args = [sys.executable, "-m", "specforge_mcore.cli", "train", "--config", "configs/tiny.yaml", "--out", str(out),
            "train.max_steps=40", "train.eval_every=0", "train.save_every=0", "train.plot=false",
            "data.max_length=64", "draft.ttt_steps=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"the run ended before the signal:\n{proc.stdout.read()[-3000:]}"
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "received SIGTERM: stopped after step" in output
    step, path = list_checkpoints(str(out))[-1]
    assert 2 <= step < 40 and path.endswith(f"step_{step}")
    assert len(metrics.read_text().splitlines()) == step
    resumed = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert list_checkpoints(str(out))[-1][0] == 40
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "loss" in json.loads(line)]
    assert logged == list(range(1, 41)), "every step logged exactly once across the stop and the resume"


@pytest.fixture
def small_filesystem(tmp_path):
    """A real size-limited filesystem (tmpfs; root can mount one here and in CI): writes past its size fail
    with a genuine ENOSPC from the kernel, not from a fault hook."""
    mounted = []

    def mount(size_bytes: int):
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): needs root")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _tree_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


@pytest.mark.slow
def test_real_disk_full_while_saving_then_resume_elsewhere_is_bitwise(tmp_path, small_filesystem):
    import shutil

    args = [*COMMON, "train.max_steps=4", "train.save_every=1", "data.max_length=64", "draft.ttt_steps=2"]
    straight = tmp_path / "straight"
    proc = cli(["train", "--config", "configs/tiny.yaml", "--out", str(straight), *args], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = _tree_bytes(os.path.join(straight, "checkpoints", "step_1"))
    # Room for the run's own files and one checkpoint and a half: the second save hits the real ENOSPC.
    fs = small_filesystem(int(1.5 * checkpoint) + _tree_bytes(straight) - 4 * checkpoint + 256 * 1024)
    out = fs / "run"
    proc = cli(["train", "--config", "configs/tiny.yaml", "--out", str(out), *args], timeout=600)
    assert_one_clean_error(proc, "No space left on device")
    assert f"Last good checkpoint: {out / 'checkpoints' / 'step_1'}" in proc.stderr
    assert [step for step, _ in list_checkpoints(str(out))] == [1], "the partial checkpoint is never taken"
    assert not [n for n in os.listdir(out / "checkpoints") if n.startswith(".tmp-")], "the partial one is removed"
    # The last good checkpoint is whole: moved to a disk with room, --resume ends bitwise equal.
    moved = tmp_path / "moved"
    shutil.copytree(out, moved, ignore=shutil.ignore_patterns(".tmp-*"))
    proc = cli(["train", "--config", "configs/tiny.yaml", "--out", str(moved), *args, "--resume"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = final_weights(straight), final_weights(moved)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), f"{key} differs after a real ENOSPC and resume"


@pytest.mark.slow
def test_real_disk_full_during_export_keeps_the_previous_export(tmp_path, small_filesystem):
    out = tmp_path / "run"
    proc = cli(["train", "--config", "configs/tiny.yaml", "--out", str(out), *COMMON, "train.max_steps=1",
                "data.max_length=64", "draft.ttt_steps=1"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = tmp_path / "export-probe"
    proc = cli(["export", "--checkpoint", str(out), "--out", str(first)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    size = _tree_bytes(first)
    fs = small_filesystem(int(1.5 * size))  # room for one export, not for a second beside it
    target = fs / "export"
    proc = cli(["export", "--checkpoint", str(out), "--out", str(target)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = {name: (target / name).read_bytes() for name in os.listdir(target)}
    proc = cli(["export", "--checkpoint", str(out), "--out", str(target), "--overwrite"], timeout=300)
    assert_one_clean_error(proc, "No space left on device")
    assert {name: (target / name).read_bytes() for name in os.listdir(target)} == before, "previous export changed"
    assert sorted(os.listdir(fs)) == ["export"], "the partial export is removed"


@pytest.mark.slow
def test_truncated_or_corrupted_checkpoint_file_under_complete_is_named(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--config", "configs/tiny.yaml", "--out", str(out), *COMMON, "train.max_steps=2",
            "train.save_every=2", "data.max_length=64", "draft.ttt_steps=1"]
    proc = cli(args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    step_2 = out / "checkpoints" / "step_2"
    assert (step_2 / "COMPLETE").exists() and (step_2 / "MANIFEST.json").exists()
    weights = step_2 / "draft.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[: len(original) // 2])  # a copy cut short
    proc = cli(args + ["train.max_steps=3", "--resume"], timeout=600)
    assert_one_clean_error(proc, f"draft.safetensors has {len(original) // 2} bytes, MANIFEST.json says {len(original)}")
    proc = cli(["export", "--checkpoint", str(out), "--out", str(tmp_path / "export")], timeout=300)
    assert_one_clean_error(proc, "truncated or replaced")
    flipped = bytearray(original)
    flipped[-1] ^= 0x01  # one bit in the last tensor's data: same size
    weights.write_bytes(bytes(flipped))
    proc = cli(args + ["train.max_steps=3", "--resume"], timeout=600)
    assert_one_clean_error(proc, "draft.safetensors does not match its SHA-256")
    weights.write_bytes(original)
    proc = cli(args + ["train.max_steps=3", "--resume"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_resume_across_layouts_and_a_growing_world(tmp_path):
    """1 rank -> TP2+SP on 2 ranks -> PP2xEP2 on 4 ranks: the same run continues (the draft and AdamW state
    are replicated, the data position is global), ending where an uninterrupted single process ends."""
    args = ["train.max_steps=6", "train.save_every=2", "train.global_batch_size=4", "data.max_length=64",
            "draft.ttt_steps=2"]
    straight = reference_run(1, tmp_path / "straight", *args)
    moved = tmp_path / "moved"
    reference_run(1, moved, "train.exit_after_step=2", *args)
    second = reference_run(2, moved, "train.resume=true", "train.exit_after_step=4", "target.tp=2", "target.sp=true",
                           *args)
    third = reference_run(4, moved, "train.resume=true", "target.pp=2", "target.ep=2", *args)
    assert [r["step"] for r in second["history"] if "loss" in r] == [3, 4]
    assert [r["step"] for r in third["history"] if "loss" in r] == [5, 6]
    assert [step for step, _ in logged_rows(moved)] == [1, 2, 3, 4, 5, 6]
    assert logged_rows(moved) == logged_rows(tmp_path / "straight"), "every step saw the same rows"
    for key, value in straight["weights"].items():
        torch.testing.assert_close(third["weights"][key], value, rtol=1e-4, atol=1e-6)


def test_resume_with_another_global_batch_or_target_is_refused(tmp_path):
    """Also the README's command line: overrides after --resume."""
    out = tmp_path / "run"
    reference_run(1, out, "train.max_steps=1", "train.save_every=1", "data.max_length=64", "draft.ttt_steps=1")
    base = ["train", "--config", "configs/tiny.yaml", "--out", str(out), "data.max_length=64", "draft.ttt_steps=1",
            "train.max_steps=2", "--resume"]
    proc = cli(base + ["train.global_batch_size=4"], timeout=300)
    assert_one_clean_error(proc, "was trained with global_batch_size=2; resuming with 4 would change the data order")
    proc = cli(base + ["target.random.hf_config.num_hidden_layers=10"], timeout=300)
    assert_one_clean_error(proc, "was trained against a target with num_hidden_layers=8, but this target has "
                                 "num_hidden_layers=10")



FOUR_RANKS = ["target.ep=2", "target.pp=2", "train.max_steps=4", "train.save_every=2", "train.global_batch_size=4",
              "data.max_length=64", "draft.ttt_steps=2"]


@pytest.fixture(scope="module")
def four_rank_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference4")
    return reference_run(4, out, *FOUR_RANKS)["weights"], logged_rows(out)


@pytest.mark.slow
@pytest.mark.parametrize("phase,rank", [("target_forward", 3), ("feature_transport", 2), ("draft_backward", 1),
                                        ("grad_reduce", 0), ("save", 0)])
def test_rank_killed_mid_phase_of_a_four_rank_run_restarts_and_matches(tmp_path, four_rank_reference, phase, rank):
    """EP2 x PP2 on 4 ranks under torchrun --max-restarts 1: one rank is SIGKILLed as it enters a phase of
    step 3 while its peers wait in that phase's collectives (or, "save", rank 0 in the middle of writing the
    final checkpoint step_4 while the others wait to finalise it); the job restarts by itself from step_2
    and ends with weights bitwise equal to an uninterrupted run, every step's rows seen once."""
    weights, rows = four_rank_reference
    out = tmp_path / "killed"
    fault = "kill_in_save:4" if phase == "save" else f"kill_in:{phase}:3:{rank}"
    proc = torchrun(4, ["train", "--config", "configs/tiny.yaml", "--out", str(out), *COMMON, *FOUR_RANKS],
                    env_extra={"SPECFORGE_MCORE_FAULT": fault}, max_restarts=1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stdout + proc.stderr
    assert f"exitcode: -9) local_rank: {rank}" in proc.stderr, "the fault did not fire"
    final = final_weights(out)
    for key, value in weights.items():
        assert torch.equal(final[key], value), f"{key} differs from the uninterrupted run after a kill in {phase}"
    assert logged_rows(out) == rows and [s for s, _ in rows] == [1, 2, 3, 4]
    lineage, repeated = ledger_lineage(out)
    # Killed in phase: step 3 never completed, each step ran once. Killed saving step_4: steps 3 and 4 had
    # completed, but their checkpoint never did, so the restart ran them again from step_2 (same rows).
    assert lineage == rows and repeated == ([3, 4] if phase == "save" else []), (lineage, repeated)
