"""Signals during training: SIGTERM/SIGUSR1 (Slurm before a time limit, preemption) ask the run to save
and leave at the next step boundary."""

from __future__ import annotations

import os
import signal
import threading
from typing import Optional

import torch

from specforge_mcore import collectives


class TerminationRequest:
    """SIGTERM/SIGUSR1 caught during training: the step in flight finishes, every rank agrees at the step
    boundary (one all-reduce; a signal may reach the ranks at different steps), the run checkpoints and
    returns cleanly. A second signal ends the process at once (a launcher tearing down a failed job sends
    SIGTERM to ranks that may be stuck in a collective). Handlers are installed only in the main thread and
    restored afterwards."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # a second signal (an impatient launcher): die now, as without us
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signum = signum

    def agreed(self) -> bool:
        flag = collectives.all_reduce(torch.tensor([0 if self.signum is None else self.signum]), op="max")
        if int(flag) and self.signum is None:
            self.signum = int(flag)
        return bool(int(flag))

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}
