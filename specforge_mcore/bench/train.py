"""``specforge-mcore bench train --config configs/X.yaml``: end-to-end draft-training throughput.

Runs the config for ``--steps`` optimizer steps in ``--nproc`` local processes (``spawn``, gloo on CPU)
twice: as configured (the fast paths: ``auto`` kernels and attention) and with every kernel and the
draft attention on its plain-PyTorch reference. For each it prints, per rank, tokens/s, the phase split
and the peak memory; the last line is ``ratio memory=<fast/ref> time=<fast/ref>`` (peak memory of the
worst rank, seconds per step).

The first step is a warm-up and is not timed. Peak memory is the allocator's: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the bytes of every live tensor at the start of the last step
(found through the garbage collector, storages counted once) plus the highest running sum of the CPU
allocator's events during that step (``torch.profiler`` with ``profile_memory``), i.e. what a GPU's peak
would count. The process's resident set (``ru_maxrss``: interpreter, libraries, data) is printed beside it.
"""

from __future__ import annotations

import argparse
import gc
import resource
import tempfile
import time
import warnings

import torch

from specforge_mcore import collectives
from specforge_mcore.config import config_to_dict, load_config
from specforge_mcore.errors import UserError

REFERENCE_OVERRIDES = ["kernels.projection=reference", "kernels.loss=reference", "kernels.teacher=reference",
                       "draft.attention_backend=reference"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config (YAML), e.g. configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is a warm-up)")
    parser.add_argument("--nproc", type=int, default=1, help="local processes (the world size)")
    parser.add_argument("--paths", default="fast,reference", help="comma list of fast, reference")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. target.ep=2 data.max_length=512")


def live_tensor_bytes() -> int:
    """Bytes of the storages of every tensor the garbage collector can see (each storage once)."""
    seen: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance on some lazily imported objects warns
        warnings.simplefilter("ignore")
        objects = gc.get_objects()
        tensors = [obj for obj in objects if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        try:
            if obj.is_meta:
                continue
            storage = obj.untyped_storage()
        except (RuntimeError, ReferenceError):  # tensors without storage (sparse, functional wrappers)
            continue
        if storage.device.type == "cpu" and storage.data_ptr():
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _cpu_peak_during(fn) -> int:
    """Highest running sum of CPU allocator events while ``fn()`` runs (bytes above the level before)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((ev.start_ns(), ev.nbytes()) for ev in prof.profiler.kineto_results.events()
                    if ev.name() == "[memory]" and ev.device_type().name == "CPU")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def measure_worker(rank: int, world: int, cfg_tree: dict, out_dir: str, steps: int) -> dict:
    """One rank: ``steps`` optimizer steps; time all but the first, measure memory over the last."""
    from specforge_mcore.config import config_from_dict
    from specforge_mcore.train.phases import PHASES, PhaseTimer
    from specforge_mcore.train.trainer import Trainer

    cfg = config_from_dict(cfg_tree)
    trainer = Trainer(cfg, out_dir, quiet=True)
    timer = PhaseTimer(trainer.device)
    seconds, tokens, phases = [], [], []
    peak = live = 0
    for step in range(steps):
        if step == steps - 1:
            gc.collect()
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                live = torch.cuda.memory_allocated()
                trainer.train_step(timer)
                peak = torch.cuda.max_memory_allocated()
            else:
                live = live_tensor_bytes()
                metrics = {}
                peak = live + _cpu_peak_during(lambda: metrics.update(trainer.train_step(timer)))
            timer.take()  # the profiled step is not timed
            continue
        start = time.perf_counter()
        metrics = trainer.train_step(timer)
        elapsed = time.perf_counter() - start
        split = timer.take()
        if step > 0:
            seconds.append(elapsed)
            tokens.append(metrics["tokens"])
            phases.append(split)
    collectives.barrier()
    timed = max(1, len(seconds))
    return {
        "rank": rank,
        "seconds_per_step": sum(seconds) / timed,
        "tokens_per_s": sum(tokens) / max(sum(seconds), 1e-12),
        "phases_ms": {name: 1e3 * sum(p.get(name, 0.0) for p in phases) / timed
                      for name in PHASES if any(name in p for p in phases)},
        "live_bytes": live,
        "peak_bytes": peak,
        "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def run_measurement(config: str, overrides: list[str], nproc: int, steps: int) -> list[dict]:
    """Measure a config in ``nproc`` local processes; one dict per rank (see ``measure_worker``)."""
    from specforge_mcore.parallel import spawn

    if steps < 3:
        raise UserError(f"--steps={steps}: need at least 3 (a warm-up, a timed step, the memory step)")
    with tempfile.TemporaryDirectory(prefix="specforge_bench_train_") as out_dir:
        cfg = load_config(config, [f"train.out_dir={out_dir}", f"train.max_steps={steps}", "train.eval_every=0",
                                   "train.save_every=0", "train.plot=false", *overrides])
        return spawn(measure_worker, nproc, config_to_dict(cfg), out_dir, steps)


def format_ranks(name: str, results: list[dict]) -> str:
    phase_names = list(results[0]["phases_ms"])
    lines = [f"{name}: per rank",
             f"{'rank':>5}{'tokens/s':>11}{'s/step':>9}{'peak MiB':>10}{'RSS MiB':>9}  "
             + "  ".join(f"{p} ms" for p in phase_names)]
    for r in results:
        lines.append(f"{r['rank']:>5}{r['tokens_per_s']:>11.1f}{r['seconds_per_step']:>9.3f}"
                     f"{r['peak_bytes'] / 2**20:>10.1f}{r['rss_bytes'] / 2**20:>9.0f}  "
                     + "  ".join(f"{r['phases_ms'][p]:>{len(p) + 3}.1f}" for p in phase_names))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from specforge_mcore.bench.common import Measurement, report

    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = sorted(set(paths) - {"fast", "reference"})
    if unknown:
        raise UserError(f"--paths: unknown {unknown}; choose from fast, reference")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for path in paths:
        extra = REFERENCE_OVERRIDES if path == "reference" else []
        results = run_measurement(args.config, list(args.overrides) + extra, args.nproc, args.steps)
        print(format_ranks(f"{path} ({args.config}, {args.nproc} process(es), {args.steps} steps)", results),
              flush=True)
        rows.append(Measurement(path, max(r["seconds_per_step"] for r in results),
                                max(r["peak_bytes"] for r in results)))
    if {"fast", "reference"} <= set(paths):
        report(f"train step, {args.config} (worst rank)", rows, "fast", "reference", device)
    return 0
