"""Qwen3 (dense): Llama layout plus RMSNorm on each query and key head (q_norm / k_norm)."""

from specforge_mcore.target.families.base import Family


class Qwen3(Family):
    name = "qwen3"
    architectures = ("Qwen3ForCausalLM",)
    model_types = ("qwen3",)
    qk_layernorm = True
