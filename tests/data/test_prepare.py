"""prepare_data on the tiny config: the split, the cache (hits, and misses on every input that matters), the CLIs."""

import json
import os
import shutil

import torch

from specforge_mcore.cli import main as cli_main
from specforge_mcore.config import load_config
from specforge_mcore.data import prepare as prepare_module
from specforge_mcore.data.prepare import cache_root, prepare_data
from specforge_mcore.data.vocab import DraftVocab

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "tiny.yaml")
CHAT = os.path.join(HERE, "corpus", "tiny_chat.jsonl")


def tiny(smollm2_dir, tmp_path, *overrides):
    return load_config(TINY, [f"target.hf_dir={smollm2_dir}", f"data.train_files={json.dumps([CHAT])}",
                              f"data.cache_dir={tmp_path / 'cache'}", *overrides])


def entries(cfg):
    return sorted(e for e in os.listdir(cache_root(cfg)) if not e.startswith("."))


def documents(packed):
    docs = set()
    for r in range(len(packed)):
        for d in packed.document_ids[r].unique().tolist():
            sel = (packed.document_ids[r] == d) & (torch.arange(packed.max_length) < packed.row_lengths[r])
            if sel.any():
                docs.add(tuple(packed.input_ids[r][sel].tolist()))
    return docs


