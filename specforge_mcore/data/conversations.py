"""Reading conversations: JSON / JSONL files in the ShareGPT or OpenAI-messages shape, and ShareGPT.

Every record becomes a ``Conversation`` (messages with the roles ``system``, ``user``, ``assistant``)
that remembers where it came from as ``file:line``. A record that cannot be used is a *bad sample*: it
is counted by reason in ``BadSamples`` and skipped, or, under the ``error`` policy, stops the run with a
``BadSampleError`` naming the file, the line and the reason.

Normalisation, deliberately small: roles are mapped onto the three above (anything else is a bad
sample), OpenAI content given as a list of parts keeps its text parts, and assistant turns before the
first user turn are dropped (they answer a prompt that is not there; ShareGPT has many such records).
"""

from __future__ import annotations

import codecs
import gzip
import json
import re
from dataclasses import dataclass, field
from typing import IO, Any, Iterable, Iterator, Literal, Optional

from specforge_mcore.errors import BadSampleError, UserError

ROLE_MAP = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "model": "assistant",
}


@dataclass
class Conversation:
    messages: list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}, ...]
    source: str  # "file:line" of the record
    id: Optional[str] = None  # the record's own "id" (a string or an integer, as text), when it has one


class SampleRejected(BadSampleError):
    """One unusable sample: ``reason`` is the counting key, ``source`` its ``file:line``."""

    def __init__(self, reason: str, source: str, detail: str = ""):
        self.reason, self.source, self.detail = reason, source, detail
        super().__init__(f"{source}: bad sample ({reason})" + (f": {detail}" if detail else ""))


@dataclass
class BadSamples:
    """Bad samples by reason, with the first ``(file:line, detail)`` of each; ``policy`` says skip or stop."""

    policy: Literal["skip", "error"] = "skip"
    counts: dict[str, int] = field(default_factory=dict)
    first: dict[str, tuple[str, str]] = field(default_factory=dict)

    def add(self, reason: str, source: str, detail: str = "") -> None:
        if self.policy == "error":
            raise SampleRejected(reason, source, detail)
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.first.setdefault(reason, (source, detail))

    def reject(self, exc: SampleRejected) -> None:
        self.add(exc.reason, exc.source, exc.detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "bad samples: none"
        lines = [f"bad samples: {self.total} skipped"]
        for reason in sorted(self.counts, key=lambda r: (-self.counts[r], r)):
            source, detail = self.first[reason]
            lines.append(f"  {reason}: {self.counts[reason]} (first at {source}" + (f": {detail})" if detail else ")"))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "first": {r: list(v) for r, v in self.first.items()}}

    @classmethod
    def from_dict(cls, tree: dict, policy: Literal["skip", "error"] = "skip") -> "BadSamples":
        return cls(policy, dict(tree["counts"]), {r: (v[0], v[1]) for r, v in tree["first"].items()})


# ----------------------------------------------------------------------------------------------
# Records -> conversations
# ----------------------------------------------------------------------------------------------


