"""The assistant mask from the chat template (SmolLM2's tokenizer; SmolLM2, Qwen2- and Qwen3-style templates)."""

import pytest
import torch

from specforge_mcore.data.conversations import Conversation, SampleRejected
from specforge_mcore.data.tokenize import (
    check_tokenizer_matches,
    end_of_turn_marker,
    pad_token_id,
    render,
    tokenize_conversation,
    tokenize_conversations,
)
from specforge_mcore.errors import UserError

# Qwen2.5's layout: ChatML with a default system prompt.
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen3's behaviour: answers after the last user turn open with an (empty) think block, earlier ones
# do not, so rendering a prefix of the conversation is *not* a prefix of the full rendering.
QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' and loop.index0 > ns.last_user %}"
    "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Plain-text markers, no special tokens at all: the end-of-turn marker is several ordinary tokens.
PLAIN_TEMPLATE = (
    "{%- for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] + '\\n<end>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '### assistant:\\n' }}{%- endif %}"
)

MULTI_TURN = Conversation([
    {"role": "system", "content": "You are a terse travel guide."},
    {"role": "user", "content": "Where is the Eiffel Tower?"},
    {"role": "assistant", "content": "In Paris, on the Champ de Mars."},
    {"role": "user", "content": "How tall is it?"},
    {"role": "assistant", "content": "About 330 metres, antenna included."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "Bon voyage!"},
], "test:1")


def masked_runs(tokenizer, sample):
    """Decoded text of each maximal run of assistant tokens."""
    ids, mask = sample.input_ids.tolist(), sample.assistant_mask.tolist()
    runs, current = [], []
    for token, m in zip(ids, mask):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def answers(conversation):
    return [m["content"] for m in conversation.messages if m["role"] == "assistant"]


def test_mask_is_exactly_each_answer_and_its_end_of_turn_token(smollm2_tokenizer):
    tok = smollm2_tokenizer
    sample = tokenize_conversation(tok, MULTI_TURN, max_length=4096)
    assert sample.input_ids.dtype == torch.int64 and sample.assistant_mask.dtype == torch.bool
    assert sample.input_ids.shape == sample.assistant_mask.shape
    text = render(tok, MULTI_TURN.messages)
    assert tok.decode(sample.input_ids.tolist()) == text  # the whole conversation, nothing lost
    assert masked_runs(tok, sample) == [a + "<|im_end|>" for a in answers(MULTI_TURN)]
    # Every <|im_end|> closing an answer is an assistant token; those closing system/user turns are not.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ends = sample.assistant_mask[sample.input_ids == im_end].tolist()
    assert ends == [False, False, True, False, True, False, True]


def test_last_turn_only(smollm2_tokenizer):
    sample = tokenize_conversation(smollm2_tokenizer, MULTI_TURN, 4096, loss_on="last_assistant_turn")
    assert masked_runs(smollm2_tokenizer, sample) == ["Bon voyage!<|im_end|>"]
    full = tokenize_conversation(smollm2_tokenizer, MULTI_TURN, 4096)
    assert torch.equal(sample.input_ids, full.input_ids)


