"""The trainer's use of a feature store (``data.features``): read the training rows' features from a
complete store instead of running the target, or write them while the first epoch runs online
(``train.cache_features``) and read them from the second epoch on.

Rows are the data cache's packed rows; a rank stores and reads the rows it trains on (``rows.py``), so a
store written at one world size is read at any other. Held-out evaluation still runs the target.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from specforge_mcore import collectives
from specforge_mcore.errors import UserError
from specforge_mcore.features.store import FeatureStore, FeatureStoreWriter, finalize, stored_rows
from specforge_mcore.fileio import COMPLETE


class FeatureCache:
    def __init__(self, root: str, identity: dict, rank: int, is_main: bool, write: bool, quiet: bool = False):
        self.root, self.identity, self.is_main, self.quiet = root, identity, is_main, quiet
        self.reader: Optional[FeatureStore] = None
        self.writer: Optional[FeatureStoreWriter] = None
        if os.path.isfile(os.path.join(root, COMPLETE)):
            self.reader = FeatureStore(root, identity)
            self._say(f"features of the training rows from the store {root} ({len(self.reader)} rows): "
                      "the target runs for held-out evaluation only")
        elif write:
            self.writer = FeatureStoreWriter(root, identity, rank)
            self._say(f"writing the first epoch's features to {root}; later epochs read them from there")
        else:
            raise UserError(f"data.features={root}: not a complete feature store (no {COMPLETE}); set "
                            "train.cache_features=true to write it during the first epoch")

    def _say(self, text: str) -> None:
        if self.is_main and not self.quiet:
            print(text, flush=True)

    def covers(self, rows: torch.Tensor) -> bool:
        """Whether every row of a round (all ranks' rows: every rank decides alike, so the model-parallel
        group runs the target together or not at all) is in a complete store. An epoch's order can bring
        rows the first epoch left out of its last, partial batch: those rounds run the target."""
        return self.reader is not None and all(r in self.reader.index for r in rows.tolist())

    def read(self, rows: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        return self.reader.read(rows)

    def write(self, rows: torch.Tensor, aux: list[torch.Tensor], final: torch.Tensor, argmax: torch.Tensor,
              skip: frozenset = frozenset()) -> None:
        """Store the rows not stored yet by this rank, nor listed in ``skip`` (rows other ranks stored)."""
        if self.writer is None:
            return
        done = self.writer.done | skip
        keep = torch.tensor([i for i, r in enumerate(rows.tolist()) if r not in done], dtype=torch.long)
        if len(keep):
            self.writer.add(rows[keep], [a[keep.to(a.device)] for a in aux], final[keep.to(final.device)],
                            argmax[keep.to(argmax.device)])

    def stored_by_all(self) -> frozenset:
        """Every rank's stored rows, after each flushed its buffer (a collective)."""
        self.writer.flush()
        collectives.barrier()
        return frozenset(stored_rows(self.root))

    def end_of_epoch(self, epoch_rows: set[int]) -> None:
        """After the first epoch: finish the store and read from it; if rows are missing (a resume skipped
        their steps), say so and keep running the target."""
        if self.writer is None:
            return
        self.writer.close()
        collectives.barrier()
        error = None
        if self.is_main:
            try:
                summary = finalize(self.root, epoch_rows)
                self._say(f"feature store {self.root} complete: {summary['rows']} rows, "
                          f"{summary['bytes'] / 2**20:.1f} MiB")
            except UserError as exc:
                error = str(exc)
        flag = torch.tensor([0 if error is None else 1])
        collectives.broadcast(flag, src=0)
        self.writer = None
        if int(flag):
            self._say(f"note: the feature store stays unfinished ({error}); the target keeps running")
            return
        self.reader = FeatureStore(self.root, self.identity)