def _text_of(content: Any) -> Optional[str]:
    """A message's text: a string, or the text parts of an OpenAI content list; None if neither."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        texts = [p.get("text") for p in content if p.get("type") == "text"]
        if texts and all(isinstance(t, str) for t in texts):
            return "".join(texts)
    return None


def to_conversation(record: Any, source: str) -> Conversation:
    """Turn one ShareGPT or OpenAI record into a ``Conversation``; ``SampleRejected`` when unusable."""
    if not isinstance(record, dict):
        raise SampleRejected("not a conversation", source, f"a JSON {type(record).__name__}, expected an object")
    if isinstance(record.get("conversations"), list):
        raw, role_key, content_key = record["conversations"], "from", "value"
    elif isinstance(record.get("messages"), list):
        raw, role_key, content_key = record["messages"], "role", "content"
    else:
        raise SampleRejected("not a conversation", source,
                             f"no 'conversations' or 'messages' list (keys: {', '.join(sorted(record)[:6])})")
    messages = []
    if isinstance(record.get("system"), str) and record["system"]:
        messages.append({"role": "system", "content": record["system"]})
    for i, message in enumerate(raw):
        if not isinstance(message, dict) or role_key not in message or content_key not in message:
            raise SampleRejected("malformed message", source,
                                 f"message {i} is not an object with '{role_key}' and '{content_key}'")
        role = ROLE_MAP.get(str(message[role_key]).strip().lower())
        if role is None:
            raise SampleRejected("unknown role", source, f"message {i} has role {message[role_key]!r}")
        content = _text_of(message[content_key])
        if content is None:
            raise SampleRejected("malformed message", source, f"message {i}: content is not text")
        messages.append({"role": role, "content": content})
    if not any(m["role"] != "system" for m in messages):
        raise SampleRejected("empty conversation", source)
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
    messages = [m for i, m in enumerate(messages) if i > first_user or m["role"] != "assistant"]
    if not any(m["role"] == "assistant" for m in messages):
        raise SampleRejected("no assistant turn", source)
    record_id = record.get("id")
    has_id = isinstance(record_id, (str, int)) and not isinstance(record_id, bool) and str(record_id) != ""
    return Conversation(messages, source, str(record_id) if has_id else None)


# ----------------------------------------------------------------------------------------------
# Files -> records
# ----------------------------------------------------------------------------------------------

_SEPARATORS = re.compile(r"[\s,]*")


def iter_json_array(byte_stream: IO[bytes], path: str, bad: BadSamples,
                    chunk_bytes: int = 1 << 20) -> Iterator[tuple[Any, str]]:
    """Stream the items of a JSON array as ``(value, "path:line")``, decoding one item at a time.

    A truncated array (the file ends inside an item) yields every complete item and then records one
    "truncated file" bad sample at the line where the incomplete item starts. A syntax error or invalid
    UTF-8 stops the file with a bad sample at its line: inside a list there is no safe place to resume.
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")("strict")
    buf, pos, eof = "", 0, False
    bad_utf8 = ""  # why decoding stopped early; the text before the bad byte is still parsed
    mark, mark_line = 0, 1  # line number of buf[mark]; only moves forward, so counting stays linear

    def line_at(offset: int) -> int:
        nonlocal mark, mark_line
        mark_line += buf.count("\n", mark, offset)
        mark = offset
        return mark_line

    def refill(min_bytes: int) -> None:
        nonlocal buf, pos, eof, mark, bad_utf8
        line_at(pos)
        raw = byte_stream.read(max(chunk_bytes, min_bytes))
        eof = not raw
        try:
            text = utf8.decode(raw, final=eof)
        except UnicodeDecodeError as exc:
            text = exc.object[:exc.start].decode("utf-8")
            bad_utf8, eof = exc.reason, True
        buf, pos, mark = buf[pos:] + text, 0, 0

    def stop(reason: str, offset: int, detail: str) -> None:
        if bad_utf8:  # whatever went wrong at the end, the cause is the undecodable byte there
            bad.add("invalid UTF-8", f"{path}:{line_at(len(buf))}", f"{bad_utf8}; the rest of the file is not read")
        else:
            bad.add(reason, f"{path}:{line_at(offset)}", detail)

    refill(0)
    pos = _SEPARATORS.match(buf).end()
    if buf[pos:pos + 1] != "[":
        if bad_utf8:
            stop("invalid UTF-8", pos, "")
            return
        raise UserError(f"{path}: a .json file must hold a JSON list of conversations")
    pos += 1
    while True:
        pos = _SEPARATORS.match(buf, pos).end()
        if pos < len(buf) and buf[pos] == "]":
            return
        if pos == len(buf) and eof:
            stop("truncated file", pos, "the list is not closed")
            return
        try:
            value, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError as exc:
            value, end, error = None, None, exc
        # Incomplete at the end of the buffer, or a bare number that may go on: read more, try again.
        if not eof and (end is None or end == len(buf)):
            refill(len(buf))  # at least as much again, so a huge item costs O(size) re-parses
            continue
        if end is None:
            if error.pos >= len(buf) - 1 or "Unterminated" in error.msg:
                stop("truncated file", pos, "the file ends inside this item")
            else:
                stop("malformed JSON", error.pos, f"{error.msg}; the rest of the file is not read")
            return
        yield value, f"{path}:{line_at(pos)}"
        pos = end


def iter_json_lines(byte_stream: IO[bytes], path: str, bad: BadSamples) -> Iterator[tuple[Any, str]]:
    """Items of a JSONL file as ``(value, "path:line")``; bad lines are recorded and skipped."""
    previous: Optional[tuple[int, bytes]] = None
    for lineno, raw in enumerate(byte_stream, start=1):
        if previous is not None:
            yield from _decode_line(*previous, path, bad, last=False)
        previous = (lineno, raw)
    if previous is not None:
        yield from _decode_line(*previous, path, bad, last=True)


def _decode_line(lineno: int, raw: bytes, path: str, bad: BadSamples, last: bool) -> Iterator[tuple[Any, str]]:
    source = f"{path}:{lineno}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad.add("invalid UTF-8", source, f"byte {exc.start}: {exc.reason}")
        return
    if not text.strip():
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if last and not raw.endswith(b"\n"):
            bad.add("truncated file", source, f"the last line is incomplete ({exc.msg})")
        else:
            bad.add("malformed JSON", source, exc.msg)
        return
    yield value, source


def _open_binary(path: str) -> IO[bytes]:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def iter_file_records(path: str, bad: BadSamples) -> Iterator[tuple[Any, str]]:
    """Records of one file: a ``.json`` list (streamed), else one JSON value per line."""
    try:
        stream = _open_binary(path)
    except OSError as exc:
        raise UserError(f"cannot open data file {path}: {exc.strerror or exc}") from None
    with stream:
        name = path[:-3] if path.endswith(".gz") else path
        head = stream.peek(64)[:64] if hasattr(stream, "peek") else b""
        if name.endswith(".json") and head.lstrip().startswith(b"["):
            yield from iter_json_array(stream, path, bad)
        else:
            # .jsonl, and .json files that are really JSON Lines (common in the wild)
            yield from iter_json_lines(stream, path, bad)


def read_conversations(paths: Iterable[str], bad: BadSamples) -> Iterator[Conversation]:
    """Conversations from files and packaged sources (``sources.CONVERSATION_SOURCES``), in order."""
    from specforge_mcore.data import sources

    for path in paths:
        if sources.is_source(path):
            records = sources.source_records(path, bad)
        else:
            records = iter_file_records(path, bad)
        for record, source in records:
            try:
                yield to_conversation(record, source)
            except SampleRejected as exc:
                bad.reject(exc)
