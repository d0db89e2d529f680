import collections

import pytest
import torch

from specforge_mcore.data.packing import PackedData, pack
from specforge_mcore.data.tokenize import TokenizedSample
from specforge_mcore.errors import UserError

PAD = 2


def make_samples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i, n in enumerate(lengths):
        ids = torch.randint(10, 1000, (n,), generator=g)
        mask = torch.rand(n, generator=g) < 0.6
        mask[-1] = True  # documents end with an assistant token, as real ones do (end of turn)
        samples.append(TokenizedSample(ids, mask, f"s:{i}"))
    return samples


def documents(packed: PackedData):
    """Every (input_ids, mask) document of every row, padding excluded, plus per-row checks."""
    docs = []
    for r in range(len(packed)):
        row = packed.row(r)
        doc_ids = row["document_ids"].tolist()
        assert doc_ids == sorted(doc_ids) and doc_ids[0] == 0  # contiguous 0, 1, 2, ...
        assert sorted(set(doc_ids)) == list(range(max(doc_ids) + 1))
        length = int(packed.row_lengths[r])
        for d in sorted(set(doc_ids)):
            where = (row["document_ids"] == d).nonzero().flatten()
            start, end = int(where[0]), int(where[-1]) + 1
            assert torch.equal(row["position_ids"][start:end], torch.arange(end - start))  # restart per document
            if start >= length:  # the padding document
                assert d == max(doc_ids) and end == packed.max_length
                assert (row["input_ids"][start:end] == PAD).all() and not row["assistant_mask"][start:end].any()
            else:
                docs.append((tuple(row["input_ids"][start:end].tolist()), tuple(row["assistant_mask"][start:end].tolist())))
    return docs


@pytest.mark.parametrize("packed_mode", [True, False])
def test_every_sample_is_one_document_with_its_own_mask(packed_mode):
    samples = make_samples([5, 17, 64, 1, 33, 40, 12, 64, 7, 30])
    packed = pack(samples, 64, seed=3, pad_id=PAD, pack=packed_mode)
    assert packed.input_ids.shape[1] == 64 and packed.input_ids.dtype == torch.int64
    assert packed.assistant_mask.dtype == torch.bool
    assert packed.position_ids.dtype == torch.int64 and packed.document_ids.dtype == torch.int32
    got = collections.Counter(documents(packed))
    want = collections.Counter((tuple(s.input_ids.tolist()), tuple(s.assistant_mask.tolist())) for s in samples)
    assert got == want  # nothing lost, duplicated, split, or given another document's mask
    if not packed_mode:
        assert len(packed) == len(samples)


def test_packing_fills_rows_tightly():
    samples = make_samples([40, 24, 30, 34, 64, 10, 54])  # 40+24, 30+34, 64, 10+54: four full rows
    packed = pack(samples, 64, seed=0, pad_id=PAD)
    assert len(packed) == 4 and packed.stats["fill_ratio"] == 1.0
    assert packed.row_lengths.tolist() == [64] * 4


def test_boundaries_are_where_document_ids_step_and_positions_restart():
    samples = make_samples([10, 20, 30, 5, 50, 3])
    packed = pack(samples, 64, seed=1, pad_id=PAD)
    for r in range(len(packed)):
        doc, pos = packed.document_ids[r], packed.position_ids[r]
        step = (doc[1:] != doc[:-1]).nonzero().flatten() + 1
        restart = (pos[1:] == 0).nonzero().flatten() + 1
        assert torch.equal(step, restart)  # one rule ("same document id") describes attention and positions
        assert ((doc[step] - doc[step - 1]) == 1).all()


def test_deterministic_and_seed_only_reorders_rows():
    samples = make_samples([9, 31, 12, 60, 2, 44, 17, 23, 38, 5, 51])
    a = pack(samples, 64, seed=7, pad_id=PAD)
    b = pack(samples, 64, seed=7, pad_id=PAD)
    c = pack(samples, 64, seed=8, pad_id=PAD)
    for name in ("input_ids", "assistant_mask", "position_ids", "document_ids", "row_lengths"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    rows = lambda p: sorted(tuple(p.input_ids[r].tolist()) for r in range(len(p)))  # noqa: E731
    assert rows(a) == rows(c) and not torch.equal(a.input_ids, c.input_ids)


def test_stats():
    samples = make_samples([10, 20, 30])
    packed = pack(samples, 32, seed=0, pad_id=PAD)
    s = packed.stats
    assert s["conversations"] == 3 and s["tokens"] == 60 and s["rows"] == len(packed) == 2
    assert s["assistant_tokens"] == sum(int(x.assistant_mask.sum()) for x in samples)
    assert s["fill_ratio"] == pytest.approx(60 / 64)


def test_save_load_round_trip(tmp_path):
    packed = pack(make_samples([10, 20, 30, 64]), 64, seed=0, pad_id=PAD)
    path = str(tmp_path / "train.safetensors")
    packed.save(path)
    loaded = PackedData.load(path)
    for name in ("input_ids", "assistant_mask", "position_ids", "document_ids", "row_lengths"):
        assert torch.equal(getattr(loaded, name), getattr(packed, name)), name
        assert getattr(loaded, name).dtype == getattr(packed, name).dtype, name
    assert loaded.stats == packed.stats


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "other.safetensors")
    save_file({"x": torch.zeros(2)}, path)
    with pytest.raises(UserError, match="other.safetensors"):
        PackedData.load(path)


def test_empty_input_gives_zero_rows():
    packed = pack([], 16, seed=0, pad_id=PAD)
    assert len(packed) == 0 and packed.input_ids.shape == (0, 16)
