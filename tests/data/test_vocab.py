import pytest
import torch

from specforge_mcore.data.packing import pack
from specforge_mcore.data.tokenize import TokenizedSample
from specforge_mcore.data.vocab import DraftVocab, build_draft_vocab, token_counts
from specforge_mcore.errors import UserError


def test_d2t_offsets_and_t2d_mask():
    vocab = DraftVocab.from_target_ids(torch.tensor([7, 2, 11, 3]), target_vocab_size=16)
    assert vocab.draft_ids.tolist() == [2, 3, 7, 11]
    assert vocab.d2t.tolist() == [2 - 0, 3 - 1, 7 - 2, 11 - 3]  # target_id(i) - i
    assert vocab.d2t.dtype == torch.int64 and vocab.t2d.dtype == torch.bool
    assert vocab.t2d.nonzero().flatten().tolist() == [2, 3, 7, 11]
    # Mapping a draft argmax back to the target id, as the loss and SGLang do.
    draft_argmax = torch.tensor([0, 3, 2])
    assert (draft_argmax + vocab.d2t[draft_argmax]).tolist() == [2, 11, 7]


def test_top_by_assistant_frequency_ties_by_lower_id():
    counts = torch.zeros(10, dtype=torch.int64)
    counts[[9, 4, 6, 1]] = torch.tensor([5, 5, 3, 1])
    vocab = build_draft_vocab(counts, target_vocab_size=10, draft_vocab_size=3)
    assert vocab.draft_ids.tolist() == [4, 6, 9]  # 4 and 9 tie at 5, then 6; 1 is dropped
    tie = torch.zeros(10, dtype=torch.int64)
    tie[[8, 3, 5]] = 2
    assert build_draft_vocab(tie, 10, 2).draft_ids.tolist() == [3, 5]


def test_fill_with_other_tokens_then_lowest_ids():
    assistant = torch.zeros(12, dtype=torch.int64)
    assistant[[10, 7]] = torch.tensor([1, 4])
    everything = assistant.clone()
    everything[[2, 9, 11]] += torch.tensor([3, 8, 3])
    vocab = build_draft_vocab((assistant, everything), 12, 7)
    # 7, 10 (assistant) + 9 (8), 2 and 11 (3 each, lower id first) + 0, 1 (unseen, lowest ids)
    assert vocab.draft_ids.tolist() == [0, 1, 2, 7, 9, 10, 11]


def test_counts_from_packed_data_skip_padding():
    pad = 0
    samples = [TokenizedSample(torch.tensor([5, 6, 7]), torch.tensor([False, True, True])),
               TokenizedSample(torch.tensor([7, 8]), torch.tensor([False, True]))]
    packed = pack(samples, 8, seed=0, pad_id=pad)
    assistant, everything = token_counts(packed, 10)
    assert assistant.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 0]
    assert everything.tolist() == [0, 0, 0, 0, 0, 1, 1, 2, 1, 0]  # no count for the 3 pad tokens
    vocab = build_draft_vocab(packed, 10, 4)
    assert vocab.draft_ids.tolist() == [5, 6, 7, 8]  # 6, 7, 8 from assistant text, then 5
    assert vocab.coverage(assistant) == 1.0
    assert build_draft_vocab(packed, 10, 2).coverage(assistant) == pytest.approx(2 / 3)


def test_save_load_round_trip(tmp_path):
    vocab = DraftVocab.from_target_ids(torch.tensor([0, 5, 9, 31]), 32)
    path = str(tmp_path / "vocab.safetensors")
    vocab.save(path, metadata={"coverage": 0.5})
    loaded = DraftVocab.load(path, target_vocab_size=32)
    assert torch.equal(loaded.d2t, vocab.d2t) and torch.equal(loaded.t2d, vocab.t2d)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as fh:
        assert set(fh.keys()) == {"d2t", "t2d"}
        assert fh.metadata()["draft_vocab_size"] == "4" and fh.metadata()["coverage"] == "0.5"
    with pytest.raises(UserError, match="vocab.safetensors.*vocab_size is 64"):
        DraftVocab.load(path, target_vocab_size=64)


def test_inconsistent_files_name_the_file(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "bad_vocab.safetensors")
    t2d = torch.zeros(8, dtype=torch.bool)
    t2d[[1, 2]] = True
    save_file({"d2t": torch.tensor([1, 2]), "t2d": t2d}, path)  # ids 1, 3: t2d says 1, 2
    with pytest.raises(UserError, match="bad_vocab.safetensors: t2d does not mark"):
        DraftVocab.load(path)
    save_file({"d2t": torch.tensor([3, 0]), "t2d": t2d}, path)  # ids 3, 1: not increasing
    with pytest.raises(UserError, match="strictly increasing"):
        DraftVocab.load(path)
    save_file({"d2t": torch.tensor([1, 1], dtype=torch.int32), "t2d": t2d}, path)
    with pytest.raises(UserError, match="int64"):
        DraftVocab.load(path)
    with pytest.raises(UserError, match="does not exist"):
        DraftVocab.load(str(tmp_path / "missing.safetensors"))


def test_draft_vocab_larger_than_target_is_an_error():
    with pytest.raises(UserError, match="draft_vocab_size 20"):
        build_draft_vocab(torch.zeros(10, dtype=torch.int64), 10, 20)
