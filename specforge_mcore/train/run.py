"""Run a training job in this process (one rank of it) and print the final per-step table."""

from __future__ import annotations

from specforge_mcore import collectives
from specforge_mcore.config import RunConfig


def format_step_table(record: dict, title: str = "final") -> str:
    acc = record.get("acc") or record.get("eval_acc")
    losses = record.get("loss_steps") or record.get("eval_loss_steps")
    lines = [f"{title}: per TTT step", f"{'step':>6}{'loss':>10}{'acc':>9}"]
    for i, (loss, a) in enumerate(zip(losses, acc)):
        lines.append(f"{i:>6}{loss:>10.4f}{a:>9.4f}")
    return "\n".join(lines)


def run_training(cfg: RunConfig, out_dir: str) -> list[dict]:
    import torch.distributed as dist

    from specforge_mcore.train.trainer import Trainer

    trainer = Trainer(cfg, out_dir, resume=cfg.train.resume)
    history = trainer.fit()
    if trainer.is_main and history:
        train_records = [r for r in history if "acc" in r]
        eval_records = [r for r in history if "eval_acc" in r]
        if train_records:
            print(format_step_table(train_records[-1], f"train (step {train_records[-1]['step']})"))
        if eval_records:
            print(format_step_table(eval_records[-1], f"held-out eval (step {eval_records[-1]['step']})"))
        print(f"run directory: {out_dir} (metrics.jsonl, training.png, checkpoints/)")
    if dist.is_initialized():
        collectives.barrier()
        dist.destroy_process_group()
    return history


def train_worker(rank: int, world: int, cfg_tree: dict, out_dir: str, return_weights: bool = True,
                 eval_first: bool = False):
    """One rank of a training job started by ``specforge_mcore.parallel.spawn`` (tests, benchmarks).
    ``eval_first`` also evaluates the untrained draft on the held-out split."""
    from specforge_mcore.config import config_from_dict
    from specforge_mcore.train.trainer import Trainer

    cfg = config_from_dict(cfg_tree)
    trainer = Trainer(cfg, out_dir, resume=cfg.train.resume, quiet=True)
    before = trainer.evaluate() if eval_first else None
    history = trainer.fit()
    weights = {k: v.detach().cpu().clone() for k, v in trainer.draft.trainable_state_dict().items()} \
        if return_weights and rank == 0 else None
    collectives.barrier()
    from specforge_mcore.target.host import StoredTarget

    return {"history": history, "weights": weights, "rank": rank, "eval_before": before,
            "target_loaded": not isinstance(trainer.host, StoredTarget)}
