"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3 attention, softmax router over all experts,
top-k, optional renormalisation of the top-k weights (``norm_topk_prob``), no shared expert."""

from __future__ import annotations

from typing import Any, Optional

from specforge_mcore.errors import UserError
from specforge_mcore.target.families.qwen3 import Qwen3


def num_experts(hf: dict) -> int:
    # Hub configs say num_experts; transformers 5.x writes num_local_experts.
    value = hf.get("num_experts") or hf.get("num_local_experts")
    if not value:
        raise UserError("config.json: a MoE config needs num_experts (or num_local_experts)")
    return int(value)


class Qwen3Moe(Qwen3):
    name = "qwen3_moe"
    architectures = ("Qwen3MoeForCausalLM",)
    model_types = ("qwen3_moe",)
    is_moe = True

    def check(self, hf: dict, where: str) -> None:
        super().check(hf, where)
        num_experts(hf)

    def moe_layer_ids(self, hf: dict) -> list[int]:
        step = int(hf.get("decoder_sparse_step", 1) or 1)
        dense = set(hf.get("mlp_only_layers") or [])
        return [i for i in range(hf["num_hidden_layers"]) if i not in dense and (i + 1) % step == 0]

    def router_pre_softmax(self, hf: dict) -> bool:
        # softmax over all experts then top-k without renormalising == Megatron's pre-softmax;
        # with renormalisation it equals top-k on logits then softmax (Megatron's default).
        return not bool(hf.get("norm_topk_prob", False))

    def transformer_config(self, hf: dict) -> dict[str, Any]:
        cfg = super().transformer_config(hf)
        moe_ids = set(self.moe_layer_ids(hf))
        cfg.update(
            num_moe_experts=num_experts(hf),
            moe_router_topk=int(hf["num_experts_per_tok"]),
            moe_ffn_hidden_size=int(hf.get("moe_intermediate_size") or hf["intermediate_size"]),
            moe_router_pre_softmax=self.router_pre_softmax(hf),
            moe_router_score_function="softmax",
            moe_layer_freq=[1 if i in moe_ids else 0 for i in range(hf["num_hidden_layers"])],
            # Frozen target: no load-balancing loss, no token dropping.
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_router_dtype="fp32",
        )
        return cfg

    def hf_key(self, kind: str, layer: Optional[int] = None, expert: Optional[int] = None) -> str:
        p = f"model.layers.{layer}.mlp"
        moe = {
            "router": f"{p}.gate.weight",
            "expert_gate": f"{p}.experts.{expert}.gate_proj.weight",
            "expert_up": f"{p}.experts.{expert}.up_proj.weight",
            "expert_down": f"{p}.experts.{expert}.down_proj.weight",
        }
        return moe[kind] if kind in moe else super().hf_key(kind, layer, expert)
