"""``specforge-mcore bench attention``: the csrc TTT attention against the masked reference.

Times forward + backward over S TTT steps the way the trainer runs them: the step-0 keys/values are
reused by every step, the diagonal keys/values grow by one step each time, the per-step outputs feed one
loss and one backward. On CUDA FlexAttention and SDPA with an explicit mask run in the same table.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F

from specforge_mcore.bench.common import measure, report
from specforge_mcore.draft.attention import (
    document_ids,
    flex_attention_ttt,
    reference_attention,
    select_attention_backend,
)
from specforge_mcore.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=4096, help="packed length T")
    parser.add_argument("--heads", type=int, default=8, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=None, help="kv heads (default: --heads)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--steps", type=int, default=7, help="TTT steps S")
    parser.add_argument("--docs", type=int, default=4, help="documents packed into the T tokens")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)


def sdpa_attention(q, k0, v0, kd, vd, cu_seqlens, scale=None):
    """SDPA over the step-0 keys followed by every diagonal step's keys, with an explicit bool mask."""
    tokens, steps = q.shape[0], kd.shape[0]
    keys = torch.cat([k0.unsqueeze(0), kd]).flatten(0, 1).transpose(0, 1)  # [Hkv, (1 + i) T, D]
    values = torch.cat([v0.unsqueeze(0), vd]).flatten(0, 1).transpose(0, 1)
    doc = document_ids(cu_seqlens, tokens)
    pos = torch.arange(tokens, device=q.device)
    causal = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    diagonal = torch.eye(tokens, dtype=torch.bool, device=q.device).repeat(1, steps)
    mask = torch.cat([causal, diagonal], dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[1] != k0.shape[1])
    return out.transpose(0, 1)


def _document_boundaries(tokens: int, docs: int, device: torch.device) -> torch.Tensor:
    if not 1 <= docs <= tokens:
        raise UserError(f"--docs {docs} must be between 1 and --tokens {tokens}")
    bounds = [round(i * tokens / docs) for i in range(docs + 1)]
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")
    dtype = DTYPES[args.dtype or ("float32" if device.type == "cpu" else "bfloat16")]
    kv_heads = args.kv_heads or args.heads
    if args.heads % kv_heads:
        raise UserError(f"--kv-heads {kv_heads} must divide --heads {args.heads}")
    tokens, heads, dim, steps = args.tokens, args.heads, args.head_dim, args.steps
    if steps < 1:
        raise UserError(f"--steps {steps} must be at least 1")

    gen = torch.Generator().manual_seed(args.seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    queries = [leaf(tokens, heads, dim) for _ in range(steps)]
    k0, v0 = leaf(tokens, kv_heads, dim), leaf(tokens, kv_heads, dim)
    kd_all, vd_all = leaf(steps - 1, tokens, kv_heads, dim), leaf(steps - 1, tokens, kv_heads, dim)
    cu_seqlens = _document_boundaries(tokens, args.docs, device)
    leaves = [*queries, k0, v0, kd_all, vd_all]

    def unroll(attn: Callable) -> Callable[[], object]:
        def run():
            loss = 0
            for i, q in enumerate(queries):
                loss = loss + attn(q, k0, v0, kd_all[:i], vd_all[:i], cu_seqlens, None).float().sum()
            return torch.autograd.grad(loss, leaves)
        return run

    paths = {"csrc": select_attention_backend("csrc", device), "reference": reference_attention}
    if device.type == "cuda":
        paths["flex"] = flex_attention_ttt
        paths["sdpa"] = sdpa_attention
    rows = [measure(name, unroll(fn), device, warmup=args.warmup, iters=args.iters) for name, fn in paths.items()]
    title = (f"TTT attention fwd+bwd over {steps} steps: T={tokens} docs={args.docs} heads={heads}/{kv_heads} "
             f"D={dim} {str(dtype).replace('torch.', '')}")
    report(title, rows, fast="csrc", reference="reference", device=device)
    return 0
