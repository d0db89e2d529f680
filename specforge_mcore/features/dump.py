"""``specforge-mcore dump-features --config configs/X.yaml --out STORE [key=value ...]``: run the frozen
target over every training row and every held-out row, in the config's layout (TP/EP/PP, any launcher),
and write their features to an offline feature store (docs/design.md §13; held-out rows in STORE/heldout)
without training a draft. A rerun skips the rounds already stored. ``train --config ...
data.features=STORE`` then trains from it at any world size without loading the target.
"""

from __future__ import annotations

import argparse

import torch.distributed as dist

from specforge_mcore import collectives
from specforge_mcore.config import load_config
from specforge_mcore.train.trainer import Trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the training run's config (YAML)")
    parser.add_argument("--out", required=True, help="the store directory (data.features of the training run)")
    parser.add_argument("--work-dir", default=None,
                        help="where the run's draft vocabulary goes (default: <out>.work); train with the same "
                             "data.vocab_file or let training build it again (it is deterministic)")
    parser.add_argument("overrides", nargs="*", help="config overrides, as for train (the layout: target.tp=2 ...)")


def dump_worker(rank: int, world: int, cfg_tree: dict, work: str) -> dict:
    """One rank of ``dump-features`` started by ``specforge_mcore.parallel.spawn`` (tests): the stores' summary."""
    from specforge_mcore.config import config_from_dict

    return Trainer(config_from_dict(cfg_tree), work, quiet=True).dump_features()


def main(args: argparse.Namespace) -> int:
    work = args.work_dir or args.out.rstrip("/") + ".work"
    cfg = load_config(args.config, [*args.overrides, f"data.features={args.out}", "train.cache_features=true",
                                    f"train.out_dir={work}"])
    trainer = Trainer(cfg, work)
    summary = trainer.dump_features()
    if trainer.is_main:
        state = "was already complete" if summary.get("already_complete") else f"complete in {summary['seconds']:.0f} s"
        print(f"feature store {args.out}: {summary['rows']} training rows, {summary['heldout_rows']} held-out rows, "
              f"{state}", flush=True)
    if dist.is_initialized():
        collectives.barrier()
        dist.destroy_process_group()
    return 0
