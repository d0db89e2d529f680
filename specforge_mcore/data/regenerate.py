"""``specforge-mcore regenerate``: replace a dataset's assistant turns with the target's own answers.

A draft learns the distribution it is trained on; answers written by another model (ShareGPT's are
ChatGPT's) teach it to predict text the target would not produce. This command asks the target to answer
every assistant turn again, turn by turn: the answer to turn k sees the regenerated turns before it. User
and system turns are kept as they are; a trailing user turn without an answer stays unanswered.

The contract (docs/design.md §12):

* Input: whatever ``prepare-data`` reads (``conversations.read_conversations``: ShareGPT / OpenAI
  messages in .json / .jsonl / .gz, the packaged sources ``sharegpt``, ``gsm8k:train``, ...), with its bad-sample policy.
* Ids: a record's own ``id``, else ``<file name>:<line>``; a repeat gets ``#2``, ``#3``. Ids are stable
  for the same input, which is what resuming relies on.
* Output: chat JSONL, one record per line: ``{"id", "messages", "regen": {backend, model, temperature,
  top_p, max_new_tokens, seed, thinking, finish_reasons}}`` (``finish_reasons``: one per assistant turn).
  ``prepare-data`` reads it as it is. Records are appended as conversations finish, each as one complete
  line, flushed at once and fsynced every few seconds; when the run ends the file is rewritten (atomically)
  in input order, so an interrupted and resumed run ends with the same file as an uninterrupted one.
* Resume: rerunning the same command reads the output, drops a torn last line (a killed writer), checks
  that it was written with the same backend, model and sampling settings, and skips every id in it.
* Outcomes, counted by reason: ``ok``; ``length`` (some turn stopped at ``--max-new-tokens``: written, as
  the target's real but cut answer); ``empty`` (an answer with no text), ``refused`` (HTTP 4xx other than
  429, a prompt longer than the local model's positions, a chat template that rejects the context) and
  ``failed`` (a request that failed every retry). The last three are not training data and are not
  written; they go to ``<output>.rejected.jsonl``. A rerun does not ask again for ``empty`` or
  ``refused`` ones (the same answer would come back) and retries the ``failed`` ones.
* At the end: one summary line and ``<output>.summary.json``; exit status 1 when a conversation failed
  (rerun to retry) or the run stopped after ``--stop-after-failures`` failures in a row.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

from tqdm import tqdm

from specforge_mcore.data.conversations import BadSamples, Conversation, read_conversations
from specforge_mcore.data.regen_backends import Backend, EndpointBackend, Settings
from specforge_mcore.data.sources import CONVERSATION_SOURCES, is_source
from specforge_mcore.errors import UserError
from specforge_mcore.fileio import fsync_path

log = logging.getLogger(__name__)

REASONS = ("ok", "length", "empty", "refused", "failed")
WRITTEN = ("ok", "length")
FINAL = ("empty", "refused")  # a rerun would get the same answer: not asked again
SETTINGS_KEYS = ("backend", "model", "temperature", "top_p", "max_new_tokens", "seed", "thinking", "max_turns")
FSYNC_SECONDS = 2.0


@dataclass
class Job:
    index: int  # position in the input
    id: str
    conversation: Conversation


@dataclass
class Outcome:
    job: Job
    messages: list[dict]
    positions: list[int]  # indices of the assistant turns
    finish_reasons: list[str] = field(default_factory=list)
    tokens: int = 0
    reason: Optional[str] = None  # one of REASONS once decided
    detail: str = ""
    turn: Optional[int] = None  # the assistant turn (0-based) that decided a rejection


def side_paths(output: str) -> tuple[str, str]:
    """``(<output>.rejected.jsonl, <output>.summary.json)`` with a ``.jsonl`` suffix of ``output`` dropped."""
    base = output[:-len(".jsonl")] if output.endswith(".jsonl") else output
    return base + ".rejected.jsonl", base + ".summary.json"


def read_jobs(inputs: Sequence[str], bad: BadSamples, max_samples: Optional[int] = None) -> list[Job]:
    jobs: list[Job] = []
    used: set[str] = set()
    for conversation in read_conversations(inputs, bad):
        base = conversation.id if conversation.id is not None else os.path.basename(conversation.source)
        job_id, n = base, 1
        while job_id in used:
            n += 1
            job_id = f"{base}#{n}"
        used.add(job_id)
        jobs.append(Job(len(jobs), job_id, conversation))
        if max_samples is not None and len(jobs) >= max_samples:
            break
    return jobs


# ----------------------------------------------------------------------------------------------
# Answering
# ----------------------------------------------------------------------------------------------


def regenerate_batch(backend: Backend, jobs: list[Job]) -> list[Outcome]:
    """Answer every assistant turn of ``jobs``, turn by turn; each backend call takes the next turn of every
    conversation still going. A conversation stops at its first empty, refused or failed turn. With
    ``max_turns`` only the first N assistant turns are answered and the conversation ends after them."""
    outcomes = []
    limit = backend.settings.max_turns
    for job in jobs:
        messages = [dict(m) for m in job.conversation.messages]
        positions = [i for i, m in enumerate(messages) if m["role"] == "assistant"][:limit]
        if positions:
            messages = messages[:positions[-1] + 1]
        outcomes.append(Outcome(job, messages, positions))
    while True:
        active = [o for o in outcomes if o.reason is None and len(o.finish_reasons) < len(o.positions)]
        if not active:
            break
        contexts = [o.messages[:o.positions[len(o.finish_reasons)]] for o in active]
        replies = backend.generate(contexts)
        if len(replies) != len(contexts):
            raise RuntimeError(f"the {backend.name} backend gave {len(replies)} replies for {len(contexts)} contexts")
        for outcome, reply in zip(active, replies):
            turn = len(outcome.finish_reasons)
            outcome.tokens += reply.tokens
            if reply.refused or reply.failed:
                outcome.reason, outcome.detail = ("refused", reply.refused) if reply.refused else ("failed", reply.failed)
            elif not reply.text.strip():
                outcome.reason, outcome.detail = "empty", f"finish_reason {reply.finish_reason!r}, {reply.tokens} tokens"
            if outcome.reason is not None:
                outcome.turn = turn
                continue
            outcome.messages[outcome.positions[turn]] = {"role": "assistant", "content": reply.text}
            outcome.finish_reasons.append(reply.finish_reason)
    for outcome in outcomes:
        if outcome.reason is None:
            outcome.reason = "length" if "length" in outcome.finish_reasons else "ok"
    return outcomes


# ----------------------------------------------------------------------------------------------
# The output files
# ----------------------------------------------------------------------------------------------


def scan_records(path: str, settings: dict) -> Iterator[tuple[dict, int, int]]:
    """The records of an output (or rejected) file as ``(record, offset, length)``, checked against this
    run's ``settings``. A last line without its newline is what a killed writer leaves: it is cut off the
    file. Anything else that is not a record of ours is an error naming the line."""
    if not os.path.exists(path):
        return
    with open(path, "r+b") as fh:
        offset = 0
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            if not raw.endswith(b"\n"):
                fh.truncate(offset)
                fh.flush()
                os.fsync(fh.fileno())
                log.warning("%s: dropped a torn last line (%d bytes) left by an interrupted run", where, len(raw))
                return
            try:
                record = json.loads(raw)
            except ValueError as exc:
                raise UserError(f"{where}: not a JSON record ({exc}); regenerate writes whole lines, so this "
                                f"file was written or changed by something else") from None
            if not (isinstance(record, dict) and isinstance(record.get("id"), str)
                    and isinstance(record.get("regen"), dict)):
                raise UserError(f"{where}: expected a record of regenerate (an object with a string 'id' and a "
                                f"'regen' object)")
            for key in SETTINGS_KEYS:
                if record["regen"].get(key) != settings[key]:
                    raise UserError(f"{where}: written with {key}={record['regen'].get(key)!r}, this run has "
                                    f"{key}={settings[key]!r}; rerun with the same settings or choose another --output")
            yield record, offset, len(raw)
            offset += len(raw)


class Appender:
    """Appends one JSON record per line: each written whole and flushed, the file fsynced every few seconds
    and when closed. Opened on the first record."""

    def __init__(self, path: str):
        self.path, self.fh, self.synced = path, None, time.monotonic()

    def write(self, record: dict) -> None:
        if self.fh is None:
            self.fh = open(self.path, "ab")
        self.fh.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self.fh.flush()
        if time.monotonic() - self.synced >= FSYNC_SECONDS:
            os.fsync(self.fh.fileno())
            self.synced = time.monotonic()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            self.fh = None


def write_in_order(path: str, order: dict[str, int], settings: dict) -> int:
    """Rewrite ``path`` with its records in input order (ids not in this input last, as they were), each id
    once; atomic (a temporary file renamed over it). Returns the number of records."""
    entries = [(record["id"], offset, length) for record, offset, length in scan_records(path, settings)]
    rank = {}
    for k, (record_id, _, _) in enumerate(entries):
        rank.setdefault(record_id, (order.get(record_id, len(order)), k))
    keep = sorted(range(len(entries)), key=lambda k: rank[entries[k][0]])
    keep = [k for k in keep if rank[entries[k][0]][1] == k]  # the first copy of an id, should there be two
    if keep == list(range(len(entries))):
        return len(entries)
    if len(keep) < len(entries):
        log.warning("%s held %d duplicate records; each id is kept once", path, len(entries) - len(keep))
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            for k in keep:
                src.seek(entries[k][1])
                dst.write(src.read(entries[k][2]))
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_path(os.path.dirname(os.path.abspath(path)))
    return len(keep)


def _write_json(path: str, tree: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(tree, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def settings_record(backend: Backend) -> dict:
    s = backend.settings
    return {"backend": backend.name, "model": backend.model_name, "temperature": s.temperature, "top_p": s.top_p,
            "max_new_tokens": s.max_new_tokens, "seed": s.seed, "thinking": s.thinking, "max_turns": s.max_turns}


def regenerate(inputs: Sequence[str], output: str, backend: Backend, *, max_samples: Optional[int] = None,
               on_bad_sample: str = "skip", stop_after_failures: int = 16, progress: bool = True) -> dict:
    """Regenerate the conversations of ``inputs`` into ``output`` (resuming it); returns the summary,
    which is also written to ``<output>.summary.json``."""
    if max_samples is not None and max_samples < 1:
        raise UserError(f"--max-samples {max_samples}: expected at least 1 (or leave it out for all)")
    if os.path.isdir(output):
        raise UserError(f"--output {output} is a directory; expected the path of a .jsonl file")
    if any(os.path.exists(p) and os.path.abspath(p) == os.path.abspath(output) for p in inputs):
        raise UserError(f"--output {output} is also an input; write the regenerated data to another file")
    rejected_path, summary_path = side_paths(output)
    settings = settings_record(backend)
    bad = BadSamples(on_bad_sample)  # type: ignore[arg-type]
    jobs = read_jobs(inputs, bad, max_samples)
    if not jobs:
        raise UserError(f"no usable conversations in {', '.join(inputs)}\n{bad.summary()}")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)

    done = {record["id"] for record, _, _ in scan_records(output, settings)}
    rejected_before: dict[str, str] = {}
    for record, _, _ in scan_records(rejected_path, settings):
        rejected_before[record["id"]] = str(record.get("reason"))
    skip = done | {i for i, reason in rejected_before.items() if reason in FINAL}
    todo = [job for job in jobs if job.id not in skip]
    order = {job.id: job.index for job in jobs}
    strangers = len(done - order.keys())
    if strangers:
        log.warning("%s holds %d records whose ids are not in this input; they are kept, after the others",
                    output, strangers)

    counts = dict.fromkeys(REASONS, 0)
    first: dict[str, dict] = {}
    refused_by: dict[str, int] = {}
    turns = tokens = consecutive_failures = 0
    stopped = False
    records, rejections = Appender(output), Appender(rejected_path)
    start = time.perf_counter()
    # conv/s even below one per second (tqdm's default turns that into s/conv); tok/s in the postfix
    bar = tqdm(total=len(todo), desc="regenerate", unit="conv", mininterval=0.5, disable=not progress,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]")

    def take(outcome: Outcome) -> None:
        nonlocal turns, tokens, consecutive_failures, stopped
        counts[outcome.reason] += 1
        turns += len(outcome.finish_reasons)
        tokens += outcome.tokens
        if outcome.reason in WRITTEN:
            records.write({"id": outcome.job.id, "messages": outcome.messages,
                           "regen": {**settings, "finish_reasons": outcome.finish_reasons}})
        else:
            first.setdefault(outcome.reason, {"id": outcome.job.id, "turn": outcome.turn, "detail": outcome.detail})
            rejections.write({"id": outcome.job.id, "reason": outcome.reason, "turn": outcome.turn,
                              "detail": outcome.detail, "regen": settings})
            if outcome.reason == "refused":
                key = outcome.detail.split(":", 1)[0]
                refused_by[key] = refused_by.get(key, 0) + 1
        consecutive_failures = consecutive_failures + 1 if outcome.reason == "failed" else 0
        if stop_after_failures and consecutive_failures >= stop_after_failures and not stopped:
            stopped = True
            log.warning("%d conversations in a row failed (last: %s); stopping; rerun the same command to "
                        "continue", consecutive_failures, outcome.detail)
        bar.update(1)
        elapsed = time.perf_counter() - start
        bar.set_postfix_str(f"{tokens / max(elapsed, 1e-9):.1f} tok/s", refresh=False)

    batches = iter([todo[at:at + backend.batch_size] for at in range(0, len(todo), backend.batch_size)])
    try:
        with ThreadPoolExecutor(max_workers=backend.workers, thread_name_prefix="regenerate") as pool:
            pending: set = set()
            try:
                while True:
                    while not stopped and len(pending) < 2 * backend.workers:
                        batch = next(batches, None)
                        if batch is None:
                            break
                        pending.add(pool.submit(regenerate_batch, backend, batch))
                    if not pending:
                        break
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        for outcome in future.result():
                            take(outcome)
            finally:
                for future in pending:
                    future.cancel()
    finally:
        bar.close()
        records.close()
        rejections.close()
    seconds = time.perf_counter() - start

    in_output = write_in_order(output, order, settings) if os.path.exists(output) else 0
    answered = sum(counts.values())
    summary = {
        "output": output, "rejected_file": rejected_path, "settings": settings,
        "inputs": list(inputs), "conversations": len(jobs), "already_done": len(jobs) - len(todo),
        "answered": answered, "not_answered": len(todo) - answered, "counts": counts,
        "written": counts["ok"] + counts["length"], "not_written": answered - counts["ok"] - counts["length"],
        "first": first, "refused_by": refused_by, "turns": turns, "tokens": tokens,
        "seconds": round(seconds, 3), "conversations_per_s": round(answered / seconds, 3) if seconds else None,
        "tokens_per_s": round(tokens / seconds, 3) if seconds else None,
        "records_in_output": in_output, "stopped_after_failures": stopped, "bad_samples": bad.to_dict(),
    }
    _write_json(summary_path, summary)
    summary["summary_file"] = summary_path
    return summary


def summary_text(summary: dict) -> str:
    c = summary["counts"]
    line = (f"regenerate: {summary['answered']} of {summary['conversations']} conversations answered "
            f"({summary['already_done']} already done): written {c['ok']} ok + {c['length']} cut at the token limit; "
            f"not written {c['empty']} empty, {c['refused']} refused, {c['failed']} failed; "
            f"{summary['tokens']} tokens in {summary['seconds']:.1f} s "
            f"({summary['conversations_per_s'] or 0:.2f} conv/s, {summary['tokens_per_s'] or 0:.1f} tok/s); "
            f"{summary['output']} holds {summary['records_in_output']} records")
    lines = [line]
    for reason, where in summary["first"].items():
        lines.append(f"  {reason}: first {where['id']} (turn {where['turn']}): {where['detail']}")
    if summary["refused_by"]:
        lines.append("  refused by reason: " + ", ".join(f"{k} x{v}" for k, v in summary["refused_by"].items()))
    if summary["bad_samples"]["counts"]:
        lines.append("  " + BadSamples.from_dict(summary["bad_samples"]).summary().replace("\n", "\n  "))
    if summary["not_answered"]:
        lines.append(f"  {summary['not_answered']} conversations not asked (stopped early)")
    if c["failed"] or summary["stopped_after_failures"]:
        lines.append("  rerun the same command to retry the failed conversations")
    lines.append(f"  summary: {summary['summary_file']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="conversation files as prepare-data reads them (ShareGPT or OpenAI messages; .json, "
                             ".jsonl, .gz) or packaged sources: " + ", ".join(CONVERSATION_SOURCES))
    parser.add_argument("--output", "-o", required=True, help="chat JSONL to write (and to resume)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--endpoint", metavar="URL", help="an OpenAI-compatible server (SGLang, vLLM): URL/v1/chat/completions")
    which.add_argument("--target", metavar="DIR", help="answer with this HF model directory here (transformers)")
    gen = parser.add_argument_group("sampling (both backends)")
    gen.add_argument("--max-new-tokens", type=int, default=512)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                     help="enable_thinking for reasoning chat templates (default: the template's own)")
    ep = parser.add_argument_group("--endpoint")
    ep.add_argument("--model", help="the served model name (default: the one the server lists)")
    ep.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    ep.add_argument("--max-retries", type=int, default=5, help="retries per request (connection errors, timeouts, 5xx, 429)")
    ep.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    ep.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds (doubles, with jitter)")
    ep.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    local = parser.add_argument_group("--target")
    local.add_argument("--batch-size", type=int, default=8, help="conversations per generate call")
    local.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    gen.add_argument("--max-turns", type=int, default=None,
                     help="answer only the first N assistant turns of each conversation and end it there (the "
                          "later turns would lie beyond the training length anyway)")
    local.add_argument("--max-context-tokens", type=int, default=None,
                       help="refuse (count, do not answer) contexts longer than this many tokens")
    parser.add_argument("--max-samples", type=int, help="only the first N usable conversations")
    parser.add_argument("--on-bad-sample", choices=("skip", "error"), default="skip")
    parser.add_argument("--stop-after-failures", type=int, default=16,
                        help="stop when this many conversations in a row failed every retry (0: never)")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    settings = Settings(args.max_new_tokens, args.temperature, args.top_p, args.seed, args.thinking, args.max_turns)
    settings.check()
    for path in args.inputs:  # before a model loads or a server is asked
        if not is_source(path) and not os.path.isfile(path):
            raise UserError(f"input {path} does not exist; expected a conversation file or one of "
                            f"{', '.join(CONVERSATION_SOURCES)}")
    if args.endpoint:
        backend: Backend = EndpointBackend(args.endpoint, settings, model=args.model, concurrency=args.concurrency,
                                           max_retries=args.max_retries, timeout=args.timeout,
                                           backoff=args.backoff, api_key=args.api_key)
    else:
        if args.model:
            raise UserError(f"--model {args.model!r} names a served model of --endpoint; with --target the model "
                            f"is the directory {args.target}")
        # Deferred: torch + transformers take about 2 s to import here (measured on the 2-core CI machine),
        # which an endpoint run never needs.
        from specforge_mcore.data.regen_local import LocalBackend

        backend = LocalBackend.from_dir(args.target, settings, batch_size=args.batch_size, dtype=args.dtype,
                                        max_context_tokens=args.max_context_tokens)
    summary = regenerate(args.inputs, args.output, backend, max_samples=args.max_samples,
                         on_bad_sample=args.on_bad_sample, stop_after_failures=args.stop_after_failures,
                         progress=not args.no_progress)
    print(summary_text(summary))
    return 1 if summary["counts"]["failed"] or summary["stopped_after_failures"] else 0
