"""The trainer's use of a feature store (``data.features``): read the rows' features from a complete store
instead of running the target, or write them while the first epoch runs online (``train.cache_features``)
and read them from the second epoch on.

Two stores: the training rows in ``data.features`` and the held-out rows in its ``heldout/`` directory
(written by ``dump-features``, or by the first held-out evaluation of a run that caches). Rows are the data
cache's packed rows of each split; a rank stores and reads the rows it trains on (``rows.py``), so a store
written at one world size is read at any other. When both stores cover every row the run reads, the
trainer does not load the target at all (``target/host.py: StoredTarget``; ``stores_cover_run``).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from specforge_mcore import collectives
from specforge_mcore.errors import UserError
from specforge_mcore.features.store import INDEX, FeatureStore, FeatureStoreWriter, finalize, stored_rows
from specforge_mcore.fileio import COMPLETE, read_json

HELDOUT = "heldout"


def heldout_identity(identity: dict) -> dict:
    """The held-out store's identity: the training store's, for the held-out split of the same data."""
    return {**identity, "data": {**identity["data"], "split": HELDOUT}}


def _complete_rows(root: str) -> Optional[set[int]]:
    """The rows of the complete store at ``root``; None when there is none."""
    if not os.path.isfile(os.path.join(root, COMPLETE)):
        return None
    return {int(r) for r in read_json(os.path.join(root, INDEX), f"{root}: no {INDEX}")}


def stores_cover_run(root: str, train_rows: int, heldout_rows: int) -> bool:
    """Whether complete stores at ``root`` hold every training row (``0..train_rows-1``) and the held-out rows
    that evaluation reads (``0..heldout_rows-1``): then the target need not be loaded. Whether they were
    dumped from this run's target and data is checked when they are opened (``FeatureCache``)."""
    train = _complete_rows(root)
    if train is None or not set(range(train_rows)) <= train:
        return False
    if heldout_rows == 0:
        return True
    heldout = _complete_rows(os.path.join(root, HELDOUT))
    return heldout is not None and set(range(heldout_rows)) <= heldout


class FeatureCache:
    def __init__(self, root: str, identity: dict, rank: int, is_main: bool, write: bool, quiet: bool = False):
        self.root, self.identity, self.is_main, self.quiet = root, identity, is_main, quiet
        self.reader: Optional[FeatureStore] = None
        self.writer: Optional[FeatureStoreWriter] = None
        self.heldout_reader: Optional[FeatureStore] = None
        self.heldout_writer: Optional[FeatureStoreWriter] = None
        heldout = os.path.join(root, HELDOUT)
        if os.path.isfile(os.path.join(root, COMPLETE)):
            self.reader = FeatureStore(root, identity)
        elif write:
            self.writer = FeatureStoreWriter(root, identity, rank)
        else:
            raise UserError(f"data.features={root}: not a complete feature store (no {COMPLETE}); set "
                            "train.cache_features=true to write it during the first epoch")
        if os.path.isfile(os.path.join(heldout, COMPLETE)):
            self.heldout_reader = FeatureStore(heldout, heldout_identity(identity))
        elif write:
            self.heldout_writer = FeatureStoreWriter(heldout, heldout_identity(identity), rank)
        train = (f"features of the training rows from the store {root} ({len(self.reader)} rows)"
                 if self.reader is not None else
                 f"writing the first epoch's features to {root}; later epochs read them from there")
        held = (f"held-out rows from {heldout} ({len(self.heldout_reader)} rows)" if self.heldout_reader is not None
                else "the first held-out evaluation writes its rows' features to " + heldout
                if self.heldout_writer is not None else "held-out evaluation runs the target")
        self._say(f"{train}; {held}")

    def _split(self, train: bool) -> tuple[Optional[FeatureStore], Optional[FeatureStoreWriter]]:
        return (self.reader, self.writer) if train else (self.heldout_reader, self.heldout_writer)

    def _say(self, text: str) -> None:
        if self.is_main and not self.quiet:
            print(text, flush=True)

    def covers(self, rows: torch.Tensor, train: bool = True) -> bool:
        """Whether every row of a round (all ranks' rows: every rank decides alike, so the model-parallel
        group runs the target together or not at all) of the training (or held-out) split is in a complete
        store. A caching run stores the rows its first epoch left out at the end of that epoch
        (``Trainer._dump_split``); a store that could not be finished leaves those rounds to the target."""
        reader = self._split(train)[0]
        return reader is not None and all(r in reader.index for r in rows.tolist())

    def read(self, rows: torch.Tensor, train: bool = True) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        return self._split(train)[0].read(rows)

    def write(self, rows: torch.Tensor, aux: list[torch.Tensor], final: torch.Tensor, argmax: torch.Tensor,
              skip: frozenset = frozenset(), train: bool = True) -> None:
        """Store the rows not stored yet by this rank, nor listed in ``skip`` (rows other ranks stored)."""
        writer = self._split(train)[1]
        if writer is None:
            return
        done = writer.done | skip
        keep = torch.tensor([i for i, r in enumerate(rows.tolist()) if r not in done], dtype=torch.long)
        if len(keep):
            writer.add(rows[keep], [a[keep.to(a.device)] for a in aux], final[keep.to(final.device)],
                       argmax[keep.to(argmax.device)])

    def stored_by_all(self, train: bool = True) -> frozenset:
        """Every rank's stored rows of a split, after each flushed its buffer (a collective)."""
        self._split(train)[1].flush()
        collectives.barrier()
        return frozenset(stored_rows(self.root if train else os.path.join(self.root, HELDOUT)))

    def end_of_epoch(self, epoch_rows: set[int]) -> None:
        """After the first epoch: finish the training store and read from it; if rows are missing (a resume
        skipped their steps), say so and keep running the target."""
        if self.writer is None:
            return
        self.reader = self._finish(self.writer, self.root, self.identity, epoch_rows)
        self.writer = None

    def end_of_evaluation(self, heldout_rows: set[int]) -> None:
        """After the first held-out evaluation of a run that caches: finish the held-out store."""
        if self.heldout_writer is None:
            return
        root = os.path.join(self.root, HELDOUT)
        self.heldout_reader = self._finish(self.heldout_writer, root, heldout_identity(self.identity), heldout_rows)
        self.heldout_writer = None

    def _finish(self, writer: FeatureStoreWriter, root: str, identity: dict, rows: set[int]) -> Optional[FeatureStore]:
        writer.close()
        collectives.barrier()
        error = None
        if self.is_main:
            try:
                summary = finalize(root, rows)
                self._say(f"feature store {root} complete: {summary['rows']} rows, "
                          f"{summary['bytes'] / 2**20:.1f} MiB")
            except UserError as exc:
                error = str(exc)
        flag = torch.tensor([0 if error is None else 1])
        collectives.broadcast(flag, src=0)
        if int(flag):
            self._say(f"note: the feature store stays unfinished ({error}); the target keeps running")
            return None
        return FeatureStore(root, identity)
