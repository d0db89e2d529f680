"""The bad-sample corpus (tests/data/corpus/bad): every kind is skipped and counted, or stops the run."""

import json
import os

import pytest

from specforge_mcore.cli import main as cli_main
from specforge_mcore.config import load_config
from specforge_mcore.data.prepare import prepare_data
from specforge_mcore.errors import BadSampleError, UserError

HERE = os.path.dirname(os.path.abspath(__file__))
BAD = os.path.join(HERE, "corpus", "bad")
MIXED = os.path.join(BAD, "mixed.jsonl")
TRUNCATED_JSON = os.path.join(BAD, "truncated.json")
TRUNCATED_JSONL = os.path.join(BAD, "truncated.jsonl")

# reason -> (count, first file:line) over mixed.jsonl, truncated.json, truncated.jsonl at max_length 128
EXPECTED = {
    "malformed JSON": (1, f"{MIXED}:3"),
    "unknown role": (1, f"{MIXED}:4"),
    "empty conversation": (1, f"{MIXED}:5"),
    "no assistant turn": (1, f"{MIXED}:6"),
    "not a conversation": (1, f"{MIXED}:8"),
    "malformed message": (1, f"{MIXED}:9"),
    "empty after truncation": (1, f"{MIXED}:10"),
    "invalid UTF-8": (1, f"{MIXED}:12"),
    "truncated file": (2, f"{TRUNCATED_JSON}:26"),
}


def config(smollm2_dir, tmp_path, files, *overrides):
    return load_config(None, [
        f"target.hf_dir={smollm2_dir}", f"data.train_files={json.dumps(files)}", "data.max_length=128",
        "data.eval_fraction=0", f"data.cache_dir={tmp_path / 'cache'}", *overrides])


def test_skip_counts_every_kind_with_its_first_file_and_line(smollm2_dir, tmp_path):
    cfg = config(smollm2_dir, tmp_path, [MIXED, TRUNCATED_JSON, TRUNCATED_JSONL])
    train, evaluation, bad = prepare_data(cfg)
    assert {reason: (bad.counts[reason], bad.first[reason][0]) for reason in bad.counts} == EXPECTED
    # Good records survive around the bad ones, both shapes: mixed.jsonl lines 1, 2, 11, 13 and two of each truncated file.
    assert train.stats["conversations"] == 8 and len(evaluation) == 0
    summary = bad.summary()
    assert summary.splitlines()[0] == "bad samples: 10 skipped"
    for reason, (count, where) in EXPECTED.items():
        assert f"{reason}: {count} (first at {where}" in summary
    # The summary survives the cache, and a stricter policy on the cached data still stops.
    assert prepare_data(cfg)[2].to_dict() == bad.to_dict()
    strict = config(smollm2_dir, tmp_path, [MIXED, TRUNCATED_JSON, TRUNCATED_JSONL], "data.on_bad_sample=error")
    with pytest.raises(BadSampleError, match=f"^{MIXED}:3: bad sample \\(malformed JSON\\)"):
        prepare_data(strict)


@pytest.mark.parametrize("files, where, reason", [
    ([MIXED], f"{MIXED}:3", "malformed JSON"),
    ([TRUNCATED_JSONL, TRUNCATED_JSON], f"{TRUNCATED_JSONL}:3", "truncated file"),
    ([TRUNCATED_JSON], f"{TRUNCATED_JSON}:26", "truncated file"),
])
def test_error_policy_stops_at_the_first_bad_sample(smollm2_dir, tmp_path, files, where, reason):
    cfg = config(smollm2_dir, tmp_path, files, "data.on_bad_sample=error")
    with pytest.raises(BadSampleError) as info:
        prepare_data(cfg)
    assert str(info.value).startswith(f"{where}: bad sample ({reason})")


def test_error_policy_on_a_sample_emptied_by_truncation(smollm2_dir, tmp_path):
    path = tmp_path / "long_prompt.jsonl"
    with open(MIXED, "rb") as fh:
        path.write_bytes(fh.read().split(b"\n")[9] + b"\n")
    cfg = config(smollm2_dir, tmp_path, [str(path)], "data.on_bad_sample=error")
    with pytest.raises(BadSampleError, match=f"{path}:1: bad sample \\(empty after truncation\\)"):
        prepare_data(cfg)


def test_cli_reports_the_bad_sample_in_one_line(smollm2_dir, tmp_path, capsys):
    code = cli_main(["prepare-data", "--config", os.path.join(HERE, "tiny.yaml"), f"target.hf_dir={smollm2_dir}",
                     f"data.train_files={json.dumps([MIXED])}", f"data.cache_dir={tmp_path}", "data.on_bad_sample=error"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"specforge-mcore prepare-data: error: {MIXED}:3: bad sample (malformed JSON): Expecting ',' delimiter"


def test_a_single_enormous_message(smollm2_dir, tmp_path):
    huge = "All work and no play makes Jack a dull boy. " * 10_000  # 440 kB in one message
    path = tmp_path / "huge.jsonl"
    with open(path, "w") as fh:
        fh.write(json.dumps({"messages": [{"role": "user", "content": huge}, {"role": "assistant", "content": "ok"}]}) + "\n")
        fh.write(json.dumps({"messages": [{"role": "user", "content": "Write a lot."}, {"role": "assistant", "content": huge}]}) + "\n")
    train, _, bad = prepare_data(config(smollm2_dir, tmp_path, [str(path)]))
    # An enormous prompt leaves nothing to learn within max_length; an enormous answer is cut to it.
    assert bad.counts == {"empty after truncation": 1} and bad.first["empty after truncation"][0] == f"{path}:1"
    assert train.stats["conversations"] == 1 and train.stats["tokens"] == 128
    mask = train.assistant_mask[0]
    first = int(mask.nonzero()[0])
    assert mask[first:].all() and not mask[:first].any() and first < 64  # the answer runs to the cut


def test_tokenizer_that_does_not_fit_the_target_is_an_error(smollm2_dir, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 32000}))
    cfg = config(smollm2_dir, tmp_path, [MIXED], f"target.hf_dir={target}", f"target.tokenizer_dir={smollm2_dir}")
    with pytest.raises(UserError, match=f"tokenizer {smollm2_dir} vs target: .*49152 tokens.*vocab_size is 32000"):
        prepare_data(cfg)
