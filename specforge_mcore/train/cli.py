"""``specforge-mcore train --config configs/X.yaml [--out DIR] [--resume] [key=value ...]``."""

from __future__ import annotations

import argparse

from specforge_mcore.config import load_config
from specforge_mcore.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config (YAML), e.g. configs/tiny.yaml")
    parser.add_argument("--out", default=None, help="run directory (default: train.out_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in --out")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an --out that already holds checkpoints (they are deleted)")
    parser.add_argument("--profile", action="store_true", help="record a PyTorch profiler trace (see --profile-steps)")
    parser.add_argument("--profile-steps", default=None, help="A:B, the optimizer steps to trace (default train.profile_steps)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.max_steps=20 optim.lr=3e-4")


def main(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.resume:
        overrides.append("train.resume=true")
    if args.overwrite:
        overrides.append("train.overwrite=true")
    if args.profile:
        overrides.append("train.profile=true")
    if args.profile_steps:
        # Quoted: YAML 1.1 would read an unquoted 2:4 as the base-60 integer 124.
        overrides.append(f"train.profile_steps='{args.profile_steps}'")
    cfg = load_config(args.config, overrides)
    out_dir = args.out or cfg.train.out_dir
    if not out_dir:
        raise UserError(f"{args.config}: no run directory: pass --out DIR or set train.out_dir")
    cfg.train.out_dir = out_dir
    from specforge_mcore.train.run import run_training

    run_training(cfg, out_dir)
    return 0
