"""GPT-OSS (gpt-oss-20b / gpt-oss-120b).

* Attention: GQA with biases on q/k/v/o, a learned per-head sink logit in the softmax (Megatron's
  ``softmax_type="learnable"``: its ``softmax_offset`` is HF's ``sinks``), and every other layer
  restricted to a sliding window (``layer_types``; Megatron's ``window_size`` +
  ``window_attn_skip_freq``). HF's window of W keys is the query and the W-1 before it, i.e. Megatron's
  ``(W-1, 0)``.
* RoPE: YaRN (or default). HF multiplies cos and sin by YaRN's attention factor; the whole head is
  rotary, so that equals scaling the attention logits by its square, which is what we give Megatron
  (``softmax_scale``) while the host supplies the angles.
* MoE in every layer: a router with bias, top-k over the logits then softmax over those k (Megatron's
  default softmax router), experts with biases and a clamped SwiGLU
  ``(clamp(up, -l, l) + 1) * g * sigmoid(alpha * g)`` with ``g = clamp(gate, max=l)``: Megatron's
  ``activation_func_clamp_value`` and ``glu_linear_offset=1`` around our ``alpha`` activation. HF stores
  the experts stacked ([E, in, out]) with gate and up interleaved column by column; ``target/sharding.py``
  describes each expert as one transposed entry to un-interleave on load.

Megatron-Core supports expert biases only with expert tensor parallel size 1, so layouts must say etp=1.
The released checkpoints are MXFP4-quantised; those are refused (dequantize to bf16 first).
Block-FP8 copies load when their experts are unquantized (stacked FP8 experts are refused).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import torch

from specforge_mcore.errors import UserError
from specforge_mcore.rope import rope_parameters, yarn_inverse_frequencies
from specforge_mcore.target.families.base import Family, head_dim
from specforge_mcore.target.fp8 import checkpoint_format


def gated_sigmoid(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """GPT-OSS's gate activation ``x * sigmoid(alpha * x)`` (SiLU at alpha=1, quick-GELU at 1.702)."""
    return x * torch.sigmoid(x * alpha)


class GptOss(Family):
    name = "gpt_oss"
    architectures = ("GptOssForCausalLM",)
    model_types = ("gpt_oss",)
    is_moe = True
    stacked_experts = True

    # ---- validation -------------------------------------------------------------------------
    def check(self, hf: dict, where: str) -> None:
        def refuse(what: str, why: str) -> None:
            raise UserError(f"{where}: {what} is not supported for {self.name}: {why}")

        # The released MXFP4 experts are refused here (their blocks would be read without scales); a
        # block-FP8 copy is read with its scales (stacked FP8 experts are refused when read).
        checkpoint_format(hf, where)
        if not hf.get("attention_bias", True):
            refuse("attention_bias=false", "Megatron's add_bias_linear gives attention and experts biases together")
        kind = rope_parameters(hf)["rope_type"]
        if kind not in ("default", "yarn"):
            refuse(f"rope_type={kind!r}", "supported: default, yarn")
        if float(rope_parameters(hf).get("partial_rotary_factor", 1.0)) != 1.0:
            refuse("partial_rotary_factor != 1", "YaRN's attention factor is folded into the softmax scale, "
                   "which is exact only when the whole head is rotary")
        types = self.layer_types(hf)
        unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
        if unknown:
            refuse(f"layer_types {unknown}", "expected 'sliding_attention' or 'full_attention'")
        if "sliding_attention" in types and not hf.get("sliding_window"):
            refuse("sliding_attention layers without sliding_window", "set sliding_window")

    def check_layout(self, hf: dict, layout, where: str) -> None:
        if layout.expert_tp != 1:
            raise UserError(f"layout {layout}: {self.name} experts have biases, which Megatron-Core supports only "
                            f"with expert tensor parallel size 1 (expert tp={layout.expert_tp}); add etp=1")

    # ---- Megatron config ----------------------------------------------------------------------
    def layer_types(self, hf: dict) -> list[str]:
        # transformers' default: sliding and full layers alternate, sliding first
        return list(hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                              for i in range(hf["num_hidden_layers"])])

    def moe_layer_ids(self, hf: dict) -> list[int]:
        return list(range(hf["num_hidden_layers"]))

    def transformer_config(self, hf: dict) -> dict[str, Any]:
        cfg = super().transformer_config(hf)
        dim = head_dim(hf)
        softmax_scale = None
        if rope_parameters(hf)["rope_type"] == "yarn":
            _, attention_factor = yarn_inverse_frequencies(hf, dim)
            softmax_scale = attention_factor ** 2 / math.sqrt(dim)
        types = self.layer_types(hf)
        windowed = "sliding_attention" in types
        cfg.update(
            add_bias_linear=True,
            add_qkv_bias=True,
            softmax_type="learnable",
            softmax_scale=softmax_scale,
            window_size=(int(hf["sliding_window"]) - 1, 0) if windowed else None,
            window_attn_skip_freq=[int(t == "sliding_attention") for t in types] if windowed else None,
            activation_func=functools.partial(gated_sigmoid, alpha=float(hf.get("swiglu_alpha", 1.702))),
            gated_linear_unit=True,
            glu_linear_offset=1.0,
            activation_func_clamp_value=float(hf.get("swiglu_limit", 7.0)),
            num_moe_experts=int(hf["num_local_experts"]),
            moe_router_topk=int(hf["num_experts_per_tok"]),
            moe_ffn_hidden_size=int(hf["intermediate_size"]),
            moe_router_score_function="softmax",
            moe_router_pre_softmax=False,  # top-k on the logits, then softmax over the k
            moe_layer_freq=[1] * hf["num_hidden_layers"],
            # Frozen target: no load-balancing loss, no token dropping.
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_router_dtype="fp32",
        )
        return cfg

    # ---- HF tensor names ----------------------------------------------------------------------
    # Experts are stacked over the first dim: gate_up [E, hidden, 2*I] (gate, up interleaved by column),
    # gate_up bias [E, 2*I], down [E, I, hidden], down bias [E, hidden].
    def hf_key(self, kind: str, layer: Optional[int] = None, expert: Optional[int] = None) -> str:
        a = f"model.layers.{layer}.self_attn"
        m = f"model.layers.{layer}.mlp"
        names = {
            "o_bias": f"{a}.o_proj.bias",
            "sinks": f"{a}.sinks",
            "router": f"{m}.router.weight",
            "router_bias": f"{m}.router.bias",
            "experts_gate_up": f"{m}.experts.gate_up_proj",
            "experts_gate_up_bias": f"{m}.experts.gate_up_proj_bias",
            "experts_down": f"{m}.experts.down_proj",
            "experts_down_bias": f"{m}.experts.down_proj_bias",
        }
        return names[kind] if kind in names else super().hf_key(kind, layer, expert)
