"""Small random targets in HF format, generated on the fly (no download) for tests and the tiny config.

They are written as real HF directories (config.json + model.safetensors) by transformers itself, so
they go through exactly the loading path a downloaded checkpoint does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Optional

import torch

from specforge_mcore.errors import UserError

# Small but structurally complete: GQA (4 query heads over 2 KV groups), 8 layers so PP4 and the
# default capture layers [1, 3, 4] all exist, experts divisible by EP 2 and 4.
_BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
             max_position_embeddings=2048, tie_word_embeddings=False)
DEFAULTS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(_BASE, rope_theta=10000.0)),
    "qwen3": ("Qwen3Config", dict(_BASE, rope_theta=1000000.0)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_BASE, rope_theta=1000000.0, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=1,
                                          mlp_only_layers=[])),
    "mixtral": ("MixtralConfig", dict(_BASE, rope_theta=1000000.0, num_local_experts=4, num_experts_per_tok=2)),
}
MODEL_CLASSES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "mixtral": "MixtralForCausalLM"}


def cache_root() -> str:
    return os.environ.get("SPECFORGE_MCORE_CACHE", os.path.join(os.getcwd(), ".cache"))


def random_target(family: str, overrides: Optional[dict] = None, seed: int = 1234,
                  out_dir: Optional[str] = None) -> str:
    """Write (once) a random ``family`` model with ``overrides`` of the small defaults; return its dir."""
    import transformers

    if family not in DEFAULTS:
        raise UserError(f"random target family {family!r}: expected one of {sorted(DEFAULTS)}")
    config_class, defaults = DEFAULTS[family]
    fields = dict(defaults, **(overrides or {}))
    key = hashlib.sha256(json.dumps([family, fields, seed, transformers.__version__], sort_keys=True).encode()).hexdigest()[:16]
    out_dir = out_dir or os.path.join(cache_root(), "targets", f"random-{family}-{key}")
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    config = getattr(transformers, config_class)(**fields)
    config.architectures = [MODEL_CLASSES[family]]
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASSES[family])(config).float()
    with torch.no_grad():
        # Random norms (not all ones) so a misplaced norm weight cannot go unnoticed in parity tests.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.uniform_(0.5, 1.5)
    os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(out_dir) or ".")
    model.save_pretrained(tmp)
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
