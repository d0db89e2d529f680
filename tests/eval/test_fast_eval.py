"""The fast paths of the evaluation: the batched target-only reference equals greedy decoding of each
prompt alone, token for token; the preallocated KV caches behave as the concatenated ones; user chat files
and ``--num-prompts all``; the CLI reports prompts/s and tokens/s."""

import json
import re

import pytest
import torch

from specforge_mcore.cli import main as cli_main
from specforge_mcore.errors import UserError
from specforge_mcore.eval.cli import encode_prompt, load_prompts, parse_num_prompts, run_eval
from specforge_mcore.eval.speculative import (BufferLayer, DraftRunner, Target, eos_token_ids, greedy_generate,
                                              greedy_generate_batch, load_target)


@pytest.fixture(scope="module")
def smollm2_target(smollm2_dir):
    from transformers import AutoTokenizer

    model = load_target(smollm2_dir)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    return Target(model, [1, 14, 26]), tokenizer, eos_token_ids(model, tokenizer)


def test_batched_reference_equals_greedy_on_smollm2(smollm2_target):
    """Real model, prompts of different lengths (left padding up to 40 tokens), batches of 2 and of all:
    every row equals decoding that prompt alone, in the order of the prompts."""
    target, tokenizer, eos = smollm2_target
    questions = load_prompts("gsm8k")[:2] + ["Hi!"]
    prompts = [torch.tensor(encode_prompt(tokenizer, q)) for q in questions]
    assert len({p.numel() for p in prompts}) == 3
    alone = [greedy_generate(target, p, 12, eos).tokens for p in prompts]
    for batch_size in (2, 3):
        batched = greedy_generate_batch(target, prompts, 12, eos, batch_size=batch_size)
        assert [g.tokens for g in batched] == alone


@pytest.fixture(scope="module")
def tiny_target_model(tiny_target):
    return Target(load_target(tiny_target[0]), [1, 3, 4])


def test_batched_reference_stops_each_row_at_its_eos(tiny_target_model):
    """A row that emits an end-of-sequence token stops there (the token kept) while the others go on, and
    the batch ends when every row has stopped; the per-prompt seconds are equal shares of the batch."""
    target = tiny_target_model
    prompts = [torch.tensor([5, 900, 31, 4000, 77, 12]), torch.tensor([17, 4242, 99]), torch.tensor([8, 1, 30000, 4])]
    free = [greedy_generate(target, p, 10, set()).tokens for p in prompts]
    for eos in ({free[1][0]}, {free[0][0], free[1][0], free[2][0]}):
        alone = [greedy_generate(target, p, 10, eos).tokens for p in prompts]
        assert [len(tokens) for tokens in alone] == [1 if tokens[0] in eos else 10 for tokens in free]
        batched = greedy_generate_batch(target, prompts, 10, eos, batch_size=3)
        assert [g.tokens for g in batched] == alone
        assert len({g.seconds for g in batched}) == 1
    with pytest.raises(UserError, match="--batch-size 0"):
        greedy_generate_batch(target, prompts, 10, set(), batch_size=0)


