"""``specforge-mcore bench loss``: the fused draft head + TTT loss against materialised logits.

Runs S TTT steps forward + backward the way the trainer does: each step's draft output ``o_i`` (made
before the measured region: it is the draft layer's activation either way) goes through norm -> lm_head
-> soft cross-entropy against the teacher, the S losses are summed and one backward returns the
gradients of every ``o_i``, the norm and lm_head. The reference keeps every step's logits for that
backward; the fused path keeps per-position statistics only. A chunked fused-linear-cross-entropy of the
Liger kind (loss and gradients computed chunk by chunk during forward, gradients stored for backward)
runs in the same table, and so does a "gradient floor": a loss with the same gradients and no logits,
the memory any implementation needs; the working memory above it is printed as well.

The teacher enters as the trainer hands it: the target's final hidden state + the t2d rows of its output
layer, the teacher's logits formed inside the loss.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from specforge_mcore.bench.common import Measurement, measure, peak_memory_bytes, report
from specforge_mcore.errors import UserError
from specforge_mcore.kernels._common import rms_norm
from specforge_mcore.kernels.ttt_loss import OBJECTIVES, fused_ttt_step_loss, ttt_step_loss_reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
EPS = 1e-6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens T per step")
    parser.add_argument("--hidden", type=int, default=4096, help="draft hidden H (= target hidden Ht here)")
    parser.add_argument("--vocab", type=int, default=32000, help="draft vocabulary Vd")
    parser.add_argument("--steps", type=int, default=7, help="TTT steps S")
    parser.add_argument("--impl", choices=["auto", "chunked", "triton"], default="auto", help="the fused path")
    parser.add_argument("--chunk-tokens", type=int, default=1024)
    parser.add_argument("--objective", choices=list(OBJECTIVES), default="soft_ce",
                        help="the loss against the teacher (the liger-style path is soft_ce only)")
    parser.add_argument("--valid-fraction", type=float, default=0.7,
                        help="share of positions inside the position mask (assistant tokens whose target argmax "
                             "is in the draft vocabulary)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--paths", default="fused,reference,liger",
                        help="comma list of fused, reference, liger (the ratio needs fused and reference)")
    parser.add_argument("--iters", type=int, default=3, help="timed runs; 0: time the single profiled run")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)


class _LigerStyleLoss(torch.autograd.Function):
    """Fused linear + soft cross-entropy the Liger way: per token chunk, logits -> loss and dz at once;
    ``d normed`` and ``d lm_head`` are accumulated during forward and stored until backward."""

    @staticmethod
    def forward(ctx, normed, lm_head_weight, teacher_hidden, teacher_weight, position_mask, weight, chunk):
        d_normed = torch.empty_like(normed)
        d_head = torch.zeros(lm_head_weight.shape, dtype=torch.float32, device=normed.device)
        total = torch.zeros((), dtype=torch.float32, device=normed.device)
        for t0 in range(0, normed.shape[0], chunk):
            rows = slice(t0, t0 + chunk)
            logits = (normed[rows] @ lm_head_weight.t()).float()
            log_q = torch.log_softmax(logits, -1)
            p = torch.softmax((teacher_hidden[rows] @ teacher_weight.t()).float(), -1)
            coef = weight * position_mask[rows].float()
            total += (coef * -(p * log_q).sum(-1)).sum()
            dz = (log_q.exp_().sub_(p).mul_(coef[:, None])).to(normed.dtype)
            d_normed[rows] = dz @ lm_head_weight
            d_head.addmm_(dz.t().float(), normed[rows].float())
        ctx.save_for_backward(d_normed, d_head.to(lm_head_weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad):
        d_normed, d_head = ctx.saved_tensors
        return d_normed * grad, d_head * grad, None, None, None, None, None


def liger_style_step_loss(o, norm_weight, lm_head_weight, eps, position_mask, weight, *, teacher_hidden,
                          teacher_weight, chunk_tokens):
    return _LigerStyleLoss.apply(rms_norm(o, norm_weight, eps), lm_head_weight, teacher_hidden, teacher_weight,
                                 position_mask, weight, chunk_tokens)


def _run(args, device, dtype) -> tuple[list[Measurement], str]:
    tokens, hidden, vocab, steps = args.tokens, args.hidden, args.vocab, args.steps
    gen = torch.Generator().manual_seed(args.seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    # The draft layer's step outputs exist before the loss runs (they are that layer's activations).
    outputs = [rand(tokens, hidden).requires_grad_() for _ in range(steps)]
    norm_weight = (1 + rand(hidden, scale=0.1)).requires_grad_()
    lm_head = rand(vocab, hidden, scale=hidden ** -0.5).requires_grad_()
    teacher_hidden = rand(tokens, hidden)
    teacher_weight = rand(vocab, hidden, scale=hidden ** -0.5)
    masks = [torch.rand(tokens, generator=gen).to(device) < args.valid_fraction for _ in range(steps)]
    weights = [0.8 ** i / max(int(m.sum()), 1) for i, m in enumerate(masks)]
    leaves = [*outputs, norm_weight, lm_head]
    teacher = dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight)
    objective = dict(objective=args.objective)

    def unroll(step_loss: Callable) -> Callable[[], object]:
        def run():
            total = 0
            for i in range(steps):
                loss = step_loss(outputs[i], norm_weight, lm_head, EPS, masks[i], weights[i], **teacher)
                total = total + (loss[0] if isinstance(loss, tuple) else loss)
            return torch.autograd.grad(total, leaves)
        return run

    def gradient_floor(o, norm_weight, lm_head_weight, eps, position_mask, weight, **teacher):
        """No logits at all, the same gradients: what any implementation must allocate."""
        return weight * ((o * 1.0).sum() + (norm_weight * 1.0).sum() + (lm_head_weight * 1.0).sum())

    wanted = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = sorted(set(wanted) - {"fused", "reference", "liger"})
    if unknown or not wanted:
        raise UserError(f"--paths {args.paths!r}: expected a comma list of fused, reference, liger")
    paths = {}
    if "fused" in wanted:
        paths["fused"] = lambda *a, **k: fused_ttt_step_loss(*a, impl=args.impl, chunk_tokens=args.chunk_tokens,
                                                             **objective, **k)
    if "reference" in wanted:
        paths["reference"] = lambda *a, **k: ttt_step_loss_reference(*a, **objective, **k)
    if "liger" in wanted and args.objective == "soft_ce":
        paths["liger-style chunked FLCE"] = lambda *a, **k: liger_style_step_loss(*a, chunk_tokens=args.chunk_tokens,
                                                                                   **k)
    paths["gradient floor"] = gradient_floor
    rows = [_measure(name, unroll(fn), device, args) for name, fn in paths.items()]
    title = (f"draft head + TTT loss fwd+bwd over {steps} steps: T={tokens} H={hidden} "
             f"Vd={vocab} {str(dtype).replace('torch.', '')} valid={args.valid_fraction:g} chunk={args.chunk_tokens} "
             f"impl={args.impl} objective={args.objective}")
    return rows, title


def _measure(name: str, fn: Callable[[], object], device: torch.device, args) -> Measurement:
    if args.iters > 0:
        return measure(name, fn, device, warmup=args.warmup, iters=args.iters)
    # --iters 0: one run gives both numbers (the profiler's overhead is small next to these GEMMs); for
    # shapes where a run takes minutes.
    start = time.perf_counter()
    peak = peak_memory_bytes(fn, device)
    return Measurement(name, time.perf_counter() - start, peak)


def _print_rows(title: str, rows: list[Measurement]) -> None:
    print(title)
    print(f"{'path':<28}{'time ms':>12}{'peak MiB':>14}")
    for row in rows:
        print(f"{row.name:<28}{row.seconds * 1e3:>12.2f}{row.peak_bytes / 2**20:>14.1f}")


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")
    if args.iters < 0 or not 0 < args.valid_fraction <= 1:
        raise UserError(f"--iters must be >= 0 and --valid-fraction in (0, 1], got {args.iters}, {args.valid_fraction}")
    for name in ("tokens", "hidden", "vocab", "steps", "chunk_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    dtype = DTYPES[args.dtype or ("float32" if device.type == "cpu" else "bfloat16")]
    peak_memory_bytes(lambda: None, device)  # the profiler's one-time start-up must not land on a path
    rows, title = _run(args, device, dtype)
    by_name = {row.name: row for row in rows}
    if "fused" in by_name and "reference" in by_name:
        floor = by_name["gradient floor"].peak_bytes
        fused_work = by_name["fused"].peak_bytes - floor
        ref_work = by_name["reference"].peak_bytes - floor
        print(f"working memory above the gradient floor ({floor / 2**20:.1f} MiB: the outputs' and "
              f"weights' gradients): fused {fused_work / 2**20:.1f} MiB, reference {ref_work / 2**20:.1f} MiB, "
              f"ratio {fused_work / max(ref_work, 1):.4f}")
        report(title, rows, fast="fused", reference="reference", device=device)  # last line: the ratio
    else:
        _print_rows(title, rows)
    return 0
