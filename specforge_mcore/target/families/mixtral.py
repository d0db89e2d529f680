"""Mixtral-style MoE (Mixtral 8x7B, and the SmolLM2 MoE upcycle): Llama attention, ``block_sparse_moe``
with experts w1 (gate) / w3 (up) / w2 (down); softmax, top-k, renormalised."""

from __future__ import annotations

from typing import Optional

from specforge_mcore.target.families.qwen3_moe import Qwen3Moe


class Mixtral(Qwen3Moe):
    name = "mixtral"
    architectures = ("MixtralForCausalLM",)
    model_types = ("mixtral",)
    qk_layernorm = False

    def moe_layer_ids(self, hf: dict) -> list[int]:
        return list(range(hf["num_hidden_layers"]))

    def router_pre_softmax(self, hf: dict) -> bool:
        return False  # Mixtral always renormalises the top-k weights

    def hf_key(self, kind: str, layer: Optional[int] = None, expert: Optional[int] = None) -> str:
        p = f"model.layers.{layer}.block_sparse_moe"
        moe = {
            "router": f"{p}.gate.weight",
            "expert_gate": f"{p}.experts.{expert}.w1.weight",
            "expert_up": f"{p}.experts.{expert}.w3.weight",
            "expert_down": f"{p}.experts.{expert}.w2.weight",
        }
        return moe[kind] if kind in moe else super(Qwen3Moe, self).hf_key(kind, layer, expert)