def test_head_per_row_and_its_check(tiny_target):
    """``forward_hidden`` + ``head`` give the rows of ``forward``'s logits; a model whose logits are not a
    plain lm_head of the last hidden state (here: scaled) is recognised and keeps the full forward."""
    model = load_target(tiny_target[0])
    target = Target(model, [1, 3, 4])
    assert target.plain_head
    prompt, tokens = torch.tensor([5, 900, 31, 4000]), torch.tensor([77, 12, 8])
    with torch.inference_mode():
        target.reset()
        target.forward(prompt, torch.arange(4))
        logits, aux = target.forward(tokens, torch.arange(4, 7))
        target.reset()
        target.forward(prompt, torch.arange(4))
        hidden, aux_hidden = target.forward_hidden(tokens, torch.arange(4, 7))
        for row in range(3):
            torch.testing.assert_close(target.head(hidden[row]), logits[row], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(aux_hidden[row], aux[row], rtol=0, atol=0)

    forward = model.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out

    model.forward = scaled
    assert not Target(model, [1, 3, 4]).plain_head


def test_buffer_layer_is_the_concatenated_cache():
    """Appends beyond the capacity (the buffer grows), keeps a prefix path without copying and a tree
    path by moving its rows: always what concatenating and indexing would give."""
    gen = torch.Generator().manual_seed(0)
    layer, keys, values = BufferLayer(capacity=3), torch.zeros(2, 3, 0, 4), torch.zeros(2, 3, 0, 4)
    for n in (2, 3, 5):
        k, v = torch.randn(2, 3, n, 4, generator=gen), torch.randn(2, 3, n, 4, generator=gen)
        got_k, got_v = layer.update(k, v)
        keys, values = torch.cat([keys, k], 2), torch.cat([values, v], 2)
        assert torch.equal(got_k, keys) and torch.equal(got_v, values) and layer.get_seq_length() == keys.shape[2]
    layer.keep_rows(6, [0, 1, 2])  # a chain's accepted prefix
    keys, values = keys[:, :, :9], values[:, :, :9]
    assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    layer.keep_rows(4, [0, 2, 4])  # a tree's accepted path
    index = torch.tensor([0, 1, 2, 3, 4, 6, 8])
    assert torch.equal(layer.keys, keys[:, :, index]) and torch.equal(layer.values, values[:, :, index])


def test_draft_runner_buffer_and_last_only(tiny_target, random_draft):
    """A runner whose buffer must grow gives the outputs of a roomy one; ``last_only`` is the last row."""
    hf = tiny_target[1]
    draft = random_draft(hf, 1024, [1, 3, 4], seed=2)
    draft.set_embedding(torch.randn(hf["vocab_size"], hf["hidden_size"], generator=torch.Generator().manual_seed(1)))
    gen = torch.Generator().manual_seed(3)
    aux = [torch.randn(9, hf["hidden_size"], generator=gen) for _ in range(3)]
    tokens = torch.randint(0, hf["vocab_size"], (9,), generator=gen)
    outputs = []
    with torch.no_grad():
        for capacity, last_only in ((256, False), (2, False), (2, True)):
            runner = DraftRunner(draft)
            runner.reset(capacity)
            out = runner.extend([a[:6] for a in aux], tokens[:6], torch.arange(6), last_only=last_only)
            out = runner.extend([a[6:] for a in aux], tokens[6:], torch.arange(6, 9), last_only=last_only)[-1]
            step, slots = runner.step(out[None], tokens[:1], torch.tensor([9]), [[]])
            step2, _ = runner.step(step, tokens[1:2], torch.tensor([10]), [slots])
            assert runner.committed == 9
            outputs.append(torch.cat([out[None], step, step2]))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    torch.testing.assert_close(outputs[2], outputs[0], rtol=1e-5, atol=1e-5)


def test_chat_jsonl_prompts(tmp_path, smollm2_dir):
    from transformers import AutoTokenizer

    path = tmp_path / "chats.jsonl"
    records = [
        {"messages": [{"role": "user", "content": "What is 2 + 3?"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."},
                      {"role": "assistant", "content": "Blue."}]},
        {"system": "Answer in French.", "messages": [{"role": "user", "content": [{"type": "text", "text": "Bonjour"}]}]},
        {"prompt": "plain prompt"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    prompts = load_prompts(str(path))
    assert prompts[0] == [{"role": "user", "content": "What is 2 + 3?"}]
    assert prompts[1] == records[1]["messages"][:4]  # up to and including the last user turn
    assert prompts[2] == [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Bonjour"}]
    assert prompts[3] == "plain prompt"

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = tokenizer.decode(encode_prompt(tokenizer, prompts[1]))
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "Name a colour." in text
    assert "Blue." not in text and text.endswith("<|im_start|>assistant\n")
    assert encode_prompt(tokenizer, prompts[0]) == encode_prompt(tokenizer, "What is 2 + 3?")

    tokenizer.chat_template = None
    with pytest.raises(UserError, match="need a tokenizer with a chat template"):
        encode_prompt(tokenizer, prompts[1])

    for bad, pattern in [({"messages": [{"role": "assistant", "content": "x"}]}, r"bad.jsonl:1: 'messages' has no user turn"),
                         ({"messages": [{"role": "user"}]}, r"bad.jsonl:1: message 0 is .* expected an object with a role"),
                         ({"messages": "hello"}, r"bad.jsonl:1: 'messages' is a str, expected a list"),
                         ({"id": 3}, r"bad.jsonl:1: expected a chat record with a 'messages' list")]:
        (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
        with pytest.raises(UserError, match=pattern):
            load_prompts(str(tmp_path / "bad.jsonl"))


def test_num_prompts_all_and_the_speed_lines(tiny_target, tiny_export, smollm2_dir, tmp_path, capsys):
    assert parse_num_prompts("all") is None and parse_num_prompts("3") == 3
    for bad in ("0", "some", "-2"):
        with pytest.raises(UserError, match="expected a positive integer or 'all'"):
            parse_num_prompts(bad)
    prompts = tmp_path / "chats.jsonl"
    prompts.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": q}]})
                                 for q in ["What is 2 + 3?", "Name a colour.", "Count to three."]) + "\n")
    threads = torch.get_num_threads()
    results = run_eval(tiny_target[0], tiny_export, str(prompts), ["2,1,3"], num_prompts="all", max_new_tokens=6,
                       tokenizer_dir=smollm2_dir, progress=False, batch_size=2, baseline_prompts=1, threads=1)
    assert torch.get_num_threads() == threads  # restored
    assert results.lossless and results.num_prompts == 3 and not results.baseline_mismatched_prompts
    assert results.reference_tokens_per_second > 0 and results.reference_prompts_per_second > 0
    assert results.configs[0].prompts_per_second > 0 and results.meta["threads"] == 1
    split = results.configs[0].seconds_split()
    assert split["verify"] > 0 and split["draft"] > 0 and split["prefill"] > 0 and split["other"] >= 0
    assert sum(split.values()) == pytest.approx(results.configs[0].seconds)

    argv = ["eval", "--target", tiny_target[0], "--draft", tiny_export, "--prompts", str(prompts), "--tokenizer",
            smollm2_dir, "--num-prompts", "all", "--max-new-tokens", "4", "--configs", "2,1,3", "--batch-size", "2"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "[eval] target-only greedy reference: 3 prompts" in out and "(batches of 2" in out
    assert "[eval] target-only greedy one prompt at a time (first 2" in out
    assert "[eval] speculative 2,1,3 (one prompt at a time): 3 prompts" in out and "prompts/s" in out and "tokens/s" in out
    assert re.search(r"s per prompt; prefill \d+%, draft \d+%, verify \d+%, other \d+%\)", out)
    assert cli_main(argv[:-2] + ["--num-prompts", "none"]) == 2
    assert "--num-prompts 'none': expected a positive integer or 'all'" in capsys.readouterr().err
