"""Fault injection for the reliability tests: real faults at exact points of a real run.

Off unless ``SPECFORGE_MCORE_FAULT`` is set; a comma-separated list of

* ``kill:STEP:RANK``     SIGKILL rank RANK right after optimizer step STEP (first attempt only),
* ``kill_in:PHASE:STEP:RANK``  SIGKILL rank RANK as it enters PHASE of optimizer step STEP (first attempt
  only): ``target_forward``, ``feature_transport``, ``draft_backward`` or ``grad_reduce``. Its peers are
  then blocked inside that phase's collectives (pipeline P2P, TP/EP exchanges, the feature scatter, the
  gradient all-reduce) when the rank dies,
* ``kill_in_save:STEP``  SIGKILL rank 0 in the middle of writing checkpoint step_STEP (first attempt only),
* ``enospc_in_save:STEP``  the checkpoint write of step_STEP fails with "No space left on device",
* ``nan:STEP:RANK``      rank RANK's loss becomes NaN at optimizer step STEP (1-based, every attempt),
* ``stall:STEP:SECONDS`` every rank stops for SECONDS at the end of optimizer step STEP, before that step's
  checkpoint (first attempt only): a hung job, for the scheduler to preempt, requeue or kill.
  ``STEP`` may be ``*`` for every step.

"First attempt" is read from torchrun's ``TORCHELASTIC_RESTART_COUNT`` and Slurm's ``SLURM_RESTART_COUNT``
(set in a requeued job): a restarted job must not be killed again at the same point.
"""

from __future__ import annotations

import errno
import os
import signal
import time


def _faults() -> list[list[str]]:
    text = os.environ.get("SPECFORGE_MCORE_FAULT", "")
    return [item.split(":") for item in text.split(",") if item.strip()]


def _first_attempt() -> bool:
    return all(int(os.environ.get(var) or "0") == 0 for var in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))


def _matches(value: str, actual: int) -> bool:
    return value == "*" or int(value) == actual


def after_step(step: int, rank: int) -> None:
    for fault in _faults():
        if fault[0] == "kill" and _first_attempt() and _matches(fault[1], step) and int(fault[2]) == rank:
            os.kill(os.getpid(), signal.SIGKILL)
        if fault[0] == "stall" and _first_attempt() and _matches(fault[1], step):
            time.sleep(float(fault[2]))


def in_phase(phase: str, step: int, rank: int) -> None:
    """Called by the trainer as each rank enters ``phase`` of optimizer step ``step`` (1-based)."""
    for fault in _faults():
        if (fault[0] == "kill_in" and fault[1] == phase and _first_attempt() and _matches(fault[2], step)
                and int(fault[3]) == rank):
            os.kill(os.getpid(), signal.SIGKILL)


def in_save(step: int, rank: int) -> None:
    """Called by rank 0 after part of checkpoint step_STEP is written, before it is complete."""
    for fault in _faults():
        if fault[0] == "kill_in_save" and _first_attempt() and _matches(fault[1], step) and rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        if fault[0] == "enospc_in_save" and _matches(fault[1], step):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def poison_loss(step: int, rank: int) -> bool:
    return any(f[0] == "nan" and _matches(f[1], step) and int(f[2]) == rank for f in _faults())
