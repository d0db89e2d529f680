"""``train --profile --profile-steps A:B``: a PyTorch profiler trace of optimizer steps A..B on every rank,
and where their time went.

Steps are numbered as in ``metrics.jsonl`` (the first step is 1) and both ends are included. Under
``OUT/profile/`` the run writes:

* ``trace_rank{r}.json``: the Chrome trace of rank r (chrome://tracing or ui.perfetto.dev); the phases
  are ``record_function`` ranges in it, and NVTX ranges on GPU (for Nsight Systems, whose capture range
  ``cudaProfilerApi`` is opened for the same steps);
* ``phases.txt`` / ``phases.json``: milliseconds per step of each phase on each rank (the table printed
  at the end of the window);
* ``phases.png``: the same as stacked bars, one per rank.

The phase times are the trainer's own timers (``PhaseTimer``: wall time, synchronised on CUDA). The
teacher runs inside the target's forward, so its time comes from the trace's ``teacher`` ranges and is
taken out of ``target_forward``; the teacher logits the fused loss recomputes per chunk stay inside the
draft phases. ``other`` is the rest of the step (batch assembly, metric reductions).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.distributed as dist

from specforge_mcore import collectives
from specforge_mcore.errors import UserError
from specforge_mcore.train.phases import PHASES as TIMED_PHASES

PHASES = TIMED_PHASES + ("other",)


def parse_profile_steps(text: str, total_steps: int, where: str = "train.profile_steps") -> tuple[int, int]:
    """``"A:B"`` -> (A, B), 1-based and inclusive, checked against the run's number of steps."""
    try:
        first, last = (int(part) for part in text.split(":"))
    except ValueError:
        raise UserError(f"{where}={text!r}: expected A:B, the first and last optimizer step to trace "
                        f"(e.g. 2:4)") from None
    if not 1 <= first <= last:
        raise UserError(f"{where}={text!r}: expected 1 <= A <= B (steps count from 1)")
    if last > total_steps:
        raise UserError(f"{where}={text!r}: the run has only {total_steps} steps; choose B <= {total_steps}")
    return first, last


