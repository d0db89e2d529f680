"""``specforge-mcore eval``: speculative decoding with an exported draft against its target.

Loads the export (not the training checkpoint: what is measured is what is served), runs target-only
greedy decoding of every prompt (the reference; batched, ``--batch-size`` prompts per forward), then
speculative decoding for each ``STEPS,TOPK,NUM_DRAFT_TOKENS`` config: one prompt at a time, as a server
decodes one request, or, for chains with ``--spec-batch-size N``, N prompts together (eval/batched.py;
each prompt gets exactly what it gets alone). Every speculative generation must equal the reference
token for token; otherwise the command reports where and exits 1. The speedup's baseline is target-only
greedy decoding one prompt at a time, timed on the first ``--baseline-prompts`` prompts (whose outputs must
also equal the batched reference); a batched config is compared with the batched reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Optional, Sequence, Union

import torch

from tqdm import tqdm
from transformers import AutoTokenizer

from specforge_mcore.data.conversations import ROLE_MAP
from specforge_mcore.errors import UserError
from specforge_mcore.eval import report
from specforge_mcore.eval.batched import ChainBatchDecoder, generate_batched
from specforge_mcore.eval.speculative import (SpecConfig, SpeculativeDecoder, Target, check_pair, default_threads,
                                              eos_token_ids, first_mismatch, greedy_generate, greedy_generate_batch,
                                              load_target)
from specforge_mcore.export.io import load_export

PROMPT_SETS = ("gsm8k", "humaneval", "sharegpt-heldout")
DEFAULT_CONFIGS = ("3,1,4",)


Prompt = Union[str, list[dict]]  # one user turn, or a conversation ending with a user turn


def load_prompts(name: str) -> list[Prompt]:
    """A packaged prompt set by name, or a file: ``.jsonl`` (per line a chat record with ``messages``, or
    an object with a ``prompt``/``question``/``text`` string), ``.json`` (a list of strings) or plain text
    (one prompt per line). A chat record's prompt is its conversation up to and including the last user
    turn (``encode_prompt`` renders it with the chat template)."""
    from specforge_mcore.data import sources

    if name == "gsm8k":
        return sources.gsm8k_prompts()
    if name == "humaneval":
        return sources.humaneval_prompts()
    if name == "sharegpt-heldout":
        return sources.sharegpt_heldout_prompts()
    if not os.path.isfile(name):
        raise UserError(f"--prompts {name!r}: neither one of {', '.join(PROMPT_SETS)} nor a file")
    with open(name, encoding="utf-8") as fh:
        if name.endswith(".json"):
            data = json.load(fh)
            if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
                raise UserError(f"{name}: expected a JSON list of prompt strings")
            return data
        if name.endswith(".jsonl"):
            prompts: list[Prompt] = []
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{name}:{line_no}: not valid JSON: {exc}") from None
                prompts.append(_record_prompt(record, f"{name}:{line_no}"))
            return prompts
        return [line.rstrip("\n") for line in fh if line.strip()]


def _record_prompt(record, where: str) -> Prompt:
    if isinstance(record, dict) and "messages" in record:
        return _chat_prompt(record, where)
    text = next((record.get(k) for k in ("prompt", "question", "text") if isinstance(record, dict)
                 and isinstance(record.get(k), str)), None)
    if text is None:
        raise UserError(f"{where}: expected a chat record with a 'messages' list, or an object with a 'prompt', "
                        "'question' or 'text' string")
    return text


def _chat_prompt(record: dict, where: str) -> list[dict]:
    """The conversation of a ``messages`` record up to and including its last user turn."""
    raw = record["messages"]
    if not isinstance(raw, list):
        raise UserError(f"{where}: 'messages' is a {type(raw).__name__}, expected a list of "
                        "{\"role\": ..., \"content\": ...} objects")
    messages = []
    if isinstance(record.get("system"), str) and record["system"]:
        messages.append({"role": "system", "content": record["system"]})
    for i, message in enumerate(raw):
        role = ROLE_MAP.get(str(message.get("role", "")).strip().lower()) if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and content and all(isinstance(p, dict) and p.get("type") == "text"
                                                         and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if role is None or not isinstance(content, str):
            raise UserError(f"{where}: message {i} is {json.dumps(message)[:80]}, expected an object with a role "
                            f"({', '.join(sorted(set(ROLE_MAP.values())))}) and a text content")
        messages.append({"role": role, "content": content})
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        raise UserError(f"{where}: 'messages' has no user turn (the prompt is the conversation up to the last one)")
    return messages[: last_user + 1]


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """The prompt as the target sees it when served: through the chat template (a string is one user
    turn); a plain string without a template is tokenized as is."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not isinstance(prompt, str):
        raise UserError(f"chat prompts (records with 'messages') need a tokenizer with a chat template; "
                        f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')} has none (pass --tokenizer DIR)")
    return list(tokenizer(prompt)["input_ids"])


def parse_num_prompts(text: str | int | None) -> Optional[int]:
    """``--num-prompts``: a positive integer, or ``all`` (None)."""
    if text is None or (isinstance(text, str) and text.strip().lower() == "all"):
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"--num-prompts {text!r}: expected a positive integer or 'all'")
    return value


