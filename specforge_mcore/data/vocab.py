"""The draft vocabulary: which target token ids the draft's head predicts (docs/design.md §4).

``d2t[i] = target_id(i) - i`` (int64 offsets, as SGLang reads them) for draft ids ``i`` in ascending
target-id order, and ``t2d`` is a bool mask over the target vocabulary. The ids are the ``Vd`` most
frequent *assistant* tokens of the training data (ties: lower id first); if the data has fewer distinct
assistant tokens, the rest are the most frequent other tokens of the data, then the lowest unused ids.

``specforge-mcore build-vocab --config X`` builds it from the prepared data and saves it (default
``<train.out_dir>/vocab.safetensors``), printing how much of the assistant text it covers.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from specforge_mcore.data.packing import PackedData
from specforge_mcore.errors import UserError

VOCAB_FORMAT = "specforge_mcore.draft_vocab/1"


@dataclass
class DraftVocab:
    d2t: torch.Tensor  # int64 [Vd]: target_id(i) - i
    t2d: torch.Tensor  # bool [V]

    @property
    def draft_vocab_size(self) -> int:
        return int(self.d2t.numel())

    @property
    def target_vocab_size(self) -> int:
        return int(self.t2d.numel())

    @property
    def draft_ids(self) -> torch.Tensor:
        """Target id of each draft id (strictly increasing)."""
        return self.d2t + torch.arange(self.draft_vocab_size, dtype=torch.int64)

    @classmethod
    def from_target_ids(cls, target_ids: torch.Tensor, target_vocab_size: int) -> "DraftVocab":
        ids = torch.sort(torch.as_tensor(target_ids, dtype=torch.int64)).values
        t2d = torch.zeros(target_vocab_size, dtype=torch.bool)
        t2d[ids] = True
        vocab = cls(ids - torch.arange(ids.numel(), dtype=torch.int64), t2d)
        vocab.validate("<built>")
        return vocab

    def validate(self, where: str) -> None:
        """Raise a UserError naming ``where`` unless d2t and t2d describe the same sorted id set."""
        if self.d2t.dtype != torch.int64 or self.d2t.dim() != 1:
            raise UserError(f"{where}: d2t must be a 1-D int64 tensor, got {self.d2t.dtype} {list(self.d2t.shape)}")
        if self.t2d.dtype != torch.bool or self.t2d.dim() != 1:
            raise UserError(f"{where}: t2d must be a 1-D bool tensor, got {self.t2d.dtype} {list(self.t2d.shape)}")
        vd, v = self.draft_vocab_size, self.target_vocab_size
        if not 0 < vd <= v:
            raise UserError(f"{where}: draft vocab size {vd} must be in 1..{v} (the target vocab size)")
        ids = self.draft_ids
        if ids[0] < 0 or ids[-1] >= v:
            raise UserError(f"{where}: d2t maps draft ids to target ids outside [0, {v})")
        if vd > 1 and not bool((ids[1:] > ids[:-1]).all()):
            raise UserError(f"{where}: d2t offsets must give strictly increasing target ids")
        if int(self.t2d.sum()) != vd or not bool(self.t2d[ids].all()):
            raise UserError(f"{where}: t2d does not mark exactly the {vd} target ids that d2t maps to")

    def save(self, path: str, metadata: Optional[dict] = None) -> None:
        from specforge_mcore.fileio import save_safetensors

        self.validate(path)
        meta = {"format": VOCAB_FORMAT, "draft_vocab_size": str(self.draft_vocab_size),
                "target_vocab_size": str(self.target_vocab_size)}
        meta.update({k: str(v) for k, v in (metadata or {}).items()})
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        save_safetensors({"d2t": self.d2t.contiguous(), "t2d": self.t2d.contiguous()}, tmp, metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str, target_vocab_size: Optional[int] = None) -> "DraftVocab":
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise UserError(f"draft vocab file {path} does not exist")
        try:
            with safe_open(path, framework="pt") as fh:
                names = set(fh.keys())
                if names != {"d2t", "t2d"}:
                    raise UserError(f"{path}: a draft vocab holds exactly the tensors d2t and t2d, found {sorted(names)}")
                vocab = cls(fh.get_tensor("d2t"), fh.get_tensor("t2d"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: cannot read the draft vocab: {exc}") from None
        vocab.validate(path)
        if target_vocab_size is not None and vocab.target_vocab_size != target_vocab_size:
            raise UserError(f"{path}: t2d covers {vocab.target_vocab_size} target ids but the target's "
                            f"vocab_size is {target_vocab_size}")
        return vocab

    def coverage(self, assistant_counts: torch.Tensor) -> float:
        """Fraction of assistant tokens whose id is in the draft vocabulary."""
        total = int(assistant_counts.sum())
        return float(assistant_counts[self.t2d].sum()) / total if total else 0.0


def token_counts(packed: PackedData, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(assistant-token counts, all-token counts) over ``vocab_size`` ids; padding is not counted."""
    real = torch.arange(packed.max_length) < packed.row_lengths.unsqueeze(1).long()
    ids = packed.input_ids
    if ids.numel() and int(ids[real].max()) >= vocab_size:
        raise UserError(f"the data holds token id {int(ids[real].max())} >= the target vocab size {vocab_size}")
    assistant = torch.bincount(ids[packed.assistant_mask], minlength=vocab_size)
    everything = torch.bincount(ids[real], minlength=vocab_size)
    return assistant, everything


