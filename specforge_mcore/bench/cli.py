"""``specforge-mcore bench <what>``: each kernel benchmark times and measures a fast path against its
reference in the same run and ends with ``ratio memory=<fast/ref> time=<fast/ref>``; ``recipe`` compares
training variants by their held-out acceptance estimates."""

from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "loss": ("specforge_mcore.bench.loss", "fused draft head + TTT loss vs materialised logits"),
    "projection": ("specforge_mcore.bench.projection", "fused hidden-state projection vs cat + fc + norm"),
    "teacher": ("specforge_mcore.bench.teacher", "fused vocab-parallel teacher vs full-vocab logits"),
    "attention": ("specforge_mcore.bench.attention", "csrc TTT attention vs masked reference"),
    "train": ("specforge_mcore.bench.train", "end-to-end draft training throughput, phase split, peak memory"),
    "recipe": ("specforge_mcore.bench.recipe", "train variants of a config, compare held-out acceptance estimates"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bench", choices=sorted(BENCHES), metavar="<what>",
                        help="; ".join(f"{k}: {v[1]}" for k, v in BENCHES.items()))
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="options of that benchmark (--help)")


def main(args: argparse.Namespace) -> int:
    module_name, description = BENCHES[args.bench]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"specforge-mcore bench {args.bench}", description=description)
    module.add_arguments(parser)
    return int(module.main(parser.parse_args(args.bench_args)) or 0)
