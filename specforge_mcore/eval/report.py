"""Evaluation results: per-config aggregates, a markdown table, a JSON file and a PNG plot.

Acceptance length is SGLang's ``accept_length``: tokens emitted per target verification, counting the
bonus token (so 1.0 means no draft token was ever accepted, and ``steps + 1`` is the ceiling). It is
taken over verifications as they ran, before the last one is cut at the length limit or at the end of
the sequence. Acceptance rate at draft position j is the fraction of verifications that accepted at
least j draft tokens; the conditional rate divides by those that accepted at least j - 1.

Speeds: ``reference`` is the batched target-only greedy decoding every generation is checked against
(throughput); ``baseline`` is target-only greedy decoding one prompt at a time on the first few prompts,
the same one-request-at-a-time setting as the speculative runs, and the speedup's denominator. A config
decoded in batches (``--spec-batch-size``, chains only) is compared with the batched reference instead:
throughput against throughput.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional


def acceptance_rates(lengths: list[int], steps: int) -> list[float]:
    """From accept lengths (tokens per verification): P(at least j draft tokens accepted), j = 1..steps."""
    if not lengths:
        return [float("nan")] * steps
    return [sum(1 for n in lengths if n - 1 >= j) / len(lengths) for j in range(1, steps + 1)]


@dataclass
class PromptResult:
    index: int
    prompt_tokens: int
    new_tokens: int
    verifications: int
    accept_lengths: list[int]
    seconds: float
    lossless: bool
    first_mismatch: Optional[int] = None
    prefill_seconds: float = 0.0  # the parts of ``seconds`` (speculative.Generation)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0


@dataclass
class ConfigResult:
    config: str  # "steps,topk,num_draft_tokens"
    steps: int
    topk: int
    num_draft_tokens: int
    prompts: list[PromptResult] = field(default_factory=list)
    batch_size: int = 1  # prompts decoded together (1: one at a time, as a single request is served)

    @property
    def accept_lengths(self) -> list[int]:
        return [n for p in self.prompts for n in p.accept_lengths]

    @property
    def mean_accept_length(self) -> float:
        lengths = self.accept_lengths
        return sum(lengths) / len(lengths) if lengths else float("nan")

    def acceptance_rates(self) -> list[float]:
        """P(at least j draft tokens accepted), j = 1..steps."""
        return acceptance_rates(self.accept_lengths, self.steps)

    def conditional_acceptance_rates(self) -> list[Optional[float]]:
        lengths = self.accept_lengths
        rates: list[Optional[float]] = []
        for j in range(1, self.steps + 1):
            reached = sum(1 for n in lengths if n - 1 >= j - 1)
            rates.append(sum(1 for n in lengths if n - 1 >= j) / reached if reached else None)
        return rates

    @property
    def new_tokens(self) -> int:
        return sum(p.new_tokens for p in self.prompts)

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.prompts)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    def seconds_split(self) -> dict[str, float]:
        """Where the time went, summed over prompts: target prefill, draft, target verification, the rest."""
        split = {"prefill": sum(p.prefill_seconds for p in self.prompts), "draft": sum(p.draft_seconds for p in self.prompts),
                 "verify": sum(p.verify_seconds for p in self.prompts)}
        split["other"] = self.seconds - sum(split.values())
        return split

    @property
    def prompts_per_second(self) -> float:
        return len(self.prompts) / self.seconds if self.seconds > 0 else float("nan")

    @property
    def lossless(self) -> bool:
        return all(p.lossless for p in self.prompts)

    def summary(self, baseline_tokens_per_second: float) -> dict:
        return {
            "config": self.config, "steps": self.steps, "topk": self.topk, "num_draft_tokens": self.num_draft_tokens,
            "batch_size": self.batch_size,
            "mean_accept_length": self.mean_accept_length,
            "acceptance_rate": self.acceptance_rates(),
            "conditional_acceptance_rate": self.conditional_acceptance_rates(),
            "verifications": len(self.accept_lengths),
            "new_tokens": self.new_tokens,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second,
            "prompts_per_second": self.prompts_per_second,
            "seconds_split": self.seconds_split(),
            "speedup": self.tokens_per_second / baseline_tokens_per_second if baseline_tokens_per_second > 0 else None,
            "lossless": self.lossless,
            "mismatched_prompts": [p.index for p in self.prompts if not p.lossless],
        }


@dataclass
class EvalResults:
    target: str
    draft: str
    prompt_set: str
    num_prompts: int
    max_new_tokens: int
    baseline_new_tokens: int
    baseline_seconds: float
    configs: list[ConfigResult]
    skipped_prompts: int = 0
    reference_new_tokens: int = 0
    reference_seconds: float = 0.0
    reference_batch_size: int = 1
    baseline_prompts: int = 0
    baseline_mismatched_prompts: list[int] = field(default_factory=list)  # batched reference != one at a time
    meta: dict = field(default_factory=dict)

    @property
    def baseline_tokens_per_second(self) -> float:
        return self.baseline_new_tokens / self.baseline_seconds if self.baseline_seconds > 0 else float("nan")

    def speedup_base(self, config: ConfigResult) -> float:
        """The target-only tokens/s a config is compared with: one prompt at a time, or the batched
        reference for a config decoded in batches."""
        return self.reference_tokens_per_second if config.batch_size > 1 else self.baseline_tokens_per_second

    @property
    def reference_tokens_per_second(self) -> float:
        return self.reference_new_tokens / self.reference_seconds if self.reference_seconds > 0 else float("nan")

    @property
    def reference_prompts_per_second(self) -> float:
        return self.num_prompts / self.reference_seconds if self.reference_seconds > 0 else float("nan")

    @property
    def lossless(self) -> bool:
        return all(c.lossless for c in self.configs)

    def to_dict(self) -> dict:
        return {
            "target": self.target, "draft": self.draft, "prompt_set": self.prompt_set,
            "num_prompts": self.num_prompts, "skipped_prompts": self.skipped_prompts,
            "max_new_tokens": self.max_new_tokens,
            "reference": {"new_tokens": self.reference_new_tokens, "seconds": self.reference_seconds,
                          "tokens_per_second": self.reference_tokens_per_second,
                          "prompts_per_second": self.reference_prompts_per_second,
                          "batch_size": self.reference_batch_size},
            "baseline": {"prompts": self.baseline_prompts, "new_tokens": self.baseline_new_tokens,
                         "seconds": self.baseline_seconds, "tokens_per_second": self.baseline_tokens_per_second,
                         "matches_batched_reference": not self.baseline_mismatched_prompts},
            "lossless": self.lossless,
            "configs": [c.summary(self.speedup_base(c)) for c in self.configs],
            "per_prompt": {c.config: [asdict(p) for p in c.prompts] for c in self.configs},
            "meta": self.meta,
        }


def markdown_table(results: EvalResults) -> str:
    steps = max((c.steps for c in results.configs), default=0)
    head = ["config (steps,topk,draft tokens)", "accept length"] + [f"acc@{j}" for j in range(1, steps + 1)]
    head += ["tok/s spec", "tok/s target", "speedup", "lossless"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in results.configs:
        base = results.speedup_base(c)
        rates = c.acceptance_rates()
        cells = [c.config, f"{c.mean_accept_length:.2f}"]
        cells += [f"{rates[j]:.2f}" if j < len(rates) else "" for j in range(steps)]
        cells += [f"{c.tokens_per_second:.1f}", f"{base:.1f}" if base > 0 else "-", f"{c.tokens_per_second / base:.2f}x" if base > 0 else "-",
                  "yes" if c.lossless else "NO"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(results: EvalResults, path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(results.to_dict(), fh, indent=2)
        fh.write("\n")


def write_plot(results: EvalResults, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [c.config for c in results.configs]
    left.bar(labels, [c.mean_accept_length for c in results.configs], color="tab:blue")
    left.set_title("mean acceptance length (tokens / verification)")
    left.set_xlabel("steps,topk,num_draft_tokens")
    left.set_ylim(bottom=0)
    for c in results.configs:
        rates = c.acceptance_rates()
        right.plot(range(1, len(rates) + 1), rates, marker="o", label=c.config)
    right.set_title("acceptance rate by draft position")
    right.set_xlabel("draft position")
    right.set_ylabel("P(accepted at least this far)")
    right.set_ylim(0, 1.05)
    right.legend()
    fig.suptitle(f"{os.path.basename(results.draft.rstrip('/'))} on {results.prompt_set} "
                 f"({results.num_prompts} prompts, {results.max_new_tokens} new tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_all(results: EvalResults, out_dir: str) -> dict[str, str]:
    """``eval.json``, ``eval.md`` and ``eval.png`` in ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "eval.json"), "markdown": os.path.join(out_dir, "eval.md"),
             "plot": os.path.join(out_dir, "eval.png")}
    write_json(results, paths["json"])
    with open(paths["markdown"], "w", encoding="utf-8") as fh:
        fh.write(markdown_table(results) + "\n")
    write_plot(results, paths["plot"])
    return paths
