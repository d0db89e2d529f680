"""``specforge-mcore bench projection``: the fused hidden-state projection against cat + fc + RMSNorm.

Forward + backward as in training: the three captured layers come from the frozen target (no input
gradient), ``fc``, ``hidden_norm`` (and with ``--per-layer-norm`` the EAGLE-3.1 norms) get gradients
through both outputs, ``g`` (the residual) and ``hidden_norm(g)`` (the attention input).
"""

from __future__ import annotations

import argparse

import torch

from specforge_mcore.bench.common import measure, report
from specforge_mcore.errors import UserError
from specforge_mcore.kernels.projection import fused_projection

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
EPS = 1e-6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens T")
    parser.add_argument("--hidden", type=int, default=4096, help="draft hidden H")
    parser.add_argument("--target-hidden", type=int, default=None, help="target hidden Ht (default: --hidden)")
    parser.add_argument("--vocab", type=int, default=None, help="unused (accepted for a uniform bench command line)")
    parser.add_argument("--steps", type=int, default=1, help="unused: the projection runs once per sequence")
    parser.add_argument("--per-layer-norm", action="store_true", help="EAGLE-3.1 RMSNorm on each captured layer")
    parser.add_argument("--impl", choices=["auto", "chunked", "triton"], default="auto", help="the fused path")
    parser.add_argument("--chunk-tokens", type=int, default=1024)
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
    tokens, hidden = args.tokens, args.hidden
    hidden_t = args.target_hidden or hidden
    if min(tokens, hidden, hidden_t, args.chunk_tokens, args.iters) < 1:
        raise UserError("--tokens, --hidden, --target-hidden, --chunk-tokens and --iters must be positive")
    gen = torch.Generator().manual_seed(args.seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    hiddens = [rand(tokens, hidden_t) for _ in range(3)]
    fc = rand(hidden, 3 * hidden_t, scale=(3 * hidden_t) ** -0.5).requires_grad_()
    norm = (1 + rand(hidden, scale=0.1)).requires_grad_()
    layer_norms = [(1 + rand(hidden_t, scale=0.1)).requires_grad_() for _ in range(3)] if args.per_layer_norm else None
    leaves = [fc, norm, *(layer_norms or [])]
    grad_g, grad_norm = rand(tokens, hidden), rand(tokens, hidden)

    def run(impl):
        def fn():
            g, g_norm = fused_projection(hiddens, fc, norm, EPS, layer_norms, impl=impl, chunk_tokens=args.chunk_tokens)
            return torch.autograd.grad((g, g_norm), leaves, (grad_g, grad_norm))
        return fn

    rows = [measure("fused", run(args.impl), device, args.warmup, args.iters),
            measure("reference", run("reference"), device, args.warmup, args.iters)]
    title = (f"hidden-state projection fwd+bwd: T={tokens} Ht={hidden_t} H={hidden} "
             f"per_layer_norm={args.per_layer_norm} "
             f"{str(dtype).replace('torch.', '')} impl={args.impl}")
    report(title, rows, fast="fused", reference="reference", device=device)
    return 0