def test_text_is_tokenised_once_and_ids_equal_a_plain_tokenisation(smollm2_tokenizer):
    class Counting:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def __call__(self, *args, **kwargs):
            self.calls += 1
            return self.inner(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    counting = Counting(smollm2_tokenizer)
    sample = tokenize_conversation(counting, MULTI_TURN, 4096)
    assert counting.calls == 1  # spans come from string rendering and offsets, not re-encoding prefixes
    plain = smollm2_tokenizer(render(smollm2_tokenizer, MULTI_TURN.messages), add_special_tokens=False)["input_ids"]
    assert sample.input_ids.tolist() == plain


def test_qwen2_style_template(smollm2_tokenizer, monkeypatch):
    monkeypatch.setattr(smollm2_tokenizer, "chat_template", QWEN2_TEMPLATE)
    conv = Conversation(MULTI_TURN.messages[1:], "q2:1")  # no system turn: the template adds its own
    sample = tokenize_conversation(smollm2_tokenizer, conv, 4096)
    assert smollm2_tokenizer.decode(sample.input_ids.tolist()).startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert masked_runs(smollm2_tokenizer, sample) == [a + "<|im_end|>" for a in answers(conv)]


def test_qwen3_style_template_marks_the_think_block_of_the_final_answer(smollm2_tokenizer, monkeypatch):
    monkeypatch.setattr(smollm2_tokenizer, "chat_template", QWEN3_TEMPLATE)
    sample = tokenize_conversation(smollm2_tokenizer, MULTI_TURN, 4096)
    got = masked_runs(smollm2_tokenizer, sample)
    a1, a2, a3 = answers(MULTI_TURN)
    assert got == [a1 + "<|im_end|>", a2 + "<|im_end|>", "<think>\n\n</think>\n\n" + a3 + "<|im_end|>"]


def test_template_with_plain_text_markers(smollm2_tokenizer, monkeypatch):
    monkeypatch.setattr(smollm2_tokenizer, "chat_template", PLAIN_TEMPLATE)
    assert end_of_turn_marker(smollm2_tokenizer) == "<end>"
    sample = tokenize_conversation(smollm2_tokenizer, MULTI_TURN, 4096)
    assert [run.strip() for run in masked_runs(smollm2_tokenizer, sample)] == [
        a + "\n<end>" for a in answers(MULTI_TURN)]


def test_template_without_end_of_turn_marker_is_a_user_error(smollm2_tokenizer, monkeypatch):
    monkeypatch.setattr(smollm2_tokenizer, "chat_template",
                        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% endfor %}")
    with pytest.raises(UserError, match="end-of-turn marker"):
        tokenize_conversation(smollm2_tokenizer, MULTI_TURN, 4096)


def test_template_whose_prefixes_disagree_rejects_the_sample(smollm2_tokenizer, monkeypatch):
    # The generation prompt differs from how answers are rendered: spans cannot be located.
    monkeypatch.setattr(smollm2_tokenizer, "chat_template",
                        "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + '<|im_end|>' }}{% endfor %}"
                        "{% if add_generation_prompt %}{{ '<bot>' }}{% endif %}")
    with pytest.raises(SampleRejected, match="renders turns inconsistently"):
        tokenize_conversation(smollm2_tokenizer, MULTI_TURN, 4096)


def test_template_that_raises_rejects_only_that_sample(smollm2_tokenizer, monkeypatch):
    monkeypatch.setattr(smollm2_tokenizer, "chat_template",
                        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
                        + QWEN2_TEMPLATE)
    no_system = Conversation(MULTI_TURN.messages[1:], "ok:1")
    results = tokenize_conversations(smollm2_tokenizer, [MULTI_TURN, no_system], 4096)
    assert isinstance(results[0], SampleRejected) and results[0].reason == "chat template rejected the conversation"
    assert "no system role" in str(results[0]) and str(results[0]).startswith("test:1: ")
    assert masked_runs(smollm2_tokenizer, results[1]) == [a + "<|im_end|>" for a in answers(no_system)]


def test_truncation_keeps_the_prefix_and_its_partial_mask(smollm2_tokenizer):
    tok = smollm2_tokenizer
    full = tokenize_conversation(tok, MULTI_TURN, 4096)
    second_answer_start = [i for i in range(1, len(full)) if full.assistant_mask[i] and not full.assistant_mask[i - 1]][1]
    cut = second_answer_start + 3
    short = tokenize_conversation(tok, MULTI_TURN, cut)
    assert len(short) == cut
    assert torch.equal(short.input_ids, full.input_ids[:cut])
    assert torch.equal(short.assistant_mask, full.assistant_mask[:cut])


def test_empty_after_truncation(smollm2_tokenizer):
    conv = Conversation([{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}], "t.jsonl:9")
    with pytest.raises(SampleRejected) as info:
        tokenize_conversation(smollm2_tokenizer, conv, max_length=64)
    assert info.value.reason == "empty after truncation" and info.value.source == "t.jsonl:9"


def test_pad_id_is_the_pad_token(smollm2_tokenizer):
    assert pad_token_id(smollm2_tokenizer) == smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_tokenizer_vocab_must_match_the_target(smollm2_tokenizer):
    check_tokenizer_matches(smollm2_tokenizer, 49152, "t")
    check_tokenizer_matches(smollm2_tokenizer, 49152 + 256, "t")  # padded embedding rows are normal
    with pytest.raises(UserError, match=r"cfg\.yaml: .*49152 tokens .*vocab_size is 32000"):
        check_tokenizer_matches(smollm2_tokenizer, 32000, "cfg.yaml")
    with pytest.raises(UserError, match="different tokenizer"):
        check_tokenizer_matches(smollm2_tokenizer, 151936, "cfg.yaml")


def _tokenizer_copy(src, dst, edit):
    import json
    import shutil

    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    tree = json.loads((dst / "tokenizer.json").read_text())
    edit(tree)
    (dst / "tokenizer.json").write_text(json.dumps(tree))
    return dst


def test_a_tokenizer_with_the_same_size_but_other_ids_is_refused(smollm2_dir, smollm2_tokenizer, tmp_path):
    import pathlib

    from specforge_mcore.data.tokenize import check_same_tokenizer

    src = pathlib.Path(smollm2_dir)
    check_same_tokenizer(smollm2_tokenizer, str(src), "t")  # its own tokenizer

    def swap(tree):  # two ordinary tokens trade ids: same size, same special tokens, other ids
        vocab = tree["model"]["vocab"]
        vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]

    target = _tokenizer_copy(src, tmp_path / "target", swap)
    assert len(smollm2_tokenizer) == len(__import__("transformers").AutoTokenizer.from_pretrained(str(target)))
    with pytest.raises(UserError, match=r"2 token\(s\) to different ids .*'hello'"):
        check_same_tokenizer(smollm2_tokenizer, str(target), "target.tokenizer_dir")
    check_same_tokenizer(smollm2_tokenizer, str(tmp_path), "t")  # a directory without a tokenizer: nothing to compare
