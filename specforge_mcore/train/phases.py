"""Named phases of a training step, timed for the log and marked for the profiler (and NVTX on GPU).

The phases are the data flow of one step: target_forward → feature_transport → draft_forward →
draft_backward → grad_reduce → optimizer (the teacher runs inside the first and the loss: it has its
own record_function range).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch

PHASES = ("target_forward", "feature_transport", "feature_read", "teacher", "draft_forward", "draft_backward", "grad_reduce", "optimizer")


class PhaseTimer:
    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        nvtx = self.device.type == "cuda"
        if nvtx:
            torch.cuda.nvtx.range_push(name)
        start = time.perf_counter()
        with torch.profiler.record_function(name):
            yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] += time.perf_counter() - start
        if nvtx:
            torch.cuda.nvtx.range_pop()

    def take(self) -> dict[str, float]:
        out = dict(self.seconds)
        self.seconds.clear()
        return out
