import gzip
import io
import json
import os

import pytest

from specforge_mcore.data.conversations import (
    BadSamples,
    SampleRejected,
    iter_json_array,
    read_conversations,
    to_conversation,
)
from specforge_mcore.errors import UserError

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def test_sharegpt_roles_map_onto_system_user_assistant():
    record = {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "user", "value": "c"},
        {"from": "chatgpt", "value": "d"}, {"from": "human", "value": "e"}, {"from": "bard", "value": "f"},
        {"from": "human", "value": "g"}, {"from": "model", "value": "h"}]}
    conv = to_conversation(record, "x.jsonl:3")
    assert conv.source == "x.jsonl:3"
    assert [(m["role"], m["content"]) for m in conv.messages] == [
        ("system", "Be brief."), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"),
        ("user", "e"), ("assistant", "f"), ("user", "g"), ("assistant", "h")]


def test_openai_messages_and_text_parts():
    record = {"messages": [{"role": "system", "content": "s"},
                           {"role": "user", "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "llo"}]},
                           {"role": "assistant", "content": "hi"}]}
    conv = to_conversation(record, "f:1")
    assert conv.messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "hello"},
                             {"role": "assistant", "content": "hi"}]


def test_assistant_turns_before_the_first_user_turn_are_dropped():
    record = {"conversations": [{"from": "gpt", "value": "orphan"}, {"from": "human", "value": "q"},
                                {"from": "gpt", "value": "a"}]}
    assert [m["content"] for m in to_conversation(record, "f:1").messages] == ["q", "a"]
    only_orphans = {"conversations": [{"from": "gpt", "value": "orphan"}]}
    with pytest.raises(SampleRejected, match="no assistant turn"):
        to_conversation(only_orphans, "f:2")


@pytest.mark.parametrize("record, reason", [
    ([1, 2], "not a conversation"),
    ({"text": "hello"}, "not a conversation"),
    ({"messages": []}, "empty conversation"),
    ({"messages": [{"role": "system", "content": "s"}]}, "empty conversation"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}, "unknown role"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "malformed message"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}, "malformed message"),
])
def test_unusable_records_are_rejected_with_a_reason(record, reason):
    with pytest.raises(SampleRejected) as info:
        to_conversation(record, "data.jsonl:7")
    assert info.value.reason == reason
    assert str(info.value).startswith("data.jsonl:7: bad sample (" + reason)


def test_jsonl_sources_name_file_and_line():
    path = os.path.join(CORPUS, "tiny_chat.jsonl")
    bad = BadSamples()
    convs = list(read_conversations([path], bad))
    assert len(convs) == 32 and bad.total == 0
    assert [c.source for c in convs[:3]] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    # Both shapes in one file: line 1 is ShareGPT, line 2 OpenAI.
    assert convs[0].messages[-1] == {"role": "assistant", "content": "The capital of France is Paris."}
    assert convs[1].messages[0] == {"role": "system", "content": "You are a concise assistant."}


def test_json_list_file_gives_the_line_of_each_item(tmp_path):
    records = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
               for i in range(3)]
    path = tmp_path / "list.json"
    path.write_text(json.dumps(records, indent=1))
    convs = list(read_conversations([str(path)], BadSamples()))
    assert [c.messages[1]["content"] for c in convs] == ["a0", "a1", "a2"]
    lines = path.read_text().splitlines()
    for conv in convs:
        line = int(conv.source.rsplit(":", 1)[1])
        assert lines[line - 1].strip() == "{"  # the item's opening brace
    assert convs[0].source == f"{path}:2"


def test_gzipped_jsonl(tmp_path):
    path = tmp_path / "chat.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")
    assert [c.source for c in read_conversations([str(path)], BadSamples())] == [f"{path}:1"]


def test_streaming_array_decode_matches_json_load_across_tiny_chunks():
    # Multi-byte characters and items larger than a chunk must survive every chunk boundary.
    items = [{"id": i, "text": "é€😀 " * (i % 5) + "x" * (i * 7), "n": [i, i + 0.5, None, True]} for i in range(40)]
    items.append(12345)  # a bare number at the end must not be cut at a chunk boundary
    blob = json.dumps(items, ensure_ascii=False, indent=2).encode()
    for chunk in (1, 3, 7, 64, 1 << 20):
        bad = BadSamples()
        got = [value for value, _ in iter_json_array(io.BytesIO(blob), "mem.json", bad, chunk_bytes=chunk)]
        assert got == items and bad.total == 0, chunk


def test_truncated_array_keeps_complete_items_and_reports_the_cut():
    blob = json.dumps([{"a": 1}, {"b": 2}, {"c": "never closed"}], indent=0).encode()
    cut = blob[: blob.index(b"never") + 3]
    bad = BadSamples()
    got = [(value, where) for value, where in iter_json_array(io.BytesIO(cut), "cut.json", bad, chunk_bytes=5)]
    assert [value for value, _ in got] == [{"a": 1}, {"b": 2}]
    assert bad.counts == {"truncated file": 1}
    line = cut[: cut.rindex(b"{")].count(b"\n") + 1
    assert bad.first["truncated file"] == (f"cut.json:{line}", "the file ends inside this item")


def test_invalid_utf8_in_a_json_list_stops_the_file_at_its_line():
    blob = b'[\n{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},\n' \
           b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n]'
    for chunk in (4, 1 << 20):
        bad = BadSamples()
        got = list(iter_json_array(io.BytesIO(blob), "latin1.json", bad, chunk_bytes=chunk))
        assert len(got) == 1 and got[0][1] == "latin1.json:2"
        assert bad.counts == {"invalid UTF-8": 1} and bad.first["invalid UTF-8"][0] == "latin1.json:3"
    with pytest.raises(SampleRejected, match="latin1.json:3: bad sample \\(invalid UTF-8\\)"):
        list(iter_json_array(io.BytesIO(blob), "latin1.json", BadSamples("error")))


def test_a_json_file_that_is_not_a_list_is_read_as_json_lines(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")
    assert len(list(read_conversations([str(path)], BadSamples()))) == 1


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="nope.jsonl"):
        list(read_conversations([str(tmp_path / "nope.jsonl")], BadSamples()))
