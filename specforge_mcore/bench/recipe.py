"""``specforge-mcore bench recipe --config configs/X.yaml``: choose the loss and the recipe by evidence.

Trains the config once per variant (each a set of ``key=value`` overrides on top of ``--set``), one after
the other in ``--nproc`` local processes, and scores every run on the held-out split the trainer evaluates
(docs/design.md §10): step-0..2 accuracy, the per-step conditional acceptance ``a_i`` and the chained
acceptance-length estimate, both at the run's own draft length (its TTT steps) and cut at 3 steps so that
runs with other TTT step counts compare on one scale. It prints a markdown table and writes every run's
numbers to ``--out/recipe.json``; the runs' directories (metrics, checkpoints, plots) stay under ``--out``.

The default variants are the questions of issue 15: the loss (soft cross-entropy, forward KL, the LK
acceptance loss), the learning rate and its schedule, 3 vs 7 TTT steps, the step decay and EAGLE-3.1's
per-layer norm. Real speculative decoding of a chosen run is ``specforge-mcore export`` + ``eval``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time

from specforge_mcore.config import config_to_dict, load_config
from specforge_mcore.draft.ttt import chained_acceptance_length
from specforge_mcore.errors import UserError
from specforge_mcore.parallel import spawn
from specforge_mcore.train.run import train_worker

_LR = re.compile(r"^LR(?:([*/])([0-9.]+(?:[eE][+-]?[0-9]+)?))?$")
DEFAULT_VARIANTS = [
    "base:",
    "lk_alpha: draft.objective=lk_alpha",
    "forward_kl: draft.objective=forward_kl",
    "lr/4: optim.lr=LR/4",
    "lr*2: optim.lr=LR*2",
    "ttt7: draft.ttt_steps=7",
    "decay1: draft.ttt_decay=1.0",
    "per_layer_norm: draft.per_layer_norm=true",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the run to vary (a configs/*.yaml)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every variant")
    parser.add_argument("--variant", action="append", default=None, metavar="'NAME: KEY=VALUE ...'",
                        help="a variant (repeatable); LR in a value is the base learning rate. Default: "
                             + "; ".join(DEFAULT_VARIANTS))
    parser.add_argument("--out", required=True, help="directory for the runs and recipe.json")
    parser.add_argument("--nproc", type=int, default=1)


def parse_variant(text: str, base_lr: float) -> tuple[str, list[str]]:
    """``"name: k=v k=v"`` -> (name, overrides); ``LR`` in a value is the base learning rate (``LR/4``)."""
    name, sep, rest = text.partition(":")
    if not sep or not name.strip():
        raise UserError(f"--variant {text!r}: expected 'NAME: KEY=VALUE ...'")
    overrides = []
    for item in rest.split():
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"--variant {text!r}: {item!r} is not KEY=VALUE")
        if "LR" in value:
            match = _LR.match(value)
            if match is None:
                raise UserError(f"--variant {text!r}: {value!r}: expected LR, LR*X or LR/X")
            op, factor = match.group(1), float(match.group(2) or 1)
            value = repr(base_lr * factor if op != "/" else base_lr / factor)
        overrides.append(f"{key}={value}")
    return name.strip(), overrides


def score(record: dict) -> dict:
    """The held-out numbers of one evaluation record: the decoding replay ``eval_sim_al`` at the run's own
    draft length, and the chained estimate cut at draft length 3 (so runs with other TTT steps compare)."""
    accept = record["eval_accept"]
    cut = chained_acceptance_length([1.0] * min(3, len(accept)), accept[:3])[1]
    return dict(acc=record["eval_acc"][:3], accept=accept, sim_al=record["eval_sim_al"], sim_al_3=cut,
                loss=record.get("eval_loss"))


def run_variant(config: str, common: list[str], overrides: list[str], out_dir: str, nproc: int) -> dict:
    cfg = load_config(config, [f"train.out_dir={out_dir}", "train.plot=false", *common, *overrides])
    start = time.perf_counter()
    results = spawn(train_worker, nproc, config_to_dict(cfg), out_dir, False, True)
    seconds = time.perf_counter() - start
    history = results[0]["history"]
    evals = [r for r in history if "eval_sim_al" in r]
    if not evals:
        raise UserError(f"{config} {' '.join(overrides)}: the run logged no held-out evaluation "
                        "(set train.eval_every and held-out data: data.eval_files or data.eval_fraction)")
    before = results[0]["eval_before"]
    losses = [r["loss"] for r in history if "loss" in r]
    return dict(overrides=overrides, seconds=seconds, steps=history[-1]["step"], before=score(before),
                after=score(evals[-1]), curve=[(r["step"], r["eval_sim_al"]) for r in evals], train_loss=losses)


def markdown(rows: dict[str, dict]) -> str:
    lines = ["| variant | overrides | acc@1 | acc@2 | acc@3 | AL chained, 3 steps | AL replayed, own steps | min |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        a = r["after"]
        acc = [f"{x:.3f}" for x in a["acc"]] + [""] * (3 - len(a["acc"]))
        lines.append(f"| {name} | `{' '.join(r['overrides']) or '(base)'}` | {' | '.join(acc)} | {a['sim_al_3']:.3f} "
                     f"| {a['sim_al']:.3f} | {r['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    base = load_config(args.config, list(args.set))
    if not base.train.eval_every:
        raise UserError(f"{args.config}: train.eval_every=0; the recipe bench scores held-out evaluations "
                        "(pass --set train.eval_every=N)")
    variants = [parse_variant(v, base.optim.lr) for v in (args.variant or DEFAULT_VARIANTS)]
    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        raise UserError(f"--variant names must differ: {names}")
    os.makedirs(args.out, exist_ok=True)
    rows: dict[str, dict] = {}
    for name, overrides in variants:
        print(f"[recipe] {name}: {' '.join(overrides) or '(base)'}", flush=True)
        rows[name] = run_variant(args.config, list(args.set), overrides, os.path.join(args.out, name), args.nproc)
        a = rows[name]["after"]
        print(f"[recipe] {name}: acc {[round(x, 3) for x in a['acc']]}, AL chained estimate {a['sim_al_3']:.3f} (3 steps), "
              f"decoding replay {a['sim_al']:.3f} (own steps), {rows[name]['seconds'] / 60:.1f} min", flush=True)
        with open(os.path.join(args.out, "recipe.json"), "w", encoding="utf-8") as fh:
            json.dump(dict(config=args.config, set=args.set, runs=rows), fh, indent=1)
    print(markdown(rows))
    best = max(rows, key=lambda n: rows[n]["after"]["sim_al_3"])
    print(f"best by the 3-step chained estimate: {best} ({rows[best]['after']['sim_al_3']:.3f})")
    return 0 if all(math.isfinite(r["after"]["sim_al"]) for r in rows.values()) else 1
