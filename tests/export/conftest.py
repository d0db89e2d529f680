import json
import os

import pytest
import torch

from specforge_mcore.config import DraftConfig
from specforge_mcore.draft.io import save_draft
from specforge_mcore.draft.model import DraftArch, Eagle3Draft
from specforge_mcore.target.random import random_target


def _random_draft(arch: DraftArch, seed: int = 0) -> Eagle3Draft:
    """A draft with random weights, norms not all ones (so a misplaced norm shows) and a random vocab map."""
    gen = torch.Generator().manual_seed(seed)
    draft = Eagle3Draft(arch)
    with torch.no_grad():
        for name, param in draft.named_parameters():
            if param.ndim == 1:
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    ids = torch.randperm(arch.vocab_size, generator=gen)[: arch.draft_vocab_size].sort().values
    t2d = torch.zeros(arch.vocab_size, dtype=torch.bool)
    t2d[ids] = True
    draft.set_vocab(ids - torch.arange(arch.draft_vocab_size), t2d)
    return draft


def _arch_for(hf: dict, draft_vocab_size: int = 100, capture=(1, 3, 4), per_layer_norm: bool = False) -> DraftArch:
    return DraftArch.from_target(hf, DraftConfig(draft_vocab_size=draft_vocab_size, per_layer_norm=per_layer_norm),
                                 list(capture), draft_vocab_size)


def _write_checkpoint(draft: Eagle3Draft, directory: str, target_dir: str | None) -> str:
    """A training-checkpoint-shaped directory: draft files + the run's config.yaml (optimizer files omitted)."""
    save_draft(draft, directory)
    with open(os.path.join(directory, "config.yaml"), "w", encoding="utf-8") as fh:
        fh.write(f"name: test\ntarget:\n  hf_dir: {target_dir}\n" if target_dir else "name: test\ntarget: {}\n")
    return directory


# Helpers as fixtures (test modules cannot import conftest under --import-mode=importlib).
@pytest.fixture(scope="session")
def random_draft():
    return _random_draft


@pytest.fixture(scope="session")
def arch_for():
    return _arch_for


@pytest.fixture(scope="session")
def write_checkpoint():
    return _write_checkpoint


@pytest.fixture(scope="session")
def llama_target() -> tuple[str, dict]:
    """A small random Llama target (8 layers, hidden 64, vocab 512) and its config.json."""
    path = random_target("llama")
    with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
        return path, json.load(fh)


@pytest.fixture
def checkpoint(tmp_path, llama_target) -> tuple[str, Eagle3Draft]:
    target_dir, hf = llama_target
    draft = _random_draft(_arch_for(hf))
    return _write_checkpoint(draft, str(tmp_path / "checkpoints" / "step_10"), target_dir), draft
