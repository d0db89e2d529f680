"""The feature store on disk: rows written by several ranks read back by row, a rerun after a crash
skips exactly the rows safely stored, and a store that does not fit the run or lost bytes is named."""

import os

import pytest
import torch

from specforge_mcore.errors import UserError
from specforge_mcore.features.layout import StoreLayout
from specforge_mcore.features.store import FeatureStore, FeatureStoreWriter, finalize, store_identity

L, H, C = 5, 6, 3


def identity(dtype="float32", capture=(1, 3, 4)):
    return store_identity(H, C, dtype, L, {"hidden_size": H},
                          list(capture), {"vocab_size": 100}, {"key": "abc"})


def row_features(row: int):
    """Features that depend only on the row id: ([C] x [L, H], [L, H], [L])."""
    gen = torch.Generator().manual_seed(1000 + row)
    return [torch.randn(L, H, generator=gen) for _ in range(C)], torch.randn(L, H, generator=gen), \
        torch.randint(0, 100, (L,), generator=gen)


def batch(rows):
    per_row = [row_features(r) for r in rows]
    return ([torch.stack([f[0][c] for f in per_row]) for c in range(C)], torch.stack([f[1] for f in per_row]),
            torch.stack([f[2] for f in per_row]))


def write(root, rank, rows, dtype="float32", rows_per_shard=3, stop_after=None):
    writer = FeatureStoreWriter(str(root), identity(dtype), rank, rows_per_shard)
    todo = [r for r in rows if r not in writer.done]
    for n, chunk in enumerate(torch.tensor(todo, dtype=torch.int64).split(2)):
        if stop_after is not None and n == stop_after:
            return writer  # "killed": the buffer is lost, nothing flushed
        writer.add(chunk, *batch(chunk.tolist()))
    writer.close()
    return writer


def check_rows(store, rows, dtype):
    aux, final, argmax = store.read(torch.tensor(rows))
    cast = getattr(torch, dtype)
    assert len(aux) == C and final.shape == (len(rows), L, H) and argmax.dtype == torch.int64
    for i, row in enumerate(rows):
        ref_aux, ref_final, ref_argmax = row_features(row)
        assert torch.equal(final[i], ref_final.to(cast)) and torch.equal(argmax[i], ref_argmax)
        assert all(torch.equal(aux[c][i], ref_aux[c].to(cast)) for c in range(C))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rows_from_two_ranks_read_back_in_any_order(tmp_path, dtype):
    write(tmp_path, 0, [0, 2, 4, 6, 8], dtype)
    write(tmp_path, 1, [1, 3, 5, 7, 9], dtype)
    summary = finalize(str(tmp_path), expected_rows=10)
    assert summary["rows"] == 10
    store = FeatureStore(str(tmp_path), identity(dtype))
    check_rows(store, [7, 0, 9, 4, 4], dtype)
    # bytes on disk: the layout's bytes per token (fp32 4 B / bf16 2 B; int32 argmax), plus the row ids
    per_token = StoreLayout(H, C, 4 if dtype == "float32" else 2).bytes_per_token
    assert 10 * L * per_token < summary["bytes"] < 10 * L * per_token + 4096


def test_a_rerun_after_a_crash_stores_each_row_once(tmp_path):
    rows = list(range(12))
    first = write(tmp_path, 0, rows, stop_after=3)  # 6 rows added: 4 flushed as one shard, 2 lost in the buffer
    assert sorted(r for shard in first.shards for r in shard["rows"]) == list(range(4))
    assert sorted(first.done) == list(range(6))  # the two in the buffer count for this writer only
    shard_dir = tmp_path / "shards"
    (shard_dir / "rank00000-000001.safetensors").write_bytes(b"cut off")  # a shard whose line never came
    with open(shard_dir / "rank00000.jsonl", "a") as fh:
        fh.write('{"file": "rank00000-0000')  # the line being appended when the writer died
    with pytest.raises(UserError, match="not a complete feature store"):
        FeatureStore(str(tmp_path))
    second = write(tmp_path, 0, rows)
    assert sorted(second.done) == rows
    finalize(str(tmp_path), expected_rows=12)
    check_rows(FeatureStore(str(tmp_path)), rows, "float32")


def test_a_store_for_another_run_or_an_unfinished_one_is_refused(tmp_path):
    write(tmp_path, 0, [0, 1, 2])
    with pytest.raises(UserError, match=r"3 of 4 rows|1 of 4 rows have no features yet \(first \[3\]\)"):
        finalize(str(tmp_path), expected_rows=4)
    finalize(str(tmp_path))
    with pytest.raises(UserError, match=r"store.json: the store was dumped with capture_layer_ids=\[1, 3, 4\], but "
                                        r"this run has capture_layer_ids=\[1, 2, 3\]"):
        FeatureStore(str(tmp_path), identity(capture=(1, 2, 3)))
    with pytest.raises(UserError, match="dumped with capture_layer_ids"):
        FeatureStoreWriter(str(tmp_path), identity(capture=(1, 2, 3)), 0)
    with pytest.raises(UserError, match=r"row 7 has no features \(3 rows stored\)"):
        FeatureStore(str(tmp_path)).read(torch.tensor([7]))


def test_truncated_or_corrupted_shard_is_named(tmp_path):
    write(tmp_path, 0, [0, 1, 2, 3])
    finalize(str(tmp_path))
    shard = tmp_path / "shards" / "rank00000-000000.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(UserError, match=r"shards/rank00000-000000.safetensors has \d+ bytes, MANIFEST.json says"):
        FeatureStore(str(tmp_path))
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    store = FeatureStore(str(tmp_path))  # sizes agree: the checksum is read with the shard
    with pytest.raises(UserError, match=r"rank00000-000000.safetensors does not match its SHA-256"):
        store.read(torch.tensor([0]))
    assert os.path.getsize(shard) == len(data)
