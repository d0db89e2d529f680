import json
import os

import pytest
import torch

from specforge_mcore.config import DraftConfig
from specforge_mcore.draft.model import DraftArch, Eagle3Draft
from specforge_mcore.target.prepare import DEFAULT_SMOLLM2_DIR, require_prepared
from specforge_mcore.target.random import random_target


def _random_draft(hf: dict, draft_vocab_size: int, capture: list[int], seed: int = 0) -> Eagle3Draft:
    arch = DraftArch.from_target(hf, DraftConfig(draft_vocab_size=draft_vocab_size), capture, draft_vocab_size)
    gen = torch.Generator().manual_seed(seed)
    draft = Eagle3Draft(arch)
    with torch.no_grad():
        for param in draft.parameters():
            param.copy_(torch.rand(param.shape, generator=gen) + 0.5 if param.ndim == 1
                        else torch.randn(param.shape, generator=gen) * 0.05)
    ids = torch.randperm(arch.vocab_size, generator=gen)[:draft_vocab_size].sort().values
    draft.set_vocab(ids - torch.arange(draft_vocab_size),
                    torch.zeros(arch.vocab_size, dtype=torch.bool).index_fill_(0, ids, True))
    return draft


def _config(path: str) -> dict:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
        return json.load(fh)


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    return require_prepared(DEFAULT_SMOLLM2_DIR)


@pytest.fixture(scope="session")
def smollm2_export(smollm2_dir, tmp_path_factory) -> str:
    """A random (untrained) draft for SmolLM2, captures [1, 14, 26], exported in the SGLang layout (bf16)."""
    from specforge_mcore.export.io import write_export

    draft = _random_draft(_config(smollm2_dir), 2048, [1, 14, 26])
    return write_export(draft, str(tmp_path_factory.mktemp("eval") / "smollm2-draft"), target_path=smollm2_dir)


@pytest.fixture(scope="session")
def tiny_target() -> tuple[str, dict]:
    """A random 8-layer Llama with the SmolLM2 vocabulary size (so the SmolLM2 tokenizer fits it)."""
    path = random_target("llama", {"vocab_size": 49152})
    return path, _config(path)


@pytest.fixture(scope="session")
def tiny_export(tiny_target, tmp_path_factory) -> str:
    from specforge_mcore.export.io import write_export

    draft = _random_draft(tiny_target[1], 1024, [1, 3, 4], seed=5)
    return write_export(draft, str(tmp_path_factory.mktemp("eval") / "tiny-draft"), layout="speculators",
                        target_path=tiny_target[0])


@pytest.fixture(scope="session")
def random_draft():
    return _random_draft


@pytest.fixture(scope="module")
def tiny(tiny_target):
    """The tiny target wrapped for decoding (captures [1, 3, 4]) and a random draft whose vocabulary is the
    identity (every token draftable)."""
    from specforge_mcore.eval.speculative import Target, load_target

    path, hf = tiny_target
    model = load_target(path)
    draft = _random_draft(hf, hf["vocab_size"], [1, 3, 4])
    draft.set_vocab(torch.zeros_like(draft.d2t), torch.ones_like(draft.t2d))
    draft.set_embedding(model.get_input_embeddings().weight.detach())
    return Target(model, [1, 3, 4]), draft


@pytest.fixture(scope="package", autouse=True)
def eval_threads():
    """The evaluation's own thread choice: on a shared CPU a team larger than the idle cores spins against
    the other jobs (a SmolLM2 decode step measured 15x slower with 2 threads than with 1 on 2 busy cores)."""
    from specforge_mcore.eval.speculative import default_threads

    previous = torch.get_num_threads()
    torch.set_num_threads(default_threads())
    yield
    torch.set_num_threads(previous)
