"""``specforge-mcore bench teacher``: the fused teacher against full-vocabulary logits, at one or more V.

One output-layer shard holding the whole vocabulary (TP=1: the per-rank memory question is the same at
any TP, with V/TP rows). Both paths produce what the trainer asks of the teacher: the full-vocabulary
argmax (the position mask's input). ``--vocab 32000,151936`` runs both sizes and prints how the fused peak
changes with V.
"""

from __future__ import annotations

import argparse

import torch

from specforge_mcore.bench.common import measure, report
from specforge_mcore.errors import UserError
from specforge_mcore.kernels.teacher import fused_teacher

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens T")
    parser.add_argument("--hidden", type=int, default=1024, help="target hidden Ht")
    parser.add_argument("--vocab", type=_sizes, default=[32000, 151936], help="full vocabulary V (comma list)")
    parser.add_argument("--steps", type=int, default=1, help="unused: the teacher runs once per sequence")
    parser.add_argument("--impl", choices=["auto", "chunked", "triton"], default="auto", help="the fused path")
    parser.add_argument("--chunk-tokens", type=int, default=1024)
    parser.add_argument("--chunk-vocab", type=int, default=8192)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")
    dtype = DTYPES[args.dtype or ("float32" if device.type == "cpu" else "bfloat16")]
    if min(args.tokens, args.hidden, args.chunk_tokens, args.chunk_vocab, args.iters) < 1:
        raise UserError("--tokens, --hidden, --chunk-tokens, --chunk-vocab and --iters must be positive")
    gen = torch.Generator().manual_seed(args.seed)
    hidden = torch.randn(args.tokens, args.hidden, generator=gen).to(device, dtype)
    results = {}
    for vocab in args.vocab:
        weight = (torch.randn(vocab, args.hidden, generator=gen) * args.hidden ** -0.5).to(device, dtype)

        def run(impl):
            return lambda: fused_teacher(hidden, weight, 0, impl=impl, chunk_tokens=args.chunk_tokens,
                                         chunk_vocab=args.chunk_vocab)

        rows = [measure("fused", run(args.impl), device, args.warmup, args.iters),
                measure("reference", run("reference"), device, args.warmup, args.iters)]
        title = (f"teacher (argmax over V): T={args.tokens} Ht={args.hidden} V={vocab} "
                 f"{str(dtype).replace('torch.', '')} impl={args.impl}")
        results[vocab] = (rows, report(title, rows, fast="fused", reference="reference", device=device))
    if len(results) > 1:
        small, large = min(results), max(results)
        fused_small, fused_large = results[small][0][0], results[large][0][0]
        ref_small, ref_large = results[small][0][1], results[large][0][1]
        fused_growth = fused_large.peak_bytes / max(fused_small.peak_bytes, 1)
        reference_growth = ref_large.peak_bytes / max(ref_small.peak_bytes, 1)
        print(f"peak memory V={large} vs V={small}: fused {fused_growth:.4f}x, reference {reference_growth:.4f}x")
        mem_ratio, time_ratio = results[large][1]
        print(f"ratio memory={mem_ratio:.4f} time={time_ratio:.4f}")  # the last line: the largest V
    return 0
