"""``specforge-mcore eval-table``: one markdown table from several ``eval.json`` files (each written by
``specforge-mcore eval --out DIR``), e.g. a trained and an untrained draft over several prompt sets, as
``make demo`` prints at its end. Arguments are ``LABEL=DIR`` (or ``DIR``: the label is the directory's
name)."""

from __future__ import annotations

import argparse
import json
import os

from specforge_mcore.errors import UserError


def read_eval(path: str) -> dict:
    """The ``eval.json`` in directory ``path`` (or the file itself)."""
    file = path if path.endswith(".json") else os.path.join(path, "eval.json")
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise UserError(f"{file}: no such file (expected the eval.json of `specforge-mcore eval --out DIR`)") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{file}: not valid JSON ({exc})") from None
    for key in ("prompt_set", "num_prompts", "max_new_tokens", "configs"):
        if key not in data:
            raise UserError(f"{file}: missing {key!r} (expected the eval.json of `specforge-mcore eval`)")
    return data


def table(entries: list[tuple[str, dict]]) -> str:
    """Rows: draft label, prompt set, prompts x new tokens, config, acceptance length, acc@1, lossless."""
    head = ["draft", "prompts", "prompts x new tokens", "config", "accept length", "acc@1", "tok/s spec", "lossless"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, data in entries:
        for c in data["configs"]:
            rates = c.get("acceptance_rate") or []
            first = rates[0] if rates and rates[0] is not None else float("nan")
            lines.append("| " + " | ".join([
                label, os.path.basename(str(data["prompt_set"])), f"{data['num_prompts']} x {data['max_new_tokens']}",
                c["config"], f"{c['mean_accept_length']:.2f}", f"{first:.2f}", f"{c['tokens_per_second']:.1f}",
                "yes" if c["lossless"] else "NO"]) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("evals", nargs="+", metavar="[LABEL=]DIR", help="eval output directories (or eval.json files)")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")


def main(args: argparse.Namespace) -> int:
    entries = []
    for item in args.evals:
        label, sep, path = item.partition("=")
        if not sep:
            label, path = os.path.basename(os.path.normpath(item)), item
        entries.append((label, read_eval(path)))
    text = table(entries)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return 0 if all(c["lossless"] for _, data in entries for c in data["configs"]) else 1