def forbid_tokenising(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("tokenised although the cache holds this data")

    monkeypatch.setattr(prepare_module, "tokenize_conversations", fail)


def test_split_is_deterministic_and_disjoint(smollm2_dir, tmp_path):
    cfg = tiny(smollm2_dir, tmp_path)
    train, evaluation, bad = prepare_data(cfg)
    assert bad.total == 0
    assert evaluation.stats["conversations"] == 4 and train.stats["conversations"] == 28  # ceil(0.125 * 32)
    assert len(documents(train)) == 28 and len(documents(evaluation)) == 4
    assert not documents(train) & documents(evaluation)
    assert train.max_length == 256 and 0 < train.stats["assistant_tokens"] < train.stats["tokens"]
    other = prepare_data(tiny(smollm2_dir, tmp_path / "other", "data.seed=1"))[1]
    assert documents(other) != documents(evaluation)


def test_cache_hit_and_misses(smollm2_dir, tmp_path, monkeypatch):
    cfg = tiny(smollm2_dir, tmp_path)
    first = prepare_data(cfg)[0]
    assert len(entries(cfg)) == 1

    with monkeypatch.context() as m:
        forbid_tokenising(m)
        again = prepare_data(tiny(smollm2_dir, tmp_path))[0]
        assert torch.equal(again.input_ids, first.input_ids) and again.stats == first.stats
        # on_bad_sample and draft settings do not change the data
        prepare_data(tiny(smollm2_dir, tmp_path, "data.on_bad_sample=error", "draft.draft_vocab_size=64"))

    shorter = prepare_data(tiny(smollm2_dir, tmp_path, "data.max_length=128"))[0]
    assert shorter.max_length == 128 and len(entries(cfg)) == 2
    prepare_data(tiny(smollm2_dir, tmp_path, "data.loss_on=last_assistant_turn"))
    prepare_data(tiny(smollm2_dir, tmp_path, "data.pack=false"))
    assert len(entries(cfg)) == 4

    # Another tokenizer (same files but a different chat template) is another entry with other ids.
    tok_dir = tmp_path / "tokenizer"
    tok_dir.mkdir()
    for name in os.listdir(smollm2_dir):
        if name.startswith(("tokenizer", "chat_template", "config")):
            shutil.copy(os.path.join(smollm2_dir, name), tok_dir / name)
    template = (tok_dir / "chat_template.jinja").read_text()
    (tok_dir / "chat_template.jinja").write_text(template.replace("named SmolLM", "named Tiny"))
    changed = prepare_data(tiny(smollm2_dir, tmp_path, f"target.tokenizer_dir={tok_dir}"))[0]
    assert len(entries(cfg)) == 5 and not torch.equal(changed.input_ids, first.input_ids)

    # Changing a data file's content is a miss too.
    data = tmp_path / "chat.jsonl"
    lines = open(CHAT).read().splitlines(keepends=True)
    data.write_text("".join(lines))
    prepare_data(tiny(smollm2_dir, tmp_path, f"data.train_files=[{data}]"))
    data.write_text("".join(lines[:-1]))
    fewer = prepare_data(tiny(smollm2_dir, tmp_path, f"data.train_files=[{data}]"))
    assert len(entries(cfg)) == 7
    assert fewer[0].stats["conversations"] + fewer[1].stats["conversations"] == 31


def test_eval_files_and_max_samples(smollm2_dir, tmp_path):
    cfg = tiny(smollm2_dir, tmp_path, f"data.eval_files={json.dumps([CHAT])}", "data.max_samples=10")
    train, evaluation, _ = prepare_data(cfg)
    assert train.stats["conversations"] == 10 and evaluation.stats["conversations"] == 32


def test_unpacked_rows_hold_one_conversation_each(smollm2_dir, tmp_path):
    train = prepare_data(tiny(smollm2_dir, tmp_path, "data.pack=false"))[0]
    assert len(train) == 28
    assert (train.document_ids.max(dim=1).values <= 1).all()  # the conversation, then padding


def test_default_cache_location_follows_the_environment(smollm2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECFORGE_MCORE_CACHE", str(tmp_path / "env-cache"))
    cfg = load_config(TINY, [f"target.hf_dir={smollm2_dir}", f"data.train_files={json.dumps([CHAT])}"])
    assert cache_root(cfg) == str(tmp_path / "env-cache" / "data")
    monkeypatch.delenv("SPECFORGE_MCORE_CACHE")
    monkeypatch.chdir(tmp_path)
    assert cache_root(cfg) == str(tmp_path / ".cache" / "data")


def test_prepare_data_and_build_vocab_commands(smollm2_dir, tmp_path, capsys):
    common = ["--config", TINY, f"target.hf_dir={smollm2_dir}", f"data.train_files={json.dumps([CHAT])}",
              f"data.cache_dir={tmp_path / 'cache'}", f"train.out_dir={tmp_path / 'run'}"]
    assert cli_main(["prepare-data", *common]) == 0
    out = capsys.readouterr().out
    assert out.startswith("train: 28 conversations, ") and "eval: 4 conversations" in out
    assert "bad samples: none" in out and "cache written:" in out
    assert cli_main(["prepare-data", *common]) == 0
    assert "cache hit:" in capsys.readouterr().out

    assert cli_main(["build-vocab", *common]) == 0
    out = capsys.readouterr().out
    assert "draft vocab: 1024 of 49152 target ids" in out and "coverage: 100.0000%" in out
    vocab = DraftVocab.load(str(tmp_path / "run" / "vocab.safetensors"), target_vocab_size=49152)
    train = prepare_data(tiny(smollm2_dir, tmp_path))[0]
    assert vocab.t2d[train.input_ids[train.assistant_mask]].all()  # every assistant token is covered


def test_a_damaged_cache_entry_is_detected_and_rebuilt(smollm2_dir, tmp_path, capsys):
    cfg = tiny(smollm2_dir, tmp_path)
    train, evaluation, _ = prepare_data(cfg)
    (entry,) = entries(cfg)
    path = os.path.join(cache_root(cfg), entry, "train.safetensors")
    data = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
    again, _, _ = prepare_data(cfg)
    err = capsys.readouterr().err
    assert "data cache" in err and "is rebuilt" in err and "truncated or replaced" in err, err
    assert torch.equal(again.input_ids, train.input_ids) and torch.equal(again.assistant_mask, train.assistant_mask)
    prepare_data(cfg)
    assert capsys.readouterr().err == "", "the rebuilt entry is whole again"
    data = open(path, "rb").read()
    flipped = bytearray(data)
    flipped[-1] ^= 1  # same size, one bit: only the checksum sees it
    with open(path, "wb") as fh:
        fh.write(bytes(flipped))
    rebuilt, _, _ = prepare_data(cfg)
    assert "does not match its SHA-256" in capsys.readouterr().err
    assert torch.equal(rebuilt.input_ids, train.input_ids)
