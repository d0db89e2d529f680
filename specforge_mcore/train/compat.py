"""What a run checks before it trains: a writable output directory that holds no other run's checkpoints,
the target it trains against (and that a checkpoint or an initial draft was made for that target)."""

from __future__ import annotations

import os
import shutil

from specforge_mcore import collectives
from specforge_mcore.config import RunConfig
from specforge_mcore.errors import UserError
from specforge_mcore.target.random import random_target
from specforge_mcore.train.checkpoint import checkpoints_dir, list_checkpoints


def resolve_target_dir(cfg: RunConfig, rank: int) -> str:
    """The target's HF directory; a random target is generated (once, by rank 0) when asked for."""
    if cfg.target.hf_dir:
        if not os.path.isdir(cfg.target.hf_dir):
            raise UserError(f"target.hf_dir {cfg.target.hf_dir} does not exist (run `make setup` for the "
                            "SmolLM2 targets, or point it at an HF model directory)")
        return cfg.target.hf_dir
    if cfg.target.random is None:
        raise UserError("set target.hf_dir (an HF model directory) or target.random (a generated test target)")
    path = None
    if rank == 0:
        path = random_target(cfg.target.random.family, cfg.target.random.hf_config, cfg.target.random.seed)
    return collectives.broadcast_object(path, src=0)


def check_writable(out_dir: str) -> None:
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-test-{os.getpid()}")
        with open(probe, "w") as fh:
            fh.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise UserError(f"output directory {out_dir} is not writable: {exc.strerror or exc}") from None


def check_fresh_start(out_dir: str, resume: bool, overwrite: bool) -> None:
    """A fresh run must not mix its checkpoints with an earlier run's (``latest`` would pick theirs)."""
    found = list_checkpoints(out_dir)
    if resume or not found:
        return
    if not overwrite:
        raise UserError(f"{out_dir} already holds checkpoints up to step_{found[-1][0]}: pass --resume to continue "
                        "that run, --overwrite to discard it, or another --out")
    shutil.rmtree(checkpoints_dir(out_dir))
    for name in ("metrics.jsonl", "training.png", "steps.ledger.jsonl", "best.json"):  # --overwrite: a new run's
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def target_identity(hf: dict, hf_dir: str) -> dict:
    return {"hf_dir": hf_dir, "architectures": hf.get("architectures"), "hidden_size": hf["hidden_size"],
            "vocab_size": hf["vocab_size"], "num_hidden_layers": hf["num_hidden_layers"]}


def check_target_identity(saved: dict, hf: dict, where: str) -> None:
    for key in ("hidden_size", "vocab_size", "num_hidden_layers"):
        if key in saved and saved[key] != hf[key]:
            raise UserError(f"{where} was trained against a target with {key}={saved[key]}, but this target has "
                            f"{key}={hf[key]} ({saved.get('hf_dir')} vs now): a draft only fits the target it was made for")


def check_draft_fits_target(arch, hf: dict, capture_layer_ids: list[int], where: str) -> None:
    if arch.target_hidden_size != hf["hidden_size"]:
        raise UserError(f"{where}: the draft reads target hidden states of size {arch.target_hidden_size}, this "
                        f"target's hidden_size is {hf['hidden_size']}")
    if arch.vocab_size != hf["vocab_size"]:
        raise UserError(f"{where}: the draft maps a vocabulary of {arch.vocab_size} tokens, this target has "
                        f"vocab_size={hf['vocab_size']}")
    if list(arch.capture_layer_ids) != list(capture_layer_ids):
        raise UserError(f"{where}: the draft was trained on target layers {arch.capture_layer_ids}, the run "
                        f"captures {capture_layer_ids}; set target.capture_layer_ids={arch.capture_layer_ids}")