def _rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


def run_eval(target_dir: str, draft_dir: str, prompt_set: str = "gsm8k",
             configs: Sequence[str | SpecConfig] = DEFAULT_CONFIGS, num_prompts: Optional[int | str] = 8,
             max_new_tokens: int = 64, out_dir: Optional[str] = None, tokenizer_dir: Optional[str] = None,
             max_prompt_tokens: int = 1024, dtype: str = "float32", progress: bool = True, batch_size: int = 16,
             baseline_prompts: int = 2, threads: Optional[int] = None, spec_batch_size: int = 1
             ) -> report.EvalResults:
    """Evaluate the export in ``draft_dir`` against ``target_dir`` (the function ``make demo`` calls).

    ``num_prompts``: a count, or None / ``"all"``. ``spec_batch_size``: prompts decoded speculatively
    together (chain configs; 1 = one at a time, the latency of a single request). ``threads``: CPU threads (default ``default_threads()``;
    the previous setting is restored on return). Returns the results (``results.lossless`` tells whether
    every speculative generation matched greedy decoding); with ``out_dir``, also writes ``eval.json``,
    ``eval.md`` and ``eval.png`` there.
    """
    specs = [c if isinstance(c, SpecConfig) else SpecConfig.parse(c) for c in configs]
    limit = parse_num_prompts(num_prompts)
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens}: expected a positive integer")
    if batch_size < 1 or baseline_prompts < 0 or spec_batch_size < 1:
        raise UserError(f"--batch-size {batch_size} / --baseline-prompts {baseline_prompts} / --spec-batch-size "
                        f"{spec_batch_size}: expected >= 1 / >= 0 / >= 1")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise UserError(f"--dtype {dtype!r}: expected float32 or bfloat16")
    if threads is not None and threads < 1:
        raise UserError(f"--threads {threads}: expected a positive integer")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    try:
        return _run_eval(target_dir, draft_dir, prompt_set, specs, limit, max_new_tokens, out_dir, tokenizer_dir,
                         max_prompt_tokens, dtype, torch_dtype, progress, batch_size, baseline_prompts,
                         spec_batch_size)
    finally:
        torch.set_num_threads(previous_threads)


