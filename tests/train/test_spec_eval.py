"""train.eval_spec_prompts: the held-out prompts are each document's tokens before its first assistant
token, and the probe's acceptance length is what one-prompt-at-a-time speculative decoding measures."""

import torch

from specforge_mcore.config import DraftConfig
from specforge_mcore.data.packing import PackedData
from specforge_mcore.draft.model import DraftArch, Eagle3Draft
from specforge_mcore.eval.speculative import SpeculativeDecoder
from specforge_mcore.target.random import random_target
from specforge_mcore.train.spec_eval import SpecProbe, held_out_prompts


def _packed(rows):
    """rows: lists of documents, each a list of (token, is_assistant); padded to 12 with a last document."""
    n, length = len(rows), 12
    ids = torch.zeros(n, length, dtype=torch.long)
    mask = torch.zeros(n, length, dtype=torch.bool)
    pos = torch.zeros(n, length, dtype=torch.long)
    docs = torch.zeros(n, length, dtype=torch.int32)
    lengths = torch.zeros(n, dtype=torch.int32)
    for r, documents in enumerate(rows):
        t = 0
        for d, document in enumerate(documents):
            for i, (token, assistant) in enumerate(document):
                ids[r, t], mask[r, t], pos[r, t], docs[r, t] = token, assistant, i, d
                t += 1
        lengths[r] = t
        docs[r, t:] = len(documents)
    return PackedData(ids, mask, pos, docs, lengths)


def test_held_out_prompts_are_the_tokens_before_the_first_assistant_token():
    data = _packed([
        [[(5, False), (6, False), (7, True), (8, True)], [(9, False), (10, True)]],
        [[(11, True), (12, True)], [(13, False), (14, False)], [(15, False), (16, False), (17, True), (18, False), (19, True)]],
    ])
    prompts = held_out_prompts(data, 10)
    # Row 1: the first document starts with the answer (no prompt), the second has no answer: both passed over.
    assert [p.tolist() for p in prompts] == [[5, 6], [9], [15, 16]]
    assert [p.tolist() for p in held_out_prompts(data, 2)] == [[5, 6], [9]]


def test_probe_measures_what_speculative_decoding_measures():
    hf_dir = random_target("llama", {"vocab_size": 512})
    import json
    import os

    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as fh:
        hf = json.load(fh)
    capture = [1, 3, 4]
    draft = Eagle3Draft(DraftArch.from_target(hf, DraftConfig(draft_vocab_size=512), capture, 512))
    draft.set_vocab(torch.zeros_like(draft.d2t), torch.ones_like(draft.t2d))
    gen = torch.Generator().manual_seed(0)
    data = _packed([[[(int(t), i >= 5) for i, t in enumerate(torch.randint(1, 500, (8,), generator=gen))]],
                    [[(int(t), i >= 3) for i, t in enumerate(torch.randint(1, 500, (9,), generator=gen))]]])
    probe = SpecProbe(hf_dir, data, capture, prompts=2, max_new_tokens=10, steps=3)
    # A draft that has learned something: its head is the target's output rows (the trainer's start).
    with torch.no_grad():
        draft.lm_head.weight.copy_(probe.model.lm_head.weight)
    result = probe.measure(draft)
    assert result["eval_spec_lossless"] and result["eval_spec_prompts"] == 2 and len(result["eval_spec_accept"]) == 3
    draft.set_embedding(probe.model.get_input_embeddings().weight.detach())
    singles = [SpeculativeDecoder(probe.target, draft.eval(), probe.config, probe.eos).generate(p, 10)
               for p in probe.prompts]
    lengths = [n for g in singles for n in g.accept_lengths]
    assert result["eval_spec_al"] == sum(lengths) / len(lengths)
    assert [g.tokens for g in singles] == [r.tokens for r in probe.references]


def test_probe_without_held_out_prompts_is_an_error():
    import pytest

    from specforge_mcore.errors import UserError

    only_answers = _packed([[[(11, True), (12, True)]]])
    with pytest.raises(UserError, match="train.eval_spec_prompts=4: the held-out split has no document"):
        SpecProbe("/nonexistent", only_answers, [1, 2, 3], prompts=4, max_new_tokens=8, steps=3)
