"""DeepSeek-V3 / R1 (and configs that reuse ``DeepseekV3ForCausalLM``, e.g. Kimi-K2).

* Attention is multi-latent (MLA): queries through a low-rank ``q_a_proj`` -> RMSNorm -> ``q_b_proj``
  (or one ``q_proj`` when ``q_lora_rank`` is null), keys/values through ``kv_a_proj_with_mqa`` (latent
  plus one shared rotary key) -> RMSNorm -> ``kv_b_proj``. Megatron's ``MLASelfAttention`` has the same
  parameters in the same row order, so no re-layout is needed; its rotary dims are rotated as
  interleaved pairs, which is HF's ``rope_interleave=true``.
* RoPE: default or YaRN. HF multiplies cos/sin by YaRN's attention factor and the softmax scale by
  ``mscale(factor, mscale_all_dim)**2``; Megatron's MLA does both the same way. The rotary angles come
  from the host's explicit position ids (``build.PositionRotary``), not from Megatron's 0..s-1.
* MoE from layer ``first_k_dense_replace`` on: sigmoid router, a per-expert correction bias used only
  for choosing experts, group-limited top-k, top-k weights renormalised then scaled by
  ``routed_scaling_factor``, plus ``n_shared_experts`` always-on experts (one MLP of that many times
  the expert width).

Megatron-Core has no switch for some HF variants; those configs are refused with the reason.
The multi-token-prediction layers of the real checkpoints (``num_nextn_predict_layers``) are not part
of the causal LM (transformers ignores them too) and are never read.
"""

from __future__ import annotations

from typing import Any, Optional

from specforge_mcore.errors import UserError
from specforge_mcore.rope import rope_parameters
from specforge_mcore.target.families.base import Family
from specforge_mcore.target.fp8 import checkpoint_format

# The q/kv latent norms are built with HF's default eps; Megatron gives them layernorm_epsilon.
LATENT_NORM_EPS = 1e-6


def num_routed_experts(hf: dict) -> int:
    value = hf.get("n_routed_experts") or hf.get("num_local_experts")
    if not value:
        raise UserError("config.json: a DeepSeek-V3 config needs n_routed_experts")
    return int(value)


