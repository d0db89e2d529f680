"""Llama (dense): Llama-2/3.x and SmolLM2. The base Family already describes it."""

from specforge_mcore.target.families.base import Family


class Llama(Family):
    name = "llama"
    architectures = ("LlamaForCausalLM",)
    model_types = ("llama",)
