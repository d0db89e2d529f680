"""The offline feature store on disk: shards written by every rank, resumable, checksummed, any-world reads.

Layout of a store directory::

    store.json                      what the features are of: layout, target, capture layers, tokenizer, data
    shards/rank00000-000000.safetensors   rows int64 [n], aux [n, C, L, H], final [n, L, H], argmax int32 [n, L]
    shards/rank00000.jsonl          append-only: one line per finished shard (file, rows, bytes, SHA-256)
    index.json, MANIFEST.json, COMPLETE    written by ``finalize`` once every rank is done
    heldout/                        the held-out rows' store, the same layout (``features/cache.py``)

A shard file is written whole and fsynced before its line is appended, so after a crash a shard without a
line is discarded and the rows it held are dumped again: a rerun skips exactly the rows that are safely
on disk (``FeatureStoreWriter.done``). Rows are the data cache's packed rows, named by their index in it;
any world size can read a store written by any other. A store whose identity differs from the run reading
it (another target, capture layers, tokenizer or data) is refused by name. Every shard's size is checked
when the store is opened and its SHA-256 the first time it is read.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional, Union

import torch

from specforge_mcore.errors import UserError
from specforge_mcore.features.layout import StoreLayout
from specforge_mcore.fileio import (COMPLETE, open_safetensors, read_json, save_safetensors, sha256_file, write_bytes,
                                    write_manifest)

IDENTITY = "store.json"
INDEX = "index.json"
SHARDS = "shards"
FORMAT = 1
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def store_identity(hidden_size: int, captures: int, dtype: str, max_length: int, target: dict,
                   capture_layer_ids: list[int], tokenizer: dict, data: dict) -> dict:
    """What a store holds features of; a reader's must equal the writer's key by key."""
    if dtype not in DTYPES:
        raise UserError(f"feature store dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return {"format": FORMAT, "hidden_size": hidden_size, "captures": captures, "dtype": dtype,
            "max_length": max_length, "target": target, "capture_layer_ids": list(capture_layer_ids),
            "tokenizer": tokenizer, "data": data}


def layout_of(identity: dict) -> StoreLayout:
    """The per-token layout of the store ``identity`` describes."""
    return StoreLayout(identity["hidden_size"], identity["captures"],
                       torch.tensor([], dtype=DTYPES[identity["dtype"]]).element_size())


def check_identity(root: str, stored: dict, expected: dict) -> None:
    for key in expected:
        if stored.get(key) != expected[key]:
            raise UserError(f"{os.path.join(root, IDENTITY)}: the store was dumped with {key}={stored.get(key)!r}, "
                            f"but this run has {key}={expected[key]!r}; dump the features again for this run "
                            "(or point data.features at the store made for it)")


class FeatureStoreWriter:
    """One rank's writer. ``add`` buffers rows; every ``rows_per_shard`` rows become one shard file."""

    def __init__(self, root: str, identity: dict, rank: int, rows_per_shard: int = 64):
        self.root, self.rank, self.rows_per_shard = root, rank, rows_per_shard
        self.dtype = DTYPES[identity["dtype"]]
        self.bytes_per_token = layout_of(identity).bytes_per_token
        os.makedirs(os.path.join(root, SHARDS), exist_ok=True)
        path = os.path.join(root, IDENTITY)
        if os.path.isfile(path):
            check_identity(root, read_json(path, f"{path}: missing"), identity)
        elif rank == 0:
            write_bytes(path, (json.dumps(identity, indent=1) + "\n").encode())
        self.ledger = os.path.join(root, SHARDS, f"rank{rank:05d}.jsonl")
        self.shards = _read_ledger(self.ledger)
        if self.shards or os.path.isfile(self.ledger):  # drop a line cut off by a crash before appending after it
            tmp = self.ledger + ".tmp"
            write_bytes(tmp, "".join(json.dumps(entry) + "\n" for entry in self.shards).encode())
            os.replace(tmp, self.ledger)
        self._discard_unlisted()
        self._buffer: list[tuple[torch.Tensor, ...]] = []

    def _discard_unlisted(self) -> None:
        """A shard file with no ledger line was cut off by a crash: its rows are dumped again."""
        listed = {s["file"] for s in self.shards}
        prefix = f"rank{self.rank:05d}-"
        for name in os.listdir(os.path.join(self.root, SHARDS)):
            if name.startswith(prefix) and name not in listed:
                os.remove(os.path.join(self.root, SHARDS, name))

    @property
    def done(self) -> set[int]:
        """Rows of this rank in the store or waiting in the buffer for the next shard (a new writer after a
        crash starts from the rows safely stored)."""
        return {row for shard in self.shards for row in shard["rows"]} | \
            {row for part in self._buffer for row in part[0].tolist()}

    def add(self, rows: torch.Tensor, aux: list[torch.Tensor], final: torch.Tensor, argmax: torch.Tensor) -> None:
        """``rows`` [n] packed-row ids; ``aux`` C tensors [n, L, H]; ``final`` [n, L, H]; ``argmax`` [n, L]."""
        self._buffer.append((rows.to("cpu", torch.int64), torch.stack([a.to("cpu", self.dtype) for a in aux], 1),
                             final.to("cpu", self.dtype), argmax.to("cpu", torch.int32)))
        if sum(len(b[0]) for b in self._buffer) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        rows, aux, final, argmax = (torch.cat(parts) for parts in zip(*self._buffer))
        self._buffer = []
        name = f"rank{self.rank:05d}-{len(self.shards):06d}.safetensors"
        path = os.path.join(self.root, SHARDS, name)
        save_safetensors({"rows": rows, "aux": aux.contiguous(), "final": final.contiguous(),
                          "argmax": argmax.contiguous()}, path)
        entry = {"file": name, "rows": rows.tolist(), "bytes": os.path.getsize(path), "sha256": sha256_file(path)}
        with open(self.ledger, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.shards.append(entry)

    def close(self) -> None:
        self.flush()


def _read_ledger(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    shards = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            shards.append(json.loads(line))
        except json.JSONDecodeError:
            if i != last:  # only the line being appended when the writer died may be cut
                raise UserError(f"{path}:{i + 1}: not a JSON line (the ledger is damaged)") from None
    return shards


def stored_rows(root: str) -> set[int]:
    """The rows every rank's ledger lists so far."""
    shard_dir = os.path.join(root, SHARDS)
    return {row for ledger in os.listdir(shard_dir) if ledger.endswith(".jsonl")
            for shard in _read_ledger(os.path.join(shard_dir, ledger)) for row in shard["rows"]}


def finalize(root: str, expected_rows: Union[int, Iterable[int], None] = None) -> dict:
    """Merge every rank's ledger into ``index.json`` (row -> shard, position), write the manifest and mark the
    store COMPLETE. A row stored twice or, with ``expected_rows`` (a count or the row ids), a row missing is
    an error."""
    shard_dir = os.path.join(root, SHARDS)
    index: dict[int, tuple[str, int]] = {}
    for ledger in sorted(f for f in os.listdir(shard_dir) if f.endswith(".jsonl")):
        for shard in _read_ledger(os.path.join(shard_dir, ledger)):
            for position, row in enumerate(shard["rows"]):
                if row in index:
                    raise UserError(f"{root}: row {row} is stored twice ({index[row][0]} and {shard['file']})")
                index[row] = (shard["file"], position)
    if expected_rows is not None:
        expected = set(range(expected_rows)) if isinstance(expected_rows, int) else set(expected_rows)
        missing = sorted(expected - set(index))
        if missing:
            raise UserError(f"{root}: {len(missing)} of {len(expected)} rows have no features yet "
                            f"(first {missing[:5]}); run dump-features again to finish it")
    write_bytes(os.path.join(root, INDEX), (json.dumps({str(r): v for r, v in sorted(index.items())}) + "\n").encode())
    write_manifest(root, exclude=(COMPLETE,), exclude_dirs=("heldout",))  # the held-out store is its own
    write_bytes(os.path.join(root, COMPLETE), b"")
    return {"rows": len(index), "bytes": sum(os.path.getsize(os.path.join(shard_dir, f)) for f in os.listdir(shard_dir))}


class FeatureStore:
    """Read features by packed-row id."""

    def __init__(self, root: str, expected: Optional[dict] = None):
        self.root = root
        if not os.path.isfile(os.path.join(root, COMPLETE)):
            raise UserError(f"{root}: not a complete feature store (no {COMPLETE}): dump-features did not finish "
                            "there; run it again to complete it")
        self.identity = read_json(os.path.join(root, IDENTITY), f"{root}: no {IDENTITY}")
        if expected is not None:
            check_identity(root, self.identity, expected)
        self.index = {int(r): (f, p) for r, (f, p) in read_json(os.path.join(root, INDEX), f"{root}: no {INDEX}").items()}
        manifest = read_json(os.path.join(root, "MANIFEST.json"), f"{root}: no MANIFEST.json")["files"]
        self.expected = {rel: entry for rel, entry in manifest.items() if rel.startswith(SHARDS + "/")}
        for rel, entry in self.expected.items():
            path = os.path.join(root, rel)
            size = os.path.getsize(path) if os.path.isfile(path) else None
            if size != entry["bytes"]:
                raise UserError(f"feature store {root}: {rel} has {size} bytes, MANIFEST.json says {entry['bytes']} "
                                "(missing, truncated or replaced)")
        self._verified: set[str] = set()
        self._handles: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.index)

    def _handle(self, name: str):
        rel = f"{SHARDS}/{name}"
        if rel not in self._verified:
            if sha256_file(os.path.join(self.root, rel)) != self.expected[rel]["sha256"]:
                raise UserError(f"feature store {self.root}: {rel} does not match its SHA-256 in MANIFEST.json "
                                "(corrupted); dump its rows again")
            self._verified.add(rel)
            self._handles[name] = open_safetensors(os.path.join(self.root, rel))
        return self._handles[name]

    def read(self, rows: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(aux: C tensors [n, L, H], final [n, L, H], argmax int64 [n, L]) of packed rows ``rows``, in order."""
        aux, final, argmax = [], [], []
        for row in rows.tolist():
            if row not in self.index:
                raise UserError(f"feature store {self.root}: row {row} has no features ({len(self.index)} rows "
                                "stored); was it dumped from this data?")
            name, position = self.index[row]
            handle = self._handle(name)
            aux.append(handle.get_slice("aux")[position:position + 1])
            final.append(handle.get_slice("final")[position:position + 1])
            argmax.append(handle.get_slice("argmax")[position:position + 1])
        aux_all = torch.cat(aux)
        return list(aux_all.unbind(1)), torch.cat(final), torch.cat(argmax).long()