def _run_eval(target_dir, draft_dir, prompt_set, specs, limit, max_new_tokens, out_dir, tokenizer_dir,
              max_prompt_tokens, dtype, torch_dtype, progress, batch_size, baseline_prompts,
              spec_batch_size) -> report.EvalResults:
    draft = load_export(draft_dir).eval()
    model = load_target(target_dir, torch_dtype)
    check_pair(model, draft, target_dir, draft_dir)
    draft.set_embedding(model.get_input_embeddings().weight.detach().float())
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or target_dir)
    eos = eos_token_ids(model, tokenizer)
    target = Target(model, draft.arch.capture_layer_ids)

    prompts, skipped = [], 0
    for text in load_prompts(prompt_set):
        ids = encode_prompt(tokenizer, text)
        if len(ids) > max_prompt_tokens:
            skipped += 1
            continue
        prompts.append(torch.tensor(ids))
        if len(prompts) == limit:
            break
    if not prompts:
        raise UserError(f"--prompts {prompt_set}: no prompt of at most {max_prompt_tokens} tokens")

    start = time.perf_counter()
    with tqdm(total=len(prompts), desc=f"target only (batches of {batch_size})", unit="prompt",
              disable=not progress) as bar:
        references = greedy_generate_batch(target, prompts, max_new_tokens, eos, batch_size, progress=bar.update)
    reference_seconds = time.perf_counter() - start
    # The speedup's baseline: target-only greedy decoding one prompt at a time, as the speculative runs
    # decode; its outputs must also equal the batched reference (batching must not change a token).
    singles = [greedy_generate(target, prompt, max_new_tokens, eos) for prompt in prompts[:baseline_prompts]]
    unequal = [i for i, (single, ref) in enumerate(zip(singles, references)) if single.tokens != ref.tokens]
    results = report.EvalResults(
        target=os.path.abspath(target_dir), draft=os.path.abspath(draft_dir), prompt_set=prompt_set,
        num_prompts=len(prompts), max_new_tokens=max_new_tokens,
        baseline_new_tokens=sum(len(r.tokens) for r in singles),
        baseline_seconds=sum(r.seconds for r in singles), configs=[], skipped_prompts=skipped,
        reference_new_tokens=sum(len(r.tokens) for r in references), reference_seconds=reference_seconds,
        reference_batch_size=batch_size, baseline_prompts=len(singles), baseline_mismatched_prompts=unequal,
        meta={"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.node(), "platform": platform.platform(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "target_dtype": dtype,
              "verification": "one target forward per round with a 4D tree attention mask"})
    for spec in specs:
        batched = spec_batch_size > 1 and spec.topk == 1 and target.plain_head
        result = report.ConfigResult(spec.label, spec.steps, spec.topk, spec.num_draft_tokens,
                                     batch_size=spec_batch_size if batched else 1)
        with tqdm(total=len(prompts), desc=f"speculative {spec.label}" + (f" (batches of {spec_batch_size})"
                  if batched else ""), unit="prompt", disable=not progress) as bar:
            if batched:
                generations = generate_batched(ChainBatchDecoder(target, draft, spec, eos), prompts, max_new_tokens,
                                               spec_batch_size, progress=bar.update)
            else:
                decoder = SpeculativeDecoder(target, draft, spec, eos)
                generations = []
                for prompt in prompts:
                    generations.append(decoder.generate(prompt, max_new_tokens))
                    bar.update(1)
        for index, (prompt, ref, gen) in enumerate(zip(prompts, references, generations)):
            mismatch = first_mismatch(ref.tokens, gen.tokens)
            result.prompts.append(report.PromptResult(
                index=index, prompt_tokens=int(prompt.numel()), new_tokens=len(gen.tokens),
                verifications=len(gen.accept_lengths), accept_lengths=gen.accept_lengths, seconds=gen.seconds,
                lossless=mismatch is None, first_mismatch=mismatch, prefill_seconds=gen.prefill_seconds,
                draft_seconds=gen.draft_seconds, verify_seconds=gen.verify_seconds))
        results.configs.append(result)
    if out_dir:
        report.write_all(results, out_dir)
    return results


