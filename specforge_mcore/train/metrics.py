"""Metrics: ``OUT/metrics.jsonl`` (one object per logged step), optional TensorBoard, the final plot."""

from __future__ import annotations

import json
import os
from typing import Optional


class MetricsWriter:
    def __init__(self, out_dir: str, tensorboard: bool = False, append: bool = False):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if not append and os.path.exists(self.path):
            os.remove(self.path)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # tensorboard is optional
                raise RuntimeError("train.tensorboard=true needs the tensorboard package "
                                   "(pip install tensorboard)") from exc
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, step)
                elif isinstance(value, list):
                    for i, item in enumerate(value):
                        if isinstance(item, (int, float)):
                            self.tb.add_scalar(f"{key}/step{i}", item, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def truncate_metrics(path: str, step: int) -> None:
    """Drop logged steps after ``step``: they are redone after a resume, and each step is logged once."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as fh:
        keep = [line for line in fh if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(keep)
    os.replace(tmp, path)


STEP_LEDGER = "steps.ledger.jsonl"


def append_to_ledger(out_dir: str, step: int, rows: list[int], attempt: str) -> None:
    """``OUT/steps.ledger.jsonl``: one line per optimizer step any attempt completed (step, global batch rows,
    attempt), appended and fsynced, never truncated, not even by a resume (``metrics.jsonl`` is). After
    crashes and restarts, the last line of each step is the one the final weights descend from."""
    with open(os.path.join(out_dir, STEP_LEDGER), "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"step": step, "rows": rows, "attempt": attempt}) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_metrics(metrics_path: str, png_path: str, title: Optional[str] = None) -> str:
    """Loss and per-TTT-step accuracy over training (and eval points when present), and the held-out
    acceptance-length estimate when evaluations recorded it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    with_al = any("eval_sim_al" in r for r in evals)
    fig, axes = plt.subplots(1, 3 if with_al else 2, figsize=(18 if with_al else 12, 4.5))
    ax_loss, ax_acc = axes[0], axes[1]
    steps = [r["step"] for r in train]
    ax_loss.plot(steps, [r["loss"] for r in train], label="train loss (Σ decayᶦ·Lᵢ)")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if train:
        for i in range(len(train[0]["acc"])):
            ax_acc.plot(steps, [r["acc"][i] for r in train], label=f"TTT step {i}", alpha=0.8)
    if evals:
        ax_acc.plot([r["step"] for r in evals], [r["eval_acc"][0] for r in evals], "ko--", label="eval step 0")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("accuracy (draft argmax == target argmax)")
    ax_acc.set_ylim(0, 1)
    ax_acc.legend(fontsize=8, ncol=2)
    ax_acc.grid(alpha=0.3)
    if with_al:
        ax_al = axes[2]
        points = [r for r in evals if "eval_sim_al" in r]
        ax_al.plot([r["step"] for r in points], [r["eval_sim_al"] for r in points], "o-", color="tab:green",
                   label=f"decoding replay at draft length {len(points[0]['eval_accept'])}")
        chained = [r for r in points if "eval_chain_al" in r]
        if chained:
            ax_al.plot([r["step"] for r in chained], [r["eval_chain_al"] for r in chained], ":", color="tab:green",
                       alpha=0.6, label="chained product (independent steps)")
        best = max(points, key=lambda r: r["eval_sim_al"])
        ax_al.annotate(f"best {best['eval_sim_al']:.3f} @ step {best['step']}", (best["step"], best["eval_sim_al"]),
                       textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
        spec = [r for r in points if "eval_spec_al" in r]
        if spec:
            ax_al.plot([r["step"] for r in spec], [r["eval_spec_al"] for r in spec], "s-", color="tab:purple",
                       label=f"speculative decoding, {spec[-1]['eval_spec_prompts']} held-out prompts")
        ax_al.set_xlabel("step")
        ax_al.set_ylabel("held-out acceptance length")
        ax_al.legend(fontsize=8)
        ax_al.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
