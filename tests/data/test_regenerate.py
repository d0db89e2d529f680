"""regenerate: local answers equal model.generate turn by turn; the endpoint backend against a real HTTP
server on 127.0.0.1 that drops connections and answers 500/429; resume after a dead server and after a
torn line; outcomes counted by reason; the output goes straight into prepare-data."""

import hashlib
import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from transformers import AutoTokenizer

from specforge_mcore.cli import main as cli_main
from specforge_mcore.config import load_config
from specforge_mcore.data.conversations import BadSamples
from specforge_mcore.data.prepare import prepare_data
from specforge_mcore.data.regen_backends import EndpointBackend, Settings
from specforge_mcore.data.regen_local import LocalBackend
from specforge_mcore.data.regenerate import read_jobs, regenerate, side_paths
from specforge_mcore.errors import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "tiny.yaml")
CHAT = os.path.join(HERE, "corpus", "tiny_chat.jsonl")  # record 3 (tiny-2) has two assistant turns
NEW_TOKENS = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Generation of a 135M model is a chain of small matmuls: on the 2 shared cores one thread runs it
    # several times faster than two fighting with the other test processes.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def local(smollm2_dir):
    return LocalBackend.from_dir(smollm2_dir, Settings(max_new_tokens=NEW_TOKENS), batch_size=4)


@pytest.fixture(scope="module")
def local_output(local, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("local") / "regen.jsonl")
    summary = regenerate([CHAT], out, local, max_samples=4, progress=False)
    return out, read_records(out), summary


