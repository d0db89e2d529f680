"""Training checkpoints: atomic, complete, resumable at any world size.

``OUT/checkpoints/step_N/`` holds

* ``draft.safetensors`` + ``draft_arch.json``: the draft (fp32, unsharded; d2t/t2d inside),
* ``vocab.safetensors``: the draft vocabulary mapping,
* ``optimizer.pt``: AdamW state and the LR scheduler (the draft and its optimizer are replicated over
  the data-parallel world, so one copy is every rank's shard, and a resume at another world size
  needs no resharding),
* ``rng/rank_XXXXX.pt``: each rank's RNG states,
* ``trainer_state.json``: step, data position, world size and layout it was written with, the target it
  trains against (to refuse a checkpoint made for another target), the non-finite counter,
* ``config.yaml``: the run config,
* ``MANIFEST.json``: size and SHA-256 of every file above, checked before a checkpoint is read (resume,
  export, ``draft.init_from``): a truncated or corrupted file is named, never loaded,
* and ``COMPLETE``, written last.

Writing goes to ``OUT/checkpoints/.tmp-step_N``, every file fsynced, then one ``rename`` makes it
``step_N``: a reader never sees a partial checkpoint, and a crash mid-save leaves the previous one
intact. A directory without ``COMPLETE`` is never taken for a checkpoint.

``OUT/best.json`` names the checkpoint with the highest held-out acceptance-length estimate (its step,
estimate and per-step acceptance); rotation keeps that checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any, Optional

import torch
import torch.distributed as dist

from specforge_mcore import collectives
from specforge_mcore.errors import UserError
from specforge_mcore.fileio import COMPLETE, fsync_path, save_torch, verify_manifest, write_manifest
from specforge_mcore.train import faults

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoints_dir(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(out_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, COMPLETE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: str) -> Optional[str]:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


BEST = "best.json"


def read_best(out_dir: str) -> Optional[dict]:
    """``OUT/best.json``, when the checkpoint it names still exists."""
    path = os.path.join(out_dir, BEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        best = json.load(fh)
    return best if os.path.isdir(best.get("checkpoint", "")) else None


def write_best(out_dir: str, best: dict) -> None:
    tmp = os.path.join(out_dir, f".{BEST}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(best, fh, indent=1)
    os.replace(tmp, os.path.join(out_dir, BEST))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(out_dir: str, step: int, write_rank0, trainer_state: dict, keep: int,
                    protect: Optional[str] = None) -> str:
    """Collective: every rank calls it. Rank 0 writes the shared files through ``write_rank0(dir)``;
    each rank writes its RNG state. Keeps the newest ``keep`` checkpoints, and ``protect`` (the best one)
    whatever its age. Returns the final directory."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    root = checkpoints_dir(out_dir)
    final = os.path.join(root, f"step_{step}")
    tmp = os.path.join(root, f".tmp-step_{step}")
    error: Optional[BaseException] = None
    if rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(os.path.join(tmp, "rng"))
        except OSError as exc:
            error = exc
    _agree(error, f"cannot create checkpoint directory {tmp}")
    try:
        path = os.path.join(tmp, "rng", f"rank_{rank:05d}.pt")
        save_torch(rng_state(), path)
        if rank == 0:
            write_rank0(tmp)
            faults.in_save(step, rank)
            with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as fh:
                json.dump(trainer_state, fh, indent=2)
            for name in os.listdir(tmp):
                if os.path.isfile(os.path.join(tmp, name)):
                    fsync_path(os.path.join(tmp, name))
    except OSError as exc:
        error = exc
    try:
        _agree(error, f"writing checkpoint step_{step} failed")
    except CheckpointWriteError:
        if rank == 0:  # give the space back: a partial checkpoint is never taken anyway
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:
        try:
            write_manifest(tmp)
            with open(os.path.join(tmp, COMPLETE), "w") as fh:
                fh.write(f"{step}\n")
                fh.flush()
                os.fsync(fh.fileno())
            fsync_path(os.path.join(tmp, "rng"))
            fsync_path(tmp)
            if os.path.exists(final):  # an older incomplete or superseded copy of this step
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_path(root)
            for _, old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
                if protect is not None and os.path.abspath(old) == os.path.abspath(protect):
                    continue
                shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:
            error = exc
    _agree(error, f"finalising checkpoint step_{step} failed")
    return final


def _agree(error: Optional[BaseException], what: str) -> None:
    """Make every rank fail together (with rank 0's message) when any rank failed."""
    failed = collectives.all_reduce(torch.tensor([1 if error is not None else 0]))
    if int(failed) > 0:
        message = f"{what}: {error}" if error is not None else f"{what} on another rank"
        raise CheckpointWriteError(message)


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, permissions, ...)."""


def read_trainer_state(path: str) -> dict:
    file = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(os.path.join(path, COMPLETE)):
        raise UserError(f"{path} is not a complete checkpoint (no {COMPLETE} marker): it was interrupted while "
                        "being written; resume from an earlier one")
    with open(file, encoding="utf-8") as fh:
        return json.load(fh)


def verify_checkpoint(path: str) -> None:
    """Every file against the checkpoint's manifest (older checkpoints without one pass unchecked)."""
    verify_manifest(path, "checkpoint", exclude=(COMPLETE,))


def load_rng(path: str, rank: int) -> Optional[dict]:
    file = os.path.join(path, "rng", f"rank_{rank:05d}.pt")
    return load_plain(file) if os.path.isfile(file) else None


def load_plain(path: str, map_location=None) -> Any:
    """``torch.load`` of a checkpoint file that may come from someone else (``--resume`` on a copied run,
    ``draft.init_from``): tensors and plain Python values only, never unpickled code."""
    import pickle

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"{path}: refusing to load it: it holds objects other than tensors and plain values, "
                        f"which could run code when unpickled ({str(exc).splitlines()[0]})") from None