class StepProfiler:
    """Drives ``torch.profiler`` over a window of steps; inert when profiling is off.

    The trainer calls ``begin(step)`` before each step (``step`` = steps already done), ``end(step,
    phases, seconds)`` after it (``step`` = its number) and ``close()`` after the loop.
    """

    def __init__(self, enabled: bool, steps: str, total_steps: int, done_steps: int, out_dir: str,
                 device: torch.device, verbose: bool = True):
        self.enabled = enabled
        self.window: Optional[tuple[int, int]] = None
        self.profiler = None
        self.phases: dict[str, float] = {}
        self.steps_seen = 0
        if not enabled:
            return
        first, last = parse_profile_steps(steps, total_steps)
        if last <= done_steps:
            print(f"profile: steps {first}:{last} were done before this resumed run (at step {done_steps}); "
                  "nothing to trace", flush=True)
            return
        self.window = (max(first, done_steps + 1), last)
        self.out_dir = os.path.join(out_dir, "profile")
        self.device = device
        self.verbose = verbose
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1

    @classmethod
    def for_trainer(cls, trainer) -> "StepProfiler":
        cfg = trainer.cfg.train
        return cls(cfg.profile, cfg.profile_steps, trainer.total_steps, trainer.step, trainer.out_dir,
                   trainer.device, verbose=trainer.is_main and not trainer.quiet)

    def begin(self, done_steps: int) -> None:
        if self.window is None or done_steps + 1 != self.window[0]:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.profiler = profile(activities=activities, record_shapes=False, with_stack=False)
        self.profiler.__enter__()
        if self.device.type == "cuda":
            torch.cuda.profiler.start()  # Nsight Systems: --capture-range=cudaProfilerApi

    def end(self, step: int, phases: dict[str, float], seconds: float) -> None:
        if self.profiler is None:
            return
        for name, value in phases.items():
            self.phases[name] = self.phases.get(name, 0.0) + value
        self.phases["step"] = self.phases.get("step", 0.0) + seconds
        self.steps_seen += 1
        if step >= self.window[1]:
            self._finish()

    def close(self) -> None:
        """After the loop: a window cut short (exit_after_step) still gets its trace and table."""
        if self.profiler is not None:
            self._finish()

    # ---- output ---------------------------------------------------------------------------------
    def _finish(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.profiler.stop()
        self.profiler.__exit__(None, None, None)
        os.makedirs(self.out_dir, exist_ok=True)
        trace = os.path.join(self.out_dir, f"trace_rank{self.rank}.json")
        self.profiler.export_chrome_trace(trace)
        teacher_s = sum(e.time_range.elapsed_us() for e in self.profiler.events()
                        if e.name == "teacher" and e.device_type.name == "CPU") / 1e6
        self.profiler = None
        ms = self._ms_per_step(teacher_s)
        everyone = collectives.all_gather_object(ms)
        if self.rank != 0:
            return
        first, last = self.window
        table = format_phase_table(everyone, f"profile: steps {first}:{last}, ms per step "
                                            f"({self.steps_seen} step(s) traced; device {self.device})")
        with open(os.path.join(self.out_dir, "phases.txt"), "w") as fh:
            fh.write(table + "\n")
        with open(os.path.join(self.out_dir, "phases.json"), "w") as fh:
            json.dump({"steps": [first, last], "ms_per_step": everyone}, fh, indent=1)
        plot_phases(everyone, os.path.join(self.out_dir, "phases.png"), f"steps {first}:{last}")
        if self.verbose:
            print(table, flush=True)
            print(f"profile: traces and phases.png in {self.out_dir}", flush=True)

    def _ms_per_step(self, teacher_s: float) -> dict[str, float]:
        n = max(1, self.steps_seen)
        seconds = {name: self.phases.get(name, 0.0) for name in PHASES if name not in ("teacher", "other")}
        # The teacher's ranges lie inside target_forward: move them to their own row.
        seconds["target_forward"] = max(0.0, seconds["target_forward"] - teacher_s)
        seconds["teacher"] = teacher_s
        step = self.phases.get("step", 0.0)
        seconds["other"] = max(0.0, step - sum(seconds.values()))
        out = {name: 1e3 * seconds[name] / n for name in PHASES}
        out["step"] = 1e3 * step / n
        return out


def format_phase_table(per_rank: list[dict[str, float]], title: str) -> str:
    """Phases down, ranks across (min/mean/max beyond 8 ranks), with each phase's share of the mean step."""
    many = len(per_rank) > 8
    columns = ["min", "mean", "max"] if many else [f"rank {r}" for r in range(len(per_rank))]
    width = max(10, max(len(c) for c in columns) + 2)
    lines = [title, f"{'phase':<20}" + "".join(f"{c:>{width}}" for c in columns) + f"{'share':>9}"]
    mean_step = sum(r["step"] for r in per_rank) / len(per_rank)
    for name in PHASES + ("step",):
        values = [r[name] for r in per_rank]
        cells = [min(values), sum(values) / len(values), max(values)] if many else values
        share = sum(values) / len(values) / mean_step if mean_step > 0 else 0.0
        lines.append(f"{name:<20}" + "".join(f"{v:>{width}.2f}" for v in cells) + f"{share:>9.1%}")
    return "\n".join(lines)


def plot_phases(per_rank: list[dict[str, float]], png_path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = list(range(len(per_rank)))
    fig, ax = plt.subplots(figsize=(11, 2.2 + 0.45 * len(ranks)))
    left = [0.0] * len(ranks)
    colors = plt.get_cmap("tab10").colors
    for i, name in enumerate(PHASES):
        widths = [r[name] for r in per_rank]
        ax.barh(ranks, widths, left=left, color=colors[i % len(colors)], label=name)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(ranks, [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("ms per step")
    ax.set_title(f"phases per rank, {title}")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
