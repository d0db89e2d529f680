"""Saving and loading the draft's own files: ``draft.safetensors`` (fp32 weights + d2t/t2d) and
``draft_arch.json`` (every size, the RoPE settings and the capture layer ids).

These two files sit in every training checkpoint directory (``OUT/checkpoints/step_N/``), whatever the
world size it was trained with: the draft is replicated, so the weights are written once, unsharded.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file

from specforge_mcore.draft.model import DraftArch, Eagle3Draft
from specforge_mcore.errors import UserError
from specforge_mcore.fileio import COMPLETE, save_safetensors, verify_manifest

WEIGHTS = "draft.safetensors"
ARCH = "draft_arch.json"


def save_draft(draft: Eagle3Draft, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in draft.trainable_state_dict().items()}
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    save_safetensors(tensors, os.path.join(directory, WEIGHTS))
    with open(os.path.join(directory, ARCH), "w", encoding="utf-8") as fh:
        json.dump(draft.arch.to_dict(), fh, indent=2)


def read_arch(directory: str) -> DraftArch:
    path = os.path.join(directory, ARCH)
    if not os.path.isfile(path):
        raise UserError(f"{directory}: no {ARCH} (expected a training checkpoint directory, e.g. OUT/checkpoints/step_N)")
    with open(path, encoding="utf-8") as fh:
        try:
            return DraftArch.from_dict(json.load(fh))
        except (json.JSONDecodeError, TypeError) as exc:
            raise UserError(f"{path}: not a draft architecture file: {exc}") from None


def load_draft(directory: str, map_location: str | torch.device = "cpu") -> Eagle3Draft:
    """The draft saved in ``directory`` (its embedding must still be set from the target)."""
    arch = read_arch(directory)
    draft = Eagle3Draft(arch)
    path = os.path.join(directory, WEIGHTS)
    if not os.path.isfile(path):
        raise UserError(f"{directory}: no {WEIGHTS}")
    verify_manifest(directory, "draft checkpoint", exclude=(COMPLETE,))  # a training checkpoint has one
    state = load_file(path, device=str(map_location))
    expected = draft.trainable_state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"{path}: keys do not match the draft of {ARCH}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise UserError(f"{path}: {key} has shape {list(tensor.shape)}, {ARCH} implies {list(expected[key].shape)}")
    draft.load_state_dict(state, strict=False)
    return draft.to(map_location)