def throughput_lines(results: report.EvalResults) -> list[str]:
    """Prompts/s and tokens/s of each phase, to plan a longer evaluation."""
    n = results.num_prompts
    lines = [f"[eval] target-only greedy reference: {n} prompts, {results.reference_new_tokens} new tokens in "
             f"{results.reference_seconds:.1f} s (batches of {results.reference_batch_size}, threads: "
             f"{results.meta.get('threads')}): {results.reference_tokens_per_second:.1f} tokens/s, "
             f"{results.reference_prompts_per_second:.3g} prompts/s"]
    if results.baseline_prompts:
        lines.append(f"[eval] target-only greedy one prompt at a time (first {results.baseline_prompts}, the speedup's "
                     f"baseline): {results.baseline_tokens_per_second:.1f} tokens/s")
    for config in results.configs:
        batching = f"batches of {config.batch_size}" if config.batch_size > 1 else "one prompt at a time"
        lines.append(f"[eval] speculative {config.config} ({batching}): {len(config.prompts)} prompts, "
                     f"{config.new_tokens} new tokens in {config.seconds:.1f} s: {config.tokens_per_second:.1f} tokens/s, "
                     f"{config.prompts_per_second:.3g} prompts/s ({_rate(config.seconds, len(config.prompts)):.2f} s "
                     "per prompt; " + ", ".join(f"{name} {100 * _rate(part, config.seconds):.0f}%"
                                                for name, part in config.seconds_split().items()) + ")")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="the target's HF directory")
    parser.add_argument("--draft", required=True, help="an export directory (specforge-mcore export; either format)")
    parser.add_argument("--prompts", default="gsm8k",
                        help=f"{' | '.join(PROMPT_SETS)} | FILE (.jsonl chat records with 'messages', or a "
                             "prompt/question/text field; .json list; or text lines)")
    parser.add_argument("--configs", nargs="+", metavar="STEPS,TOPK,NDT",
                        help="several speculative configs in one run, e.g. 3,1,4 5,1,6 7,1,8 5,4,8")
    parser.add_argument("--steps", type=int, default=3, help="--speculative-num-steps (when --configs is not given)")
    parser.add_argument("--topk", type=int, default=1, help="--speculative-eagle-topk")
    parser.add_argument("--num-draft-tokens", type=int, default=4, help="--speculative-num-draft-tokens")
    parser.add_argument("--num-prompts", default="8", help="how many prompts (the first ones), or 'all'")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-prompt-tokens", type=int, default=1024, help="longer prompts are skipped (counted)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --target)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="target dtype")
    parser.add_argument("--out", default=None, help="directory for eval.json, eval.md and eval.png")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per forward of the target-only reference")
    parser.add_argument("--spec-batch-size", type=int, default=1,
                        help="prompts decoded speculatively together (chain configs, topk 1): faster to measure "
                             "acceptance on many prompts; the speedup is then against the batched reference "
                             "(default 1: one at a time, the latency of a single request)")
    parser.add_argument("--baseline-prompts", type=int, default=2,
                        help="prompts also decoded target-only one at a time: the speedup's baseline (0: no speedup)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: the cores this process may use less the current load, at least 1)")


def main(args: argparse.Namespace) -> int:
    configs = args.configs or [f"{args.steps},{args.topk},{args.num_draft_tokens}"]
    results = run_eval(args.target, args.draft, args.prompts, configs, args.num_prompts, args.max_new_tokens,
                       args.out, args.tokenizer, args.max_prompt_tokens, args.dtype, batch_size=args.batch_size,
                       baseline_prompts=args.baseline_prompts, threads=args.threads,
                       spec_batch_size=args.spec_batch_size)
    print(report.markdown_table(results))
    for line in throughput_lines(results):
        print(line)
    if results.skipped_prompts:
        print(f"[eval] skipped {results.skipped_prompts} prompts longer than {args.max_prompt_tokens} tokens")
    if args.out:
        print(f"[eval] wrote {args.out}/eval.json, eval.md, eval.png")
    for index in results.baseline_mismatched_prompts:
        print(f"[eval] REFERENCE CHECK FAILED: prompt {index}: batched target-only greedy decoding differs from "
              "decoding it alone")
    if not results.lossless:
        for config in results.configs:
            for p in config.prompts:
                if not p.lossless:
                    print(f"[eval] LOSSLESS CHECK FAILED: config {config.config}, prompt {p.index}: speculative "
                          f"output differs from target-only greedy decoding at generated token {p.first_mismatch}")
        return 1
    if results.baseline_mismatched_prompts:
        return 1
    print(f"[eval] lossless: every speculative generation equals target-only greedy decoding "
          f"({results.num_prompts} prompts x {len(results.configs)} configs)")
    return 0
