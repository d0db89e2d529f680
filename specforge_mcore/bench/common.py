"""Shared measuring for the benchmarks: wall time and peak memory of a callable, and the report.

Peak memory is the torch allocator's: on CUDA ``torch.cuda.max_memory_allocated`` above the level
before the call; on CPU the running sum of the allocation events the PyTorch profiler records for the
CPU allocator (``profile_memory=True``), so only tensors count, not the interpreter or libraries.
Time is measured in separate runs without the profiler.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes the torch allocator holds during ``fn()`` above what it held before."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        ((ev.start_ns(), ev.nbytes()) for ev in prof.profiler.kineto_results.events()
         if ev.name() == "[memory]" and ev.device_type().name == "CPU"),
        key=lambda item: item[0],
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def time_seconds(fn: Callable[[], object], device: torch.device, warmup: int = 1, iters: int = 3) -> float:
    """Median wall time of ``fn()`` over ``iters`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@dataclass
class Measurement:
    name: str
    seconds: float
    peak_bytes: int


def measure(name: str, fn: Callable[[], object], device: torch.device, warmup: int = 1, iters: int = 3) -> Measurement:
    peak = peak_memory_bytes(fn, device)
    return Measurement(name, time_seconds(fn, device, warmup, iters), peak)


def memory_method(device: torch.device) -> str:
    return "torch.cuda.max_memory_allocated" if device.type == "cuda" else "CPU allocator events (torch.profiler)"


def report(title: str, rows: list[Measurement], fast: str, reference: str, device: torch.device) -> tuple[float, float]:
    """Print a table of the rows and, last, ``ratio memory=<fast/ref> time=<fast/ref>``."""
    by_name = {row.name: row for row in rows}
    print(f"{title}  [device={device}, peak memory: {memory_method(device)}]")
    print(f"{'path':<28}{'time ms':>12}{'peak MiB':>14}")
    for row in rows:
        print(f"{row.name:<28}{row.seconds * 1e3:>12.2f}{row.peak_bytes / 2**20:>14.1f}")
    mem_ratio = by_name[fast].peak_bytes / max(by_name[reference].peak_bytes, 1)
    time_ratio = by_name[fast].seconds / max(by_name[reference].seconds, 1e-12)
    print(f"ratio memory={mem_ratio:.4f} time={time_ratio:.4f}")
    return mem_ratio, time_ratio