Counts = Union[PackedData, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def build_draft_vocab(packed_or_token_counts: Counts, target_vocab_size: int, draft_vocab_size: int) -> DraftVocab:
    """Top-``draft_vocab_size`` ids by assistant-token frequency (see the module docstring)."""
    if not 0 < draft_vocab_size <= target_vocab_size:
        raise UserError(f"draft_vocab_size {draft_vocab_size} must be in 1..{target_vocab_size} (the target vocab size)")
    if isinstance(packed_or_token_counts, PackedData):
        assistant, everything = token_counts(packed_or_token_counts, target_vocab_size)
    elif isinstance(packed_or_token_counts, tuple):
        assistant, everything = packed_or_token_counts
    else:
        assistant = packed_or_token_counts
        everything = torch.zeros_like(assistant)
    for name, counts in (("assistant counts", assistant), ("token counts", everything)):
        if counts.shape != (target_vocab_size,):
            raise ValueError(f"{name} have shape {list(counts.shape)}, expected [{target_vocab_size}]")
    a = assistant.numpy().astype(np.int64)
    e = everything.numpy().astype(np.int64)
    tier = np.where(a > 0, 0, np.where(e > 0, 1, 2))  # assistant tokens, then other seen tokens, then unseen
    count = np.where(tier == 0, a, e)
    ids = np.arange(target_vocab_size)
    order = np.lexsort((ids, -count, tier))  # last key is the primary one
    return DraftVocab.from_target_ids(torch.from_numpy(order[:draft_vocab_size].copy()), target_vocab_size)


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config (YAML)")
    parser.add_argument("--out", default=None, help="output file (default <train.out_dir>/vocab.safetensors)")
    parser.add_argument("--target-vocab-size", type=int, default=None,
                        help="the target's vocab size (default: from the target's config.json)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")


def main(args: argparse.Namespace) -> int:
    from specforge_mcore.config import load_config
    from specforge_mcore.data.prepare import prepare_data, target_vocab_size

    cfg = load_config(args.config, args.overrides)
    out = args.out
    if out is None:
        if not cfg.train.out_dir:
            raise UserError(f"{args.config}: set train.out_dir or pass --out FILE")
        out = os.path.join(cfg.train.out_dir, "vocab.safetensors")
    vocab_size = args.target_vocab_size or target_vocab_size(cfg)
    train, _, bad = prepare_data(cfg)
    assistant, everything = token_counts(train, vocab_size)
    vocab = build_draft_vocab((assistant, everything), vocab_size, cfg.draft.draft_vocab_size)
    coverage = vocab.coverage(assistant)
    vocab.save(out, metadata={"coverage": f"{coverage:.6f}", "assistant_tokens": int(assistant.sum())})
    distinct = int((assistant > 0).sum())
    print(f"draft vocab: {vocab.draft_vocab_size} of {vocab_size} target ids "
          f"({distinct} distinct assistant tokens in the data)")
    print(f"coverage: {coverage:.4%} of {int(assistant.sum())} assistant tokens")
    print(f"saved {out}")
    return 0
