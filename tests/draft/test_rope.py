"""The draft's RoPE equals the target's (HF transformers' definition, which SGLang 0.5.23 also follows
for the served draft), for every RoPE type a recipe's target uses - YaRN included (DeepSeek-V3, GPT-OSS)."""

import json
import pathlib

import pytest
import torch
from transformers import AutoConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from specforge_mcore.config import DraftConfig
from specforge_mcore.draft.model import DraftArch, Eagle3Draft

REPO = pathlib.Path(__file__).resolve().parents[2]


def hf_cos_sin(hf: dict, head_dim: int, positions: torch.Tensor):
    config = AutoConfig.for_model(**hf)
    config.head_dim = head_dim
    kind = hf["rope_parameters"]["rope_type"]
    if kind == "default":
        base = hf["rope_parameters"]["rope_theta"]
        inv_freq, factor = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim)), 1.0
    else:
        inv_freq, factor = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    angles = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], -1)
    return emb.cos() * factor, emb.sin() * factor


@pytest.mark.parametrize("model", ["deepseek-v3", "gpt-oss-120b", "llama-3.1-8b", "qwen3-235b-a22b"])
def test_draft_rope_matches_the_targets_definition(model):
    hf = json.loads((REPO / "configs" / "hf" / model / "config.json").read_text())
    arch = DraftArch.from_target(hf, DraftConfig(), [1, 2, 3], 64)
    arch.vocab_size, arch.hidden_size, arch.target_hidden_size = 128, 32, 32  # only the RoPE matters here
    arch.intermediate_size, arch.num_attention_heads, arch.num_key_value_heads = 32, 2, 1
    draft = Eagle3Draft(arch)
    positions = torch.tensor([0, 1, 7, 100, 1000])  # fp32 angles: ~1e-4 rad apart past 1000
    cos, sin = draft.rope.cos_sin(positions)
    hf_view = dict(hf, rope_parameters=arch.rope, max_position_embeddings=arch.max_position_embeddings)
    want_cos, want_sin = hf_cos_sin(hf_view, arch.head_dim, positions)
    torch.testing.assert_close(cos, want_cos, rtol=0, atol=1e-4)
    torch.testing.assert_close(sin, want_sin, rtol=0, atol=1e-4)
    if arch.rope["rope_type"] == "yarn":
        assert draft.rope.attention_factor != 1.0 or model == "deepseek-v3"  # DeepSeek's mscale ratio is 1
