"""Sequence packing: several tokenised conversations per fixed-length row.

Each row is exactly ``max_length`` tokens. Documents keep their own identity inside a row:
``document_ids`` numbers them 0, 1, 2, ... (attention must not cross a document boundary),
``position_ids`` restart at 0 in every document, and the loss mask is each document's own, so nothing
is learned across a boundary. The right padding is one more document (mask 0, pad id = the tokenizer's
pad or EOS id), which keeps "attend within your document" the only rule a consumer needs.

Rows are filled best-fit decreasing (longest document first, into the row it fills most tightly), which
is deterministic; the row order is then shuffled with ``seed`` so that it carries no length bias.
"""

from __future__ import annotations

import bisect
import json
import random
from dataclasses import dataclass, field
from typing import Sequence

import torch

from specforge_mcore.data.tokenize import TokenizedSample
from specforge_mcore.errors import UserError

PACKED_FORMAT = "specforge_mcore.packed/1"


@dataclass
class PackedData:
    input_ids: torch.Tensor  # int64 [N, L]
    assistant_mask: torch.Tensor  # bool [N, L]
    position_ids: torch.Tensor  # int64 [N, L], restarting at 0 per document
    document_ids: torch.Tensor  # int32 [N, L], 0, 1, 2, ... per row; padding is the last document
    row_lengths: torch.Tensor  # int32 [N], tokens before the padding
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def max_length(self) -> int:
        return int(self.input_ids.shape[1])

    def row(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "assistant_mask": self.assistant_mask[i],
                "position_ids": self.position_ids[i], "document_ids": self.document_ids[i]}

    def save(self, path: str) -> None:
        from specforge_mcore.fileio import save_safetensors

        # int32 on disk halves the file; ids and positions fit easily.
        tensors = {"input_ids": self.input_ids.to(torch.int32), "assistant_mask": self.assistant_mask,
                   "position_ids": self.position_ids.to(torch.int32), "document_ids": self.document_ids,
                   "row_lengths": self.row_lengths}
        save_safetensors({k: v.contiguous() for k, v in tensors.items()}, path,
                         metadata={"format": PACKED_FORMAT, "stats": json.dumps(self.stats)})

    @classmethod
    def load(cls, path: str) -> "PackedData":
        from specforge_mcore.fileio import open_safetensors

        with open_safetensors(path) as fh:
            metadata = fh.metadata() or {}
            if metadata.get("format") != PACKED_FORMAT:
                raise UserError(f"{path}: not packed data of format {PACKED_FORMAT} "
                                f"(format {metadata.get('format')!r})")
            t = {name: fh.get_tensor(name) for name in fh.keys()}
        return cls(t["input_ids"].long(), t["assistant_mask"], t["position_ids"].long(), t["document_ids"],
                   t["row_lengths"], json.loads(metadata.get("stats", "{}")))


def _best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted: the tightest fit is a bisect away
    for i in order:
        size = lengths[i]
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - size > 0:
            bisect.insort(free, (room - size, row))
    return rows


def pack(samples: Sequence[TokenizedSample], max_length: int, seed: int, pad_id: int = 0,
         pack: bool = True) -> PackedData:
    """Rows of exactly ``max_length`` tokens; ``pack=False`` puts one conversation per row."""
    lengths = [len(s) for s in samples]
    too_long = [i for i, n in enumerate(lengths) if n > max_length or n == 0]
    if too_long:
        raise ValueError(f"sample {too_long[0]} has {lengths[too_long[0]]} tokens; "
                         f"tokenize_conversation truncates to 1..{max_length}")
    rows = _best_fit_decreasing(lengths, max_length) if pack else [[i] for i in range(len(samples))]
    random.Random(seed).shuffle(rows)

    n_rows = len(rows)
    input_ids = torch.full((n_rows, max_length), pad_id, dtype=torch.int64)
    assistant_mask = torch.zeros((n_rows, max_length), dtype=torch.bool)
    position_ids = torch.zeros((n_rows, max_length), dtype=torch.int64)
    document_ids = torch.zeros((n_rows, max_length), dtype=torch.int32)
    row_lengths = torch.zeros(n_rows, dtype=torch.int32)
    positions = torch.arange(max_length)
    for r, members in enumerate(rows):
        at = 0
        for doc, i in enumerate(members):
            n = lengths[i]
            input_ids[r, at:at + n] = samples[i].input_ids
            assistant_mask[r, at:at + n] = samples[i].assistant_mask
            position_ids[r, at:at + n] = positions[:n]
            document_ids[r, at:at + n] = doc
            at += n
        position_ids[r, at:] = positions[:max_length - at]
        document_ids[r, at:] = len(members)
        row_lengths[r] = at

    tokens = sum(lengths)
    stats = {
        "conversations": len(samples),
        "tokens": tokens,
        "assistant_tokens": int(assistant_mask.sum()),
        "rows": n_rows,
        "max_length": max_length,
        "fill_ratio": tokens / (n_rows * max_length) if n_rows else 0.0,
        "packed": pack,
    }
    return PackedData(input_ids, assistant_mask, position_ids, document_ids, row_lengths, stats)
