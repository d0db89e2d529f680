"""A run's state across processes: what a checkpoint holds (draft, vocabulary, optimizer and scheduler,
config, the trainer state), what a resume accepts and restores, and which checkpoint is the best so far.
Where and how it is written on disk is ``train/checkpoint.py``'s."""

from __future__ import annotations

import os
from typing import Optional

from safetensors.torch import load_file

from specforge_mcore.config import config_from_dict, config_to_dict, save_config
from specforge_mcore.data.vocab import DraftVocab
from specforge_mcore.draft.io import save_draft
from specforge_mcore.errors import UserError
from specforge_mcore.fileio import save_torch
from specforge_mcore.parallel import raise_together
from specforge_mcore.train.checkpoint import (CheckpointWriteError, latest_checkpoint, load_plain, load_rng,
                                              read_best, read_trainer_state, save_checkpoint, set_rng_state,
                                              verify_checkpoint, write_best)
from specforge_mcore.train.compat import check_target_identity, target_identity
from specforge_mcore.train.metrics import truncate_metrics


def trainer_state(trainer) -> dict:
    """``trainer_state.json`` of a checkpoint of ``trainer`` at its current step."""
    return {
        "step": trainer.step,
        "epoch": trainer.step / trainer.steps_per_epoch,
        "rows_consumed": trainer.step * trainer.plan.global_batch,
        "next_rows": trainer.step_rows(trainer.step)[:8].tolist() if trainer.step < trainer.total_steps else [],
        "world_size": trainer.world,
        "layout": str(trainer.layout),
        "global_batch_size": trainer.plan.global_batch,
        "nonfinite_in_a_row": trainer.nonfinite_in_a_row,
        "target": target_identity(trainer.hf, trainer.hf_dir),
    }


def save(trainer) -> str:
    """Checkpoint ``trainer`` at its current step (collective); returns the checkpoint's directory."""

    def write(directory: str) -> None:
        save_draft(trainer.draft, directory)
        DraftVocab(trainer.draft.d2t.cpu(), trainer.draft.t2d.cpu()).save(os.path.join(directory, "vocab.safetensors"))
        save_torch({"optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict()},
                   os.path.join(directory, "optimizer.pt"))
        cfg = dict(config_to_dict(trainer.cfg))
        cfg["target"] = dict(cfg["target"], hf_dir=trainer.hf_dir)
        save_config(config_from_dict(cfg), os.path.join(directory, "config.yaml"))

    try:
        return save_checkpoint(trainer.out_dir, trainer.step, write, trainer_state(trainer),
                               trainer.cfg.train.keep_checkpoints, protect=trainer.best.checkpoint)
    except CheckpointWriteError as exc:
        last = latest_checkpoint(trainer.out_dir)
        raise CheckpointWriteError(f"{exc}; training stopped at step {trainer.step}. Last good checkpoint: "
                                   f"{last or 'none'} (resume with --resume once the disk has room)") from None


def resume(trainer) -> None:
    """Continue ``trainer`` from the latest complete checkpoint under its output directory, if any: draft,
    optimizer, scheduler, step, RNG; logged metrics after that step are dropped (they are redone)."""
    path = latest_checkpoint(trainer.out_dir)
    if path is None:
        if trainer.is_main and not trainer.quiet:
            print(f"resume: no complete checkpoint under {trainer.out_dir}/checkpoints; starting fresh", flush=True)
        return
    error = None
    if trainer.is_main:  # one rank reads every byte against the manifest, not every rank
        try:
            verify_checkpoint(path)
        except UserError as exc:
            error = exc
    raise_together(error)
    state = read_trainer_state(path)
    check_target_identity(state.get("target", {}), trainer.hf, path)
    if state["global_batch_size"] != trainer.plan.global_batch:
        raise UserError(f"{path} was trained with global_batch_size={state['global_batch_size']}; resuming with "
                        f"{trainer.plan.global_batch} would change the data order. Use the same global batch.")
    weights = load_file(os.path.join(path, "draft.safetensors"))
    expected = trainer.draft.trainable_state_dict()
    for key, tensor in weights.items():
        if key not in expected or tuple(tensor.shape) != tuple(expected[key].shape):
            raise UserError(f"{path}/draft.safetensors: {key} {list(tensor.shape)} does not fit this draft "
                            f"({list(expected[key].shape) if key in expected else 'no such parameter'})")
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise UserError(f"{path}/draft.safetensors lacks {', '.join(missing[:5])}"
                        f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}: an incomplete or "
                        "foreign checkpoint; resume from another one")
    # strict=False only because the frozen target embedding (a non-persistent buffer) is never saved.
    trainer.draft.load_state_dict({k: v.to(trainer.device) for k, v in weights.items()}, strict=False)
    opt = load_plain(os.path.join(path, "optimizer.pt"), map_location=trainer.device)
    trainer.optimizer.load_state_dict(opt["optimizer"])
    trainer.scheduler.load_state_dict(opt["scheduler"])
    trainer.step = int(state["step"])
    trainer.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
    if trainer.is_main:
        truncate_metrics(os.path.join(trainer.out_dir, "metrics.jsonl"), trainer.step)
    rng = load_rng(path, trainer.rank)
    if rng is not None:
        set_rng_state(rng)
    if trainer.is_main and not trainer.quiet:
        note = "" if state["world_size"] == trainer.world else \
            f" (saved at world size {state['world_size']}, now {trainer.world}: the replicated draft and optimizer need no resharding)"
        print(f"resumed from {path} at step {trainer.step}{note}", flush=True)


class BestCheckpoint:
    """The checkpoint with the highest held-out acceptance-length estimate so far (``OUT/best.json``)."""

    def __init__(self, out_dir: str, is_main: bool, quiet: bool, resuming: bool):
        self.out_dir, self.is_main, self.quiet = out_dir, is_main, quiet
        self.best: Optional[dict] = read_best(out_dir) if resuming else None

    @property
    def checkpoint(self) -> Optional[str]:
        return (self.best or {}).get("checkpoint")

    def improved_by(self, record: dict) -> bool:
        value = record.get("eval_sim_al")
        return value is not None and (self.best is None or value > self.best["eval_sim_al"])

    def record(self, record: dict, checkpoint: str) -> None:
        """``checkpoint`` holds the weights ``record`` evaluated: the new best."""
        self.best = {"step": record["step"], "eval_sim_al": record["eval_sim_al"],
                     "eval_accept": record["eval_accept"], "checkpoint": checkpoint}
        if self.is_main:
            write_best(self.out_dir, self.best)
            if not self.quiet:
                print(f"best so far: held-out acceptance-length estimate {record['eval_sim_al']:.3f} at step "
                      f"{record['step']} -> {checkpoint}", flush=True)