class DeepseekV3(Family):
    name = "deepseek_v3"
    architectures = ("DeepseekV3ForCausalLM",)
    model_types = ("deepseek_v3",)
    is_moe = True

    # ---- validation -------------------------------------------------------------------------
    def check(self, hf: dict, where: str) -> None:
        def refuse(what: str, why: str) -> None:
            raise UserError(f"{where}: {what} is not supported for {self.name}: {why}")

        checkpoint_format(hf, where)  # the official FP8 release (128x128 blocks) is read with its scales
        if hf.get("hidden_act", "silu") != "silu":
            refuse(f"hidden_act={hf['hidden_act']!r}", "expected 'silu'")
        if hf.get("attention_bias"):
            refuse("attention_bias=true", "Megatron's MLA has no bias on q_a_proj / kv_a_proj_with_mqa")
        if not hf.get("rope_interleave", True):
            refuse("rope_interleave=false", "Megatron's MLA always rotates interleaved pairs of the rotary dims")
        kind = rope_parameters(hf)["rope_type"]
        if kind not in ("default", "yarn"):
            refuse(f"rope_type={kind!r}", "supported: default, yarn")
        if kind == "yarn" and not rope_parameters(hf).get("factor"):
            refuse("rope_type='yarn' without a factor", "set rope_parameters.factor")
        eps = float(hf.get("rms_norm_eps", 1e-6))
        if eps != LATENT_NORM_EPS:
            refuse(f"rms_norm_eps={eps}", f"HF normalises the q/kv latents with eps={LATENT_NORM_EPS} and the "
                   "layers with rms_norm_eps; Megatron uses one epsilon for both")
        for key, expected in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
            if key in hf and hf[key] != expected:
                refuse(f"{key}={hf[key]!r}", f"DeepseekV3ForCausalLM routes with {key}={expected!r}")
        experts, topk = num_routed_experts(hf), int(hf["num_experts_per_tok"])
        normalised = hf.get("norm_topk_prob", True)
        if not normalised or topk == 1:
            refuse(f"norm_topk_prob={normalised} with num_experts_per_tok={topk}",
                   "Megatron's sigmoid router always renormalises the top-k weights, and only when top-k > 1")
        groups, group_topk = int(hf.get("n_group") or 1), int(hf.get("topk_group") or 1)
        if experts % groups:
            refuse(f"n_group={groups}", f"it must divide n_routed_experts={experts}")
        if group_topk < groups and (topk % group_topk or topk // group_topk != 2):
            refuse(f"group-limited routing with num_experts_per_tok={topk}, topk_group={group_topk}",
                   "HF scores a group by its top-2 experts, Megatron by its top num_experts_per_tok/topk_group; "
                   "they agree only when that ratio is 2")

    def check_layout(self, hf: dict, layout, where: str) -> None:
        sizes = {"q_lora_rank": hf.get("q_lora_rank") or 0,
                 "kv_lora_rank + qk_rope_head_dim": hf["kv_lora_rank"] + hf["qk_rope_head_dim"],
                 "moe_intermediate_size * n_shared_experts": self.shared_expert_size(hf) or 0}
        for name, size in sizes.items():
            # The local spec splits the latent down-projections' rows over TP, and shared experts run on TP.
            if size % layout.tp:
                raise UserError(f"{where}: {name}={size} is not divisible by tp={layout.tp}")

    # ---- Megatron config ----------------------------------------------------------------------
    def moe_layer_ids(self, hf: dict) -> list[int]:
        return list(range(int(hf.get("first_k_dense_replace") or 0), hf["num_hidden_layers"]))

    def shared_expert_size(self, hf: dict) -> Optional[int]:
        shared = int(hf.get("n_shared_experts") or 0)
        return int(hf["moe_intermediate_size"]) * shared if shared else None

    def transformer_config(self, hf: dict) -> dict[str, Any]:
        cfg = super().transformer_config(hf)
        rope = rope_parameters(hf)
        yarn = rope["rope_type"] == "yarn"
        factor = float(rope["factor"]) if yarn else 1.0
        heads = hf["num_attention_heads"]
        groups, group_topk = int(hf.get("n_group") or 1), int(hf.get("topk_group") or 1)
        moe_ids = set(self.moe_layer_ids(hf))
        cfg.update(
            multi_latent_attention=True,
            num_query_groups=heads,
            # The local attention's output width is kv_channels per head: MLA's value head.
            kv_channels=int(hf["v_head_dim"]),
            q_lora_rank=hf.get("q_lora_rank"),
            kv_lora_rank=int(hf["kv_lora_rank"]),
            qk_head_dim=int(hf["qk_nope_head_dim"]),
            qk_pos_emb_head_dim=int(hf["qk_rope_head_dim"]),
            v_head_dim=int(hf["v_head_dim"]),
            qk_layernorm=True,  # builds the q/kv latent norms in the local spec
            rotary_interleaved=False,
            rope_type="yarn" if yarn else "rope",
            rotary_base=float(rope["rope_theta"]),
            # Only the softmax scale reads these (mscale(factor, mscale_all_dim)**2, like HF); the angles
            # and YaRN's cos/sin factor come from PositionRotary.
            rotary_scaling_factor=factor,
            mscale=float(rope.get("mscale") or 1.0),
            mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0),
            original_max_position_embeddings=int(rope.get("original_max_position_embeddings")
                                                  or hf["max_position_embeddings"]),
            num_moe_experts=num_routed_experts(hf),
            moe_router_topk=int(hf["num_experts_per_tok"]),
            moe_ffn_hidden_size=int(hf["moe_intermediate_size"]),
            moe_shared_expert_intermediate_size=self.shared_expert_size(hf),
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            moe_router_num_groups=groups if group_topk < groups else None,
            moe_router_group_topk=group_topk if group_topk < groups else None,
            moe_router_topk_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            moe_router_pre_softmax=False,
            moe_layer_freq=[1 if i in moe_ids else 0 for i in range(hf["num_hidden_layers"])],
            # Frozen target: no load-balancing loss, no token dropping.
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_router_dtype="fp32",
        )
        return cfg

    # ---- HF tensor names ----------------------------------------------------------------------
    # q_norm / kv_norm are the query / key-value latent norms (Megatron's q_layernorm / kv_layernorm).
    def hf_key(self, kind: str, layer: Optional[int] = None, expert: Optional[int] = None) -> str:
        a = f"model.layers.{layer}.self_attn"
        m = f"model.layers.{layer}.mlp"
        names = {
            "q_down": f"{a}.q_a_proj.weight",
            "q_norm": f"{a}.q_a_layernorm.weight",
            "q_up": f"{a}.q_b_proj.weight",
            "kv_down": f"{a}.kv_a_proj_with_mqa.weight",
            "kv_norm": f"{a}.kv_a_layernorm.weight",
            "kv_up": f"{a}.kv_b_proj.weight",
            "router": f"{m}.gate.weight",
            "router_expert_bias": f"{m}.gate.e_score_correction_bias",
            "expert_gate": f"{m}.experts.{expert}.gate_proj.weight",
            "expert_up": f"{m}.experts.{expert}.up_proj.weight",
            "expert_down": f"{m}.experts.{expert}.down_proj.weight",
            "shared_gate": f"{m}.shared_experts.gate_proj.weight",
            "shared_up": f"{m}.shared_experts.up_proj.weight",
            "shared_down": f"{m}.shared_experts.down_proj.weight",
        }
        if kind in ("k", "v", "k_norm", "q_bias", "k_bias", "v_bias"):
            raise KeyError(f"{self.name} has no tensor of kind {kind!r} (MLA)")
        return names[kind] if kind in names else super().hf_key(kind, layer, expert)
