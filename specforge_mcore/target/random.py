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
    "llama": ("LlamaConfig", dict(_BASE, rope_theta=10000.0, tie_word_embeddings=True)),  # tied, like SmolLM2
    "qwen3": ("Qwen3Config", dict(_BASE, rope_theta=1000000.0)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_BASE, rope_theta=1000000.0, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=1,
                                          mlp_only_layers=[])),
    "mixtral": ("MixtralConfig", dict(_BASE, rope_theta=1000000.0, num_local_experts=4, num_experts_per_tok=2)),
    # MLA (q and kv latents, 16+8 query/key head, 16 value head), YaRN with both mscales, first layer dense,
    # 8 sigmoid-routed experts in 4 groups (top-4 from the best 2 groups) plus a shared expert.
    "deepseek_v3": ("DeepseekV3Config", dict(
        {k: v for k, v in _BASE.items() if k != "head_dim"}, num_key_value_heads=4, q_lora_rank=32,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1,
        n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
        moe_intermediate_size=32, routed_scaling_factor=2.5, norm_topk_prob=True,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=512,
                             beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=0.8))),
    # Sinks, biases, alternating 4-token sliding windows, YaRN; swiglu_limit small enough that the clamp bites.
    "gpt_oss": ("GptOssConfig", dict(
        _BASE, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
        swiglu_limit=0.2, rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, original_max_position_embeddings=512,
                             beta_fast=32.0, beta_slow=1.0, truncate=False))),
}
MODEL_CLASSES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "mixtral": "MixtralForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
                 "gpt_oss": "GptOssForCausalLM"}


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
            # Biases and sinks start at zero (or barely off it): make them count.
            elif name.endswith("bias"):
                param.uniform_(-0.1, 0.1)
            elif name.endswith("sinks"):
                param.uniform_(-1.0, 1.0)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.uniform_(-0.05, 0.05)
    os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(out_dir) or ".")
    model.save_pretrained(tmp)
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
