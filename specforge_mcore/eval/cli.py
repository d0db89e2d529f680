"""``specforge-mcore eval``: speculative decoding with an exported draft against its target.

Loads the export (not the training checkpoint: what is measured is what is served), runs target-only
greedy decoding once per prompt (the reference, and the no-speculation tokens/s), then speculative
decoding for each ``STEPS,TOPK,NUM_DRAFT_TOKENS`` config. Every speculative generation must equal the
reference token for token; otherwise the command reports where and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Optional, Sequence

import torch

from specforge_mcore.errors import UserError
from specforge_mcore.eval import report
from specforge_mcore.eval.speculative import (SpecConfig, SpeculativeDecoder, Target, check_pair, eos_token_ids,
                                              first_mismatch, greedy_generate, load_target)

PROMPT_SETS = ("gsm8k", "humaneval", "sharegpt-heldout")
DEFAULT_CONFIGS = ("3,1,4",)


def load_prompts(name: str) -> list[str]:
    """A packaged prompt set by name, or a file: ``.jsonl`` (a ``prompt``/``question``/``text`` field per
    line), ``.json`` (a list of strings) or plain text (one prompt per line)."""
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
            prompts = []
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{name}:{line_no}: not valid JSON: {exc}") from None
                text = next((record.get(k) for k in ("prompt", "question", "text") if isinstance(record, dict)
                             and isinstance(record.get(k), str)), None)
                if text is None:
                    raise UserError(f"{name}:{line_no}: expected an object with a 'prompt', 'question' or 'text' string")
                prompts.append(text)
            return prompts
        return [line.rstrip("\n") for line in fh if line.strip()]


def encode_prompt(tokenizer, text: str) -> list[int]:
    """The prompt as the target sees it when served: one user turn through the chat template (if any)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])


def run_eval(target_dir: str, draft_dir: str, prompt_set: str = "gsm8k",
             configs: Sequence[str | SpecConfig] = DEFAULT_CONFIGS, num_prompts: int = 8, max_new_tokens: int = 64,
             out_dir: Optional[str] = None, tokenizer_dir: Optional[str] = None, max_prompt_tokens: int = 1024,
             dtype: str = "float32", progress: bool = True) -> report.EvalResults:
    """Evaluate the export in ``draft_dir`` against ``target_dir`` (the function ``make demo`` calls).

    Returns the results (``results.lossless`` tells whether every speculative generation matched greedy
    decoding); with ``out_dir``, also writes ``eval.json``, ``eval.md`` and ``eval.png`` there.
    """
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from specforge_mcore.export.io import load_export

    specs = [c if isinstance(c, SpecConfig) else SpecConfig.parse(c) for c in configs]
    if num_prompts < 1 or max_new_tokens < 1:
        raise UserError(f"--num-prompts and --max-new-tokens must be positive (got {num_prompts}, {max_new_tokens})")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise UserError(f"--dtype {dtype!r}: expected float32 or bfloat16")
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
        if len(prompts) == num_prompts:
            break
    if not prompts:
        raise UserError(f"--prompts {prompt_set}: no prompt of at most {max_prompt_tokens} tokens")

    references = []
    for prompt in tqdm(prompts, desc="target only", disable=not progress):
        references.append(greedy_generate(target, prompt, max_new_tokens, eos))
    results = report.EvalResults(
        target=os.path.abspath(target_dir), draft=os.path.abspath(draft_dir), prompt_set=prompt_set,
        num_prompts=len(prompts), max_new_tokens=max_new_tokens,
        baseline_new_tokens=sum(len(r.tokens) for r in references),
        baseline_seconds=sum(r.seconds for r in references), configs=[], skipped_prompts=skipped,
        meta={"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.node(), "platform": platform.platform(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "target_dtype": dtype,
              "verification": "one target forward per round with a 4D tree attention mask"})
    for spec in specs:
        decoder = SpeculativeDecoder(target, draft, spec, eos)
        result = report.ConfigResult(spec.label, spec.steps, spec.topk, spec.num_draft_tokens)
        for index, (prompt, ref) in enumerate(tqdm(list(zip(prompts, references)), desc=f"speculative {spec.label}",
                                                    disable=not progress)):
            gen = decoder.generate(prompt, max_new_tokens)
            mismatch = first_mismatch(ref.tokens, gen.tokens)
            result.prompts.append(report.PromptResult(
                index=index, prompt_tokens=int(prompt.numel()), new_tokens=len(gen.tokens),
                verifications=len(gen.accept_lengths), accept_lengths=gen.accept_lengths, seconds=gen.seconds,
                lossless=mismatch is None, first_mismatch=mismatch))
        results.configs.append(result)
    if out_dir:
        report.write_all(results, out_dir)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="the target's HF directory")
    parser.add_argument("--draft", required=True, help="an export directory (specforge-mcore export; either format)")
    parser.add_argument("--prompts", default="gsm8k",
                        help=f"{' | '.join(PROMPT_SETS)} | FILE (.jsonl with a prompt field, .json list, or text lines)")
    parser.add_argument("--configs", nargs="+", metavar="STEPS,TOPK,NDT",
                        help="several speculative configs in one run, e.g. 3,1,4 5,1,6 7,1,8 5,4,8")
    parser.add_argument("--steps", type=int, default=3, help="--speculative-num-steps (when --configs is not given)")
    parser.add_argument("--topk", type=int, default=1, help="--speculative-eagle-topk")
    parser.add_argument("--num-draft-tokens", type=int, default=4, help="--speculative-num-draft-tokens")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-prompt-tokens", type=int, default=1024, help="longer prompts are skipped (counted)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --target)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="target dtype")
    parser.add_argument("--out", default=None, help="directory for eval.json, eval.md and eval.png")


def main(args: argparse.Namespace) -> int:
    configs = args.configs or [f"{args.steps},{args.topk},{args.num_draft_tokens}"]
    results = run_eval(args.target, args.draft, args.prompts, configs, args.num_prompts, args.max_new_tokens,
                       args.out, args.tokenizer, args.max_prompt_tokens, args.dtype)
    print(report.markdown_table(results))
    if results.skipped_prompts:
        print(f"[eval] skipped {results.skipped_prompts} prompts longer than {args.max_prompt_tokens} tokens")
    if args.out:
        print(f"[eval] wrote {args.out}/eval.json, eval.md, eval.png")
    if not results.lossless:
        for config in results.configs:
            for p in config.prompts:
                if not p.lossless:
                    print(f"[eval] LOSSLESS CHECK FAILED: config {config.config}, prompt {p.index}: speculative "
                          f"output differs from target-only greedy decoding at generated token {p.first_mismatch}")
        return 1
    print(f"[eval] lossless: every speculative generation equals target-only greedy decoding "
          f"({results.num_prompts} prompts x {len(results.configs)} configs)")
    return 0