def read_records(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def reference_answer(backend, messages):
    """model.generate on one unpadded context, greedy, cut at the end-of-turn token."""
    tokenizer, model = backend.tokenizer, backend.model
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    if tokenizer.eos_token_id in new:
        new = new[:new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------
# A real HTTP server on 127.0.0.1
# ----------------------------------------------------------------------------------------------


class ChatServer:
    """OpenAI-style /v1/models and /v1/chat/completions. ``answer(body)`` returns ``(text, finish_reason,
    tokens)`` or an HTTP status to refuse with; ``fault(body, attempt, n)`` returns None, "drop" (close the
    socket without a response) or a status to fail with, for the ``attempt``-th request of this body and
    the ``n``-th request overall."""

    def __init__(self, answer, fault=None, model="smollm2"):
        self.answer, self.fault, self.model = answer, fault or (lambda body, attempt, n: None), model
        self.lock = threading.Lock()
        self.requests = 0
        self.attempts: dict[str, int] = {}
        self.answered: list[list[dict]] = []  # contexts answered with 200
        self.bodies: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status, tree, headers=()):
                raw = json.dumps(tree).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for key, value in headers:
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                if self.path == "/v1/models":
                    self.reply(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
                else:
                    self.reply(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = json.dumps(body["messages"], sort_keys=True)
                with server.lock:
                    n = server.requests
                    server.requests += 1
                    attempt = server.attempts[key] = server.attempts.get(key, 0) + 1
                    server.bodies.append(body)
                fault = server.fault(body, attempt, n)
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault is not None:
                    self.reply(fault, {"error": {"message": f"injected {fault}"}}, [("Retry-After", "0")])
                    return
                result = server.answer(body)
                if isinstance(result, int):
                    self.reply(result, {"object": "error", "message": "This model's maximum context length is "
                                        "exceeded", "code": result})
                    return
                text, finish, tokens = result
                with server.lock:
                    server.answered.append(body["messages"])
                self.reply(200, {"id": "x", "object": "chat.completion", "model": server.model,
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                              "finish_reason": finish}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": tokens}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(answer, fault=None, model="smollm2"):
        servers.append(ChatServer(answer, fault, model))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def fake_answer(body):
    """A deterministic function of the whole context (so a wrong earlier turn changes every later one)."""
    messages = body["messages"]
    last = messages[-1]["content"]
    if "REFUSE" in last:
        return 400
    if "SILENT" in last:
        return "  ", "stop", 1
    digest = hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:12]
    return f"answer {len(messages)} {digest}", "length" if "LONG" in last else "stop", 3


def expected_messages(messages):
    """What regenerate must write with ``fake_answer``: each assistant turn answered in the regenerated context."""
    out = [dict(m) for m in messages]
    for i, m in enumerate(out):
        if m["role"] == "assistant":
            out[i] = {"role": "assistant", "content": fake_answer({"messages": out[:i]})[0]}
    return out


def write_chat(path, conversations):
    with open(path, "w", encoding="utf-8") as fh:
        for i, turns in enumerate(conversations):
            messages = []
            for k, text in enumerate(turns):
                messages.append({"role": "user" if k % 2 == 0 else "assistant", "content": text})
            fh.write(json.dumps({"id": f"c{i}", "messages": messages}) + "\n")
    return str(path)


def many_conversations(n=10):
    convs = []
    for i in range(n):
        turns = [f"question {i}", f"old answer {i}"]
        if i % 3 == 0:
            turns += [f"follow-up {i}", f"old second answer {i}"]
        convs.append(turns)
    return convs


def endpoint(server, **kwargs):
    options = dict(concurrency=4, max_retries=4, backoff=0.01, max_backoff=0.05, timeout=30)
    options.update(kwargs)
    settings = options.pop("settings", Settings(max_new_tokens=NEW_TOKENS))
    return EndpointBackend(server.url, settings, **options)


# ----------------------------------------------------------------------------------------------
# a. The local backend
# ----------------------------------------------------------------------------------------------


def test_local_answers_are_model_generate_turn_by_turn(local, local_output):
    out, records, summary = local_output
    jobs = read_jobs([CHAT], BadSamples(), 4)
    assert [r["id"] for r in records] == ["tiny-0", "tiny_chat.jsonl:2", "tiny-2", "tiny_chat.jsonl:4"]
    assert summary["counts"]["ok"] + summary["counts"]["length"] == 4 == summary["records_in_output"]
    for record, job in zip(records, jobs):
        original = job.conversation.messages
        assert [m["role"] for m in record["messages"]] == [m["role"] for m in original]
        for new, old in zip(record["messages"], original):
            if old["role"] != "assistant":
                assert new == old  # user and system turns untouched
            else:
                assert new["content"].strip()
        assert record["regen"]["backend"] == "local" and record["regen"]["max_new_tokens"] == NEW_TOKENS
        assert record["regen"]["temperature"] == 0.0 and record["regen"]["thinking"] is None
        assert len(record["regen"]["finish_reasons"]) == sum(m["role"] == "assistant" for m in original)
    counted = [r for rec in records for r in rec["regen"]["finish_reasons"]]
    assert summary["turns"] == len(counted) == 5 and summary["counts"]["length"] == sum(
        "length" in rec["regen"]["finish_reasons"] for rec in records)

    # The multi-turn conversation, checked against model.generate on single unpadded contexts.
    multi = records[2]["messages"]
    assert multi[0]["content"] == "How many legs does a spider have?"
    assert multi[1]["content"] == reference_answer(local, multi[:1])
    assert multi[1]["content"] != jobs[2].conversation.messages[1]["content"]  # a new answer, so ...
    assert multi[3]["content"] == reference_answer(local, multi[:3])  # ... turn 2 saw the regenerated turn 1
    with_original = reference_answer(local, jobs[2].conversation.messages[:3])
    assert multi[3]["content"] != with_original
    # A cut answer is the 16 tokens generated; an answer that ended is shorter.
    for rec in records:
        for message, finish in zip([m for m in rec["messages"] if m["role"] == "assistant"],
                                   rec["regen"]["finish_reasons"]):
            n = len(local.tokenizer(message["content"], add_special_tokens=False)["input_ids"])
            assert (n >= NEW_TOKENS - 1) if finish == "length" else (finish == "stop" and n < NEW_TOKENS)


def test_output_goes_straight_into_prepare_data(smollm2_dir, local_output, tmp_path, capsys):
    out, records, _ = local_output
    overrides = [f"target.hf_dir={smollm2_dir}", f"data.train_files={json.dumps([out])}",
                 f"data.cache_dir={tmp_path / 'cache'}"]
    assert cli_main(["prepare-data", "--config", TINY, *overrides]) == 0
    assert "bad samples: none" in capsys.readouterr().out
    train, evaluation, bad = prepare_data(load_config(TINY, overrides))  # the entry the CLI wrote
    assert bad.total == 0 and train.stats["conversations"] + evaluation.stats["conversations"] == 4
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = "".join(tokenizer.decode(part.input_ids[r][:part.row_lengths[r]].tolist())
                   for part in (train, evaluation) for r in range(len(part)))
    for record in records:
        for message in record["messages"]:
            if message["role"] == "assistant":
                assert message["content"] + "<|im_end|>" in text  # trained on as the answer


def test_local_refuses_a_prompt_longer_than_the_model(local, tmp_path):
    data = write_chat(tmp_path / "in.jsonl", [["word " * 9000, "old"], ["What is 2 + 2?", "old"]])
    out = str(tmp_path / "out.jsonl")
    summary = regenerate([data], out, local, progress=False)
    assert summary["counts"]["refused"] == 1 and summary["refused_by"] == {"prompt too long": 1}
    assert summary["first"]["refused"]["id"] == "c0" and "8192 positions" in summary["first"]["refused"]["detail"]
    assert [r["id"] for r in read_records(out)] == ["c1"]


def test_local_refuses_a_context_over_max_context_tokens(local, tmp_path):
    data = write_chat(tmp_path / "in.jsonl", [["word " * 300, "old"], ["What is 2 + 2?", "old"]])
    out = str(tmp_path / "out.jsonl")
    short = LocalBackend(local.model, local.tokenizer, local.settings, max_context_tokens=100)
    summary = regenerate([data], out, short, progress=False)
    assert summary["counts"]["refused"] == 1 and summary["refused_by"] == {"context too long": 1}
    assert "--max-context-tokens 100" in summary["first"]["refused"]["detail"]
    assert [r["id"] for r in read_records(out)] == ["c1"]


def test_thinking_reaches_the_local_chat_template(local, smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>assistant\n"
                               "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
                               "{% endif %}")
    messages = [{"role": "user", "content": "hi"}]
    off = LocalBackend(local.model, tokenizer, Settings(thinking=False))
    default = LocalBackend(local.model, tokenizer, Settings())
    assert off.prompt_text(messages).endswith("assistant\n<think></think>")
    assert default.prompt_text(messages).endswith("assistant\n")


# ----------------------------------------------------------------------------------------------
# b. The endpoint backend against a real server
# ----------------------------------------------------------------------------------------------


def test_endpoint_serving_local_answers_through_dropped_connections_and_500s(local, local_output, serve, tmp_path):
    """The server answers with the local backend; its first try at the first, third ... context closes the
    socket without a response, its first try at the second, fourth ... answers 500."""
    lock = threading.Lock()
    order: dict[str, int] = {}

    def answer(body):
        assert body["model"] == "smollm2" and body["max_tokens"] == NEW_TOKENS and body["temperature"] == 0.0
        assert "chat_template_kwargs" not in body and "seed" not in body
        with lock:
            (reply,) = local.generate([body["messages"]])
        return reply.text, reply.finish_reason, reply.tokens

    def fault(body, attempt, n):
        key = json.dumps(body["messages"], sort_keys=True)
        with lock:
            index = order.setdefault(key, len(order))
        return None if attempt > 1 else ("drop" if index % 2 == 0 else 500)

    server = serve(answer, fault)
    out = str(tmp_path / "out.jsonl")
    summary = regenerate([CHAT], out, endpoint(server, concurrency=2), max_samples=4, progress=False)
    expected = local_output[1]
    records = read_records(out)
    assert [r["id"] for r in records] == [r["id"] for r in expected]
    for got, want in zip(records, expected):
        assert got["messages"] == want["messages"]
        assert got["regen"]["finish_reasons"] == want["regen"]["finish_reasons"]
        assert got["regen"]["backend"] == "endpoint" and got["regen"]["model"] == "smollm2"
    assert summary["counts"]["failed"] == 0 and summary["turns"] == 5
    assert len(server.answered) == 5 and server.requests == 10  # every context failed once, answered once


def test_endpoint_many_conversations_nothing_lost_nothing_duplicated(serve, tmp_path):
    convs = many_conversations(12)
    data = write_chat(tmp_path / "in.jsonl", convs)

    def fault(body, attempt, n):  # a context's first tries fail in one of several ways, a later one succeeds
        kind = int(hashlib.sha1(json.dumps(body["messages"]).encode()).hexdigest(), 16) % 4
        plan = {0: [], 1: ["drop"], 2: [500, "drop"], 3: [429, 503]}[kind]
        return plan[attempt - 1] if attempt <= len(plan) else None

    server = serve(fake_answer, fault)
    out = str(tmp_path / "out.jsonl")
    summary = regenerate([data], out, endpoint(server, concurrency=4), progress=False)
    records = read_records(out)
    assert [r["id"] for r in records] == [f"c{i}" for i in range(len(convs))]  # input order, each once
    jobs = read_jobs([data], BadSamples())
    for record, job in zip(records, jobs):
        assert record["messages"] == expected_messages(job.conversation.messages)
    turns = sum(len(c) // 2 for c in convs)
    assert summary["counts"] == {"ok": 12, "length": 0, "empty": 0, "refused": 0, "failed": 0}
    assert len(server.answered) == turns == summary["turns"] and summary["tokens"] == 3 * turns
    assert sorted(map(json.dumps, server.answered)) == sorted(set(map(json.dumps, server.answered)))
    assert not os.path.exists(side_paths(out)[0])  # nothing rejected


def test_max_turns_answers_the_first_turns_and_ends_the_conversation_there(serve, tmp_path):
    convs = many_conversations(6)  # conversations 0 and 3 have two assistant turns
    data = write_chat(tmp_path / "in.jsonl", convs)
    server = serve(fake_answer)
    out = str(tmp_path / "out.jsonl")
    summary = regenerate([data], out, endpoint(server, settings=Settings(max_new_tokens=NEW_TOKENS, max_turns=1)),
                         progress=False)
    records = read_records(out)
    assert summary["counts"]["ok"] == 6 and summary["turns"] == 6 == len(server.answered)
    for record, job in zip(records, read_jobs([data], BadSamples())):
        assert record["messages"] == expected_messages(job.conversation.messages[:2])
        assert record["regen"]["max_turns"] == 1 and len(record["regen"]["finish_reasons"]) == 1
    # Resuming with another --max-turns is refused by name.
    with pytest.raises(UserError, match="max_turns=1"):
        regenerate([data], out, endpoint(server, settings=Settings(max_new_tokens=NEW_TOKENS, max_turns=2)),
                   progress=False)


def test_endpoint_request_options(serve, tmp_path):
    data = write_chat(tmp_path / "in.jsonl", many_conversations(2))
    server = serve(fake_answer)
    settings = Settings(max_new_tokens=7, temperature=0.7, top_p=0.9, seed=3, thinking=False)
    regenerate([data], str(tmp_path / "out.jsonl"), endpoint(server, settings=settings), progress=False)
    for body in server.bodies:
        assert body["chat_template_kwargs"] == {"enable_thinking": False}
        assert (body["max_tokens"], body["temperature"], body["top_p"]) == (7, 0.7, 0.9)
        assert body["seed"] == settings.context_seed(body["messages"])
    assert len({b["seed"] for b in server.bodies}) == len(server.bodies)  # one seed per context


def test_endpoint_errors_are_one_line(serve, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match=rf"--endpoint http://127.0.0.1:{port}: cannot reach .*/v1/models: .*Connection"):
        EndpointBackend(f"http://127.0.0.1:{port}", Settings(), max_retries=1, backoff=0.01)
    server = serve(fake_answer)
    with pytest.raises(UserError, match=r"--model 'other' is not served at .*; it serves smollm2"):
        EndpointBackend(server.url + "/v1/", Settings(), model="other")
    with pytest.raises(UserError, match=r"--endpoint 'localhost:8000': expected an http"):
        EndpointBackend("localhost:8000", Settings())
    with pytest.raises(UserError, match=r"--top-p 0.0: expected a probability"):
        EndpointBackend(server.url, Settings(top_p=0.0))


# ----------------------------------------------------------------------------------------------
# c. Resume
# ----------------------------------------------------------------------------------------------


def test_resume_after_the_server_dies(serve, tmp_path):
    convs = many_conversations(9)
    data = write_chat(tmp_path / "in.jsonl", convs)
    whole = str(tmp_path / "whole.jsonl")
    regenerate([data], whole, endpoint(serve(fake_answer), concurrency=3), progress=False)

    # Answers 5 requests, then closes every connection: a conversation cut between turns is not written.
    dying = serve(fake_answer, lambda body, attempt, n: "drop" if n >= 5 else None)
    out = str(tmp_path / "out.jsonl")
    first = regenerate([data], out, endpoint(dying, concurrency=1, max_retries=1), stop_after_failures=2,
                       progress=False)
    # c0 (2 turns), c1, c2 answered; c3 got its first turn and failed its second; c4 failed: two failures
    # in a row stop the run (c5 may already have been on its way, and failed too).
    assert first["stopped_after_failures"] and first["counts"]["failed"] in (2, 3)
    assert first["counts"]["ok"] == first["records_in_output"] == 3
    assert first["answered"] + first["not_answered"] == 9 and first["not_answered"] >= 3
    partial = read_records(out)
    assert [r["id"] for r in partial] == ["c0", "c1", "c2"]

    healthy = serve(fake_answer)
    second = regenerate([data], out, endpoint(healthy, concurrency=3), progress=False)
    assert second["already_done"] == 3 and second["counts"]["ok"] == 6 and second["counts"]["failed"] == 0
    asked = {json.dumps(m) for m in healthy.answered}
    for record in partial:  # nothing finished before is asked again
        assert not any(json.dumps(record["messages"][:i]) in asked for i in range(len(record["messages"])))
    with open(out, "rb") as a, open(whole, "rb") as b:
        assert a.read() == b.read()


def test_resume_drops_a_torn_line(serve, tmp_path):
    data = write_chat(tmp_path / "in.jsonl", many_conversations(6))
    whole = str(tmp_path / "whole.jsonl")
    regenerate([data], whole, endpoint(serve(fake_answer)), progress=False)
    with open(whole, "rb") as fh:
        lines = fh.readlines()
    out = str(tmp_path / "out.jsonl")
    with open(out, "wb") as fh:
        fh.write(lines[0] + lines[3] + lines[2][:40])  # out of order, then a line cut by a kill
    server = serve(fake_answer)
    summary = regenerate([data], out, endpoint(server), progress=False)
    assert summary["already_done"] == 2 and summary["counts"]["ok"] == 4
    assert {json.dumps(m[:1]) for m in server.answered} == {
        json.dumps([{"role": "user", "content": f"question {i}"}]) for i in (1, 2, 4, 5)}
    with open(out, "rb") as a:
        assert a.read() == b"".join(lines)
    # A run with other settings does not mix its answers into this file.
    with pytest.raises(UserError, match=r"out.jsonl:1: written with max_new_tokens=16, this run has max_new_tokens=8"):
        regenerate([data], out, endpoint(server, settings=Settings(max_new_tokens=8)), progress=False)
    with open(out, "ab") as fh:
        fh.write(b"not json\n")
    with pytest.raises(UserError, match=r"out.jsonl:7: not a JSON record"):
        regenerate([data], out, endpoint(server), progress=False)


# ----------------------------------------------------------------------------------------------
# d. Outcomes by reason, and the CLI
# ----------------------------------------------------------------------------------------------


def test_refusal_empty_and_length_are_counted(serve, tmp_path, capsys):
    data = write_chat(tmp_path / "in.jsonl", [["hello", "a"], ["please REFUSE", "b"], ["be LONG", "c"],
                                              ["first", "d", "now SILENT", "e"], ["bye", "f"]])
    server = serve(fake_answer)
    out = str(tmp_path / "out.jsonl")
    argv = ["regenerate", data, "--endpoint", server.url, "-o", out, "--max-new-tokens", str(NEW_TOKENS),
            "--concurrency", "2", "--backoff", "0.01", "--no-progress"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "written 2 ok + 1 cut at the token limit; not written 1 empty, 1 refused, 0 failed" in printed
    assert "refused by reason: HTTP 400 x1" in printed
    with open(side_paths(out)[1]) as fh:
        summary = json.load(fh)
    assert summary["counts"] == {"ok": 2, "length": 1, "empty": 1, "refused": 1, "failed": 0}
    assert summary["refused_by"] == {"HTTP 400": 1}
    assert summary["first"]["refused"] == {"id": "c1", "turn": 0,
                                           "detail": "HTTP 400: This model's maximum context length is exceeded"}
    assert summary["first"]["empty"]["id"] == "c3" and summary["first"]["empty"]["turn"] == 1
    refusals = [b for b in server.bodies if "REFUSE" in b["messages"][-1]["content"]]
    assert len(refusals) == 1  # a 4xx is not retried
    records = {r["id"]: r for r in read_records(out)}
    assert list(records) == ["c0", "c2", "c4"]
    assert records["c2"]["regen"]["finish_reasons"] == ["length"]
    with open(side_paths(out)[0]) as fh:
        rejected = sorted((r["id"], r["reason"], r["turn"]) for r in map(json.loads, fh))
    assert rejected == [("c1", "refused", 0), ("c3", "empty", 1)]

    # Rerun: refused and empty conversations are final, nothing is asked again.
    before = server.requests
    assert cli_main(argv) == 0
    assert server.requests == before
    with open(side_paths(out)[1]) as fh:
        assert json.load(fh)["already_done"] == 5


def test_cli_reports_failures_and_bad_input(serve, tmp_path, capsys):
    data = write_chat(tmp_path / "in.jsonl", many_conversations(3))
    server = serve(fake_answer, lambda body, attempt, n: 502)
    out = str(tmp_path / "out.jsonl")
    argv = ["regenerate", data, "--endpoint", server.url, "-o", out, "--max-retries", "1", "--backoff", "0.01",
            "--concurrency", "1", "--no-progress"]
    assert cli_main(argv) == 1
    printed = capsys.readouterr().out
    assert "0 failed" not in printed and "3 failed" in printed and "rerun the same command" in printed
    assert "failed: first c0 (turn 0): HTTP 502: injected 502 (after 2 attempts)" in printed
    assert not os.path.exists(out)
    assert cli_main(["regenerate", str(tmp_path / "missing.jsonl"), "--endpoint", server.url, "-o", out]) == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err
    assert cli_main(["regenerate", data, "--endpoint", server.url, "-o", data]) == 2
    assert "is also an input" in capsys.readouterr().err
