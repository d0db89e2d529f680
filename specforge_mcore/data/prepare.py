"""``prepare_data(cfg)``: conversations -> tokenised, masked, packed rows, cached on disk.

The cache entry is keyed by a hash of everything that changes its content: the input files (content
hash for small files, path + size + mtime for large ones; package version for packaged sources), the
tokenizer's files and chat template, ``max_length``, ``pack``, ``loss_on``, ``max_samples``, the eval
split (``eval_files`` / ``eval_fraction``), ``data.seed`` and a format version. Entries are written to a
temporary directory and renamed into place, so a reader never sees a half-written entry, and several
processes (ranks) preparing the same entry at once all end up reading one complete copy. Building is
CPU work: in a distributed run let one rank build, then the others read the cache after a barrier.

Cache location: ``data.cache_dir``, else ``$SPECFORGE_MCORE_CACHE/data``, else ``.cache/data`` under
the working directory.

The eval split: ``eval_files`` when given; otherwise a ``eval_fraction`` of the conversations read from
``train_files`` (after ``max_samples``), chosen by ``data.seed``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from typing import Optional

from specforge_mcore.config import RunConfig
from specforge_mcore.data.conversations import BadSamples, Conversation, SampleRejected, read_conversations
from specforge_mcore.data.packing import PackedData, pack
from specforge_mcore.data.sources import CONVERSATION_SOURCES, is_source, source_identity
from specforge_mcore.data.tokenize import check_tokenizer_matches, pad_token_id, tokenize_conversations
from specforge_mcore.errors import UserError
from specforge_mcore.fileio import read_json, sha256_file, verify_manifest, write_manifest

DATA_FORMAT_VERSION = 1
_SMALL_FILE = 16 << 20  # files up to this size are identified by content, larger ones by size + mtime
_TOKENIZER_FILE_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "chat_template")
_COMPLETE = "meta.json"


# ----------------------------------------------------------------------------------------------
# Tokenizer and target facts
# ----------------------------------------------------------------------------------------------


def tokenizer_dir(cfg: RunConfig) -> str:
    path = cfg.target.tokenizer_dir or cfg.target.hf_dir
    if not path:
        raise UserError("data preparation needs a tokenizer: set target.tokenizer_dir or target.hf_dir")
    if not os.path.isdir(path):
        raise UserError(f"tokenizer directory {path} (target.tokenizer_dir or target.hf_dir) does not exist")
    return path


def load_tokenizer(cfg: RunConfig):
    from transformers import AutoTokenizer

    path = tokenizer_dir(cfg)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a tokenizer from {path}: {exc}") from None


def target_vocab_size(cfg: RunConfig) -> Optional[int]:
    """The target's vocab size from its config.json (or the random target's config); None if unknown."""
    if cfg.target.hf_dir:
        path = os.path.join(cfg.target.hf_dir, "config.json")
        if not os.path.isfile(path):
            raise UserError(f"target.hf_dir {cfg.target.hf_dir} has no config.json")
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
        size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
        if not isinstance(size, int):
            raise UserError(f"{path}: no integer vocab_size")
        return size
    if cfg.target.random is not None and isinstance(cfg.target.random.hf_config.get("vocab_size"), int):
        return cfg.target.random.hf_config["vocab_size"]
    return None


# ----------------------------------------------------------------------------------------------
# Cache key
# ----------------------------------------------------------------------------------------------


def _file_identity(path: str) -> dict:
    if is_source(path):
        return source_identity(path)
    if not os.path.isfile(path):
        raise UserError(f"data file {path} (data.train_files / data.eval_files, relative to {os.getcwd()}) does not "
                        "exist; a regenerated dataset is written by `specforge-mcore regenerate` (for the demo: "
                        "`make demo`)")
    stat = os.stat(path)
    if stat.st_size <= _SMALL_FILE:
        return {"path": os.path.abspath(path), "sha256": sha256_file(path)}
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _tokenizer_identity(cfg: RunConfig, tokenizer) -> dict:
    folder = tokenizer_dir(cfg)
    files = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith(_TOKENIZER_FILE_PREFIXES) or name.endswith((".model", ".tiktoken")):
            files[name] = sha256_file(os.path.join(folder, name))
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return {"files": files, "chat_template": template, "size": len(tokenizer), "pad_id": pad_token_id(tokenizer)}


def cache_key(cfg: RunConfig, tokenizer) -> tuple[str, dict]:
    """The cache entry name and the identity it hashes."""
    data = cfg.data
    identity = {
        "format": DATA_FORMAT_VERSION,
        "train_files": [_file_identity(p) for p in data.train_files],
        "eval_files": [_file_identity(p) for p in data.eval_files],
        "eval_fraction": data.eval_fraction if not data.eval_files else None,
        "tokenizer": _tokenizer_identity(cfg, tokenizer),
        "max_length": data.max_length,
        "pack": data.pack,
        "loss_on": data.loss_on,
        "max_samples": data.max_samples,
        "seed": data.seed,
    }
    blob = json.dumps(identity, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20], identity


def cache_root(cfg: RunConfig) -> str:
    if cfg.data.cache_dir:
        return cfg.data.cache_dir
    if os.environ.get("SPECFORGE_MCORE_CACHE"):
        return os.path.join(os.environ["SPECFORGE_MCORE_CACHE"], "data")
    return os.path.join(os.getcwd(), ".cache", "data")


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------


def _split_eval(conversations: list[Conversation], fraction: float, seed: int) -> tuple[list, list]:
    n = len(conversations)
    n_eval = min(n - 1, max(1, math.ceil(fraction * n))) if fraction > 0 and n >= 2 else 0
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_index = set(order[:n_eval])
    train = [c for i, c in enumerate(conversations) if i not in eval_index]
    return train, [c for i, c in enumerate(conversations) if i in eval_index]


def _read(paths: list[str], bad: BadSamples, limit: Optional[int]) -> list[Conversation]:
    conversations = []
    for conversation in read_conversations(paths, bad):
        conversations.append(conversation)
        if limit is not None and len(conversations) >= limit:
            break
    return conversations


def _tokenize_all(tokenizer, conversations: list[Conversation], cfg: RunConfig, bad: BadSamples, desc: str):
    from tqdm import tqdm

    batch = 64
    samples = []
    with tqdm(total=len(conversations), desc=desc, unit="conv", mininterval=1.0,
              disable=len(conversations) < 200) as progress:
        for at in range(0, len(conversations), batch):
            chunk = conversations[at:at + batch]
            for result in tokenize_conversations(tokenizer, chunk, cfg.data.max_length, cfg.data.loss_on):
                if isinstance(result, SampleRejected):
                    bad.reject(result)
                else:
                    samples.append(result)
            progress.update(len(chunk))
    return samples


def _build(cfg: RunConfig, tokenizer) -> tuple[PackedData, PackedData, BadSamples]:
    data = cfg.data
    if not data.train_files:
        raise UserError("data.train_files is empty: name JSON/JSONL conversation files or packaged sources "
                        f"({', '.join(CONVERSATION_SOURCES)})")
    if data.max_samples is not None and data.max_samples < 1:
        raise UserError(f"data.max_samples={data.max_samples}: must be at least 1 (or null for all)")
    bad = BadSamples(data.on_bad_sample)
    conversations = _read(data.train_files, bad, data.max_samples)
    if data.eval_files:
        train_conv, eval_conv = conversations, _read(data.eval_files, bad, None)
    else:
        train_conv, eval_conv = _split_eval(conversations, data.eval_fraction, data.seed)
    train_samples = _tokenize_all(tokenizer, train_conv, cfg, bad, "tokenising train")
    eval_samples = _tokenize_all(tokenizer, eval_conv, cfg, bad, "tokenising eval")
    if not train_samples:
        raise UserError(f"no usable training conversations in {', '.join(data.train_files)}\n{bad.summary()}")
    pad_id = pad_token_id(tokenizer)
    train = pack(train_samples, data.max_length, data.seed, pad_id, data.pack)
    evaluation = pack(eval_samples, data.max_length, data.seed, pad_id, data.pack)
    return train, evaluation, bad


def prepare_data(cfg: RunConfig, force: bool = False) -> tuple[PackedData, PackedData, BadSamples]:
    """Train and eval rows plus the bad-sample record; from the cache when nothing changed."""
    train, evaluation, bad, _, _ = _prepare(cfg, force)
    return train, evaluation, bad


def _prepare(cfg: RunConfig, force: bool):
    tokenizer = load_tokenizer(cfg)
    vocab_size = target_vocab_size(cfg)
    if vocab_size is not None:
        check_tokenizer_matches(tokenizer, vocab_size, f"tokenizer {tokenizer_dir(cfg)} vs target")
    key, identity = cache_key(cfg, tokenizer)
    entry = os.path.join(cache_root(cfg), key)
    if not force and os.path.isfile(os.path.join(entry, _COMPLETE)):
        try:
            train, evaluation, bad = _load_entry(entry)
        except UserError as exc:
            # The cache is derived data: a damaged entry (a file cut short, a flipped bit) is rebuilt.
            print(f"warning: data cache {entry} is damaged and is rebuilt: {exc}", file=sys.stderr, flush=True)
            force = True
        else:
            if cfg.data.on_bad_sample == "error" and bad.counts:
                # The entry was built skipping bad samples; the stricter policy still stops at the first.
                reason = next(iter(bad.counts))
                raise SampleRejected(reason, *bad.first[reason])
            bad.policy = cfg.data.on_bad_sample
            return train, evaluation, bad, entry, True

    start = time.perf_counter()
    train, evaluation, bad = _build(cfg, tokenizer)
    os.makedirs(cache_root(cfg), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache_root(cfg))
    try:
        train.save(os.path.join(tmp, "train.safetensors"))
        evaluation.save(os.path.join(tmp, "eval.safetensors"))
        meta = {"key": key, "identity": identity, "bad_samples": bad.to_dict(),
                "train": train.stats, "eval": evaluation.stats, "seconds": time.perf_counter() - start}
        write_manifest(tmp)
        with open(os.path.join(tmp, _COMPLETE), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1)
        if os.path.isdir(entry) and (force or not os.path.isfile(os.path.join(entry, _COMPLETE))):
            shutil.rmtree(entry)  # a forced rebuild, or what a killed run left
        try:
            os.rename(tmp, entry)
        except OSError:
            if not os.path.isfile(os.path.join(entry, _COMPLETE)):
                raise
            shutil.rmtree(tmp)  # another process (rank) finished the same entry first: same content
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return train, evaluation, bad, entry, False


def prepared_stats(cfg: RunConfig) -> Optional[tuple[dict, dict]]:
    """The training and held-out statistics (rows, tokens, ...) of this config's data cache entry if it has
    been prepared, without preparing it; None when it has not (or its data files or tokenizer are not
    there yet to name it)."""
    path = cfg.target.tokenizer_dir or cfg.target.hf_dir
    if not path or not os.path.isdir(path):
        return None
    files = [*cfg.data.train_files, *cfg.data.eval_files]
    if any(not is_source(p) and not os.path.isfile(p) for p in files):
        return None  # a data file not made yet (the demo's regenerated file before `make demo`)
    key, _ = cache_key(cfg, load_tokenizer(cfg))
    meta_path = os.path.join(cache_root(cfg), key, _COMPLETE)
    if not os.path.isfile(meta_path):
        return None
    meta = read_json(meta_path, f"{meta_path}: missing")
    return meta["train"], meta["eval"]


def _load_entry(entry: str):
    """A complete cache entry, checked against its manifest (entries written before manifests existed pass)."""
    meta = read_json(os.path.join(entry, _COMPLETE), f"{entry}: no {_COMPLETE}")
    verify_manifest(entry, "data cache", exclude=(_COMPLETE,))
    return (PackedData.load(os.path.join(entry, "train.safetensors")),
            PackedData.load(os.path.join(entry, "eval.safetensors")), BadSamples.from_dict(meta["bad_samples"]))


def summary(train: PackedData, evaluation: PackedData, bad: BadSamples) -> str:
    lines = []
    for name, part in (("train", train), ("eval", evaluation)):
        s = part.stats
        fraction = s["assistant_tokens"] / s["tokens"] if s.get("tokens") else 0.0
        lines.append(f"{name}: {s['conversations']} conversations, {s['tokens']} tokens "
                     f"({s['assistant_tokens']} assistant, {fraction:.1%}), {s['rows']} rows of "
                     f"{s['max_length']} (fill {s['fill_ratio']:.1%})")
    lines.append(bad.summary())
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config (YAML)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache has this data")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. data.max_length=1024)")


def main(args: argparse.Namespace) -> int:
    from specforge_mcore.config import load_config

    cfg = load_config(args.config, args.overrides)
    start = time.perf_counter()
    train, evaluation, bad, entry, hit = _prepare(cfg, force=args.force)
    print(summary(train, evaluation, bad))
    print(f"cache {'hit' if hit else 'written'}: {entry} ({time.perf_counter() - start:.1f} s)")
    return 0
