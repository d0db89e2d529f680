"""``specforge-mcore export``: a training checkpoint -> an SGLang (or vLLM speculators) serving directory."""

from __future__ import annotations

import argparse

from specforge_mcore.export import contract
from specforge_mcore.export.io import FORMATS, export_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a training checkpoint directory, OUT/checkpoints/step_N (any world size or sharding), "
                             "or a run directory OUT (its latest complete checkpoint)")
    parser.add_argument("--out", required=True, help="the serving directory to write")
    parser.add_argument("--format", choices=sorted(FORMATS), default=contract.SGLANG,
                        help="sglang: LlamaForCausalLMEagle3 (default); speculators: vLLM's Eagle3DraftModel layout")
    parser.add_argument("--dtype", choices=sorted(contract.DTYPES), default="bf16", help="weight dtype (default bf16)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it is an earlier export")


def main(args: argparse.Namespace) -> int:
    import os

    from specforge_mcore.errors import UserError
    from specforge_mcore.train.checkpoint import latest_checkpoint

    if os.path.isdir(os.path.join(args.checkpoint, "checkpoints")):
        latest = latest_checkpoint(args.checkpoint)
        if latest is None:
            raise UserError(f"{args.checkpoint}: no complete checkpoint under {args.checkpoint}/checkpoints")
        print(f"[export] latest checkpoint of {args.checkpoint}: {latest}")
        args.checkpoint = latest
    out = export_checkpoint(args.checkpoint, args.out, layout=args.format, dtype=args.dtype, overwrite=args.overwrite)
    print(f"[export] wrote {args.format} checkpoint ({args.dtype}) to {out}")
    with open(f"{out}/README.md", encoding="utf-8") as fh:
        serving = [line for line in fh.read().splitlines() if line.startswith(("python -m sglang", "vllm serve"))]
    if serving:
        print(f"[export] serve with: {serving[0]}")
    return 0
