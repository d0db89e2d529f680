"""What a target family must provide: HF config -> Megatron config, and HF tensor names.

A family is a small class (one file per family, siblings look alike):

* ``check(hf)``: refuse configs that ask for something this family/Megatron cannot build.
* ``transformer_config(hf)``: the ``TransformerConfig`` fields of the model (no parallel fields).
* ``hf_key(kind, layer, expert)``: the HF tensor name(s) behind one Megatron parameter kind.

The sharding rules (which slice of which HF tensor a rank loads) do not depend on the family and
live in ``target/sharding.py``; a family only names tensors.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F

from specforge_mcore.errors import UserError
from specforge_mcore.rope import rope_parameters
from specforge_mcore.target.fp8 import checkpoint_format


def head_dim(hf: dict) -> int:
    return int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])


class Family:
    """Base: a Llama-style dense decoder. Subclasses override what differs."""

    name: ClassVar[str] = "llama"
    architectures: ClassVar[tuple[str, ...]] = ("LlamaForCausalLM",)
    model_types: ClassVar[tuple[str, ...]] = ("llama",)
    qk_layernorm: ClassVar[bool] = False
    is_moe: ClassVar[bool] = False
    # One [E, ...] tensor per expert projection (GPT-OSS) instead of one tensor per expert.
    stacked_experts: ClassVar[bool] = False

    # ---- validation -------------------------------------------------------------------------
    def check(self, hf: dict, where: str) -> None:
        checkpoint_format(hf, where)  # block FP8 is read with its scales; any other quantization is refused
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UserError(f"{where}: hidden_act={act!r} is not supported for {self.name} (expected 'silu')")
        if hf.get("mlp_bias"):
            raise UserError(f"{where}: mlp_bias=true is not supported for {self.name} (Megatron add_bias_linear "
                            "would also add a bias to the attention output projection)")
        kind = rope_parameters(hf)["rope_type"]
        if kind not in ("default", "llama3", "linear"):
            raise UserError(f"{where}: rope_type={kind!r} is not supported for {self.name} "
                            "(supported: default, llama3, linear)")
        if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
            raise UserError(f"{where}: partial_rotary_factor={hf['partial_rotary_factor']} is not supported "
                            f"for {self.name} (expected 1.0)")
        if hf.get("use_sliding_window") and hf.get("sliding_window"):
            raise UserError(f"{where}: sliding-window attention (use_sliding_window=true) is not supported "
                            f"for {self.name}")

    def check_layout(self, hf: dict, layout: Any, where: str) -> None:
        """Sizes this family needs divisible beyond the ones ``build.check_layout`` checks for all."""

    # ---- Megatron config ----------------------------------------------------------------------
    def transformer_config(self, hf: dict) -> dict[str, Any]:
        cfg = dict(
            num_layers=hf["num_hidden_layers"],
            hidden_size=hf["hidden_size"],
            ffn_hidden_size=hf["intermediate_size"],
            num_attention_heads=hf["num_attention_heads"],
            num_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            kv_channels=head_dim(hf),
            normalization="RMSNorm",
            layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=bool(hf.get("attention_bias", False)),
            qk_layernorm=self.qk_layernorm,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            # The fused kernels below need Apex/TE or a GPU; the unfused paths are exact.
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            masked_softmax_fusion=False,
            apply_rope_fusion=False,
            persist_layer_norm=False,
            gradient_accumulation_fusion=False,
            attention_softmax_in_fp32=True,
        )
        return cfg

    def gpt_model_kwargs(self, hf: dict) -> dict[str, Any]:
        return dict(
            position_embedding_type="rope",
            rotary_base=rope_parameters(hf)["rope_theta"],
            share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
            max_sequence_length=int(hf.get("max_position_embeddings", 4096)),
        )

    # ---- HF tensor names ----------------------------------------------------------------------
    # kinds: embed, final_norm, lm_head, input_norm, q, k, v, q_bias, k_bias, v_bias, o, q_norm,
    # k_norm, post_attn_norm, gate, up, down, router, expert_gate, expert_up, expert_down,
    # shared_gate, shared_up, shared_down, router_bias
    def hf_key(self, kind: str, layer: Optional[int] = None, expert: Optional[int] = None) -> str:
        p = f"model.layers.{layer}"
        names = {
            "embed": "model.embed_tokens.weight",
            "final_norm": "model.norm.weight",
            "lm_head": "lm_head.weight",
            "input_norm": f"{p}.input_layernorm.weight",
            "q": f"{p}.self_attn.q_proj.weight",
            "k": f"{p}.self_attn.k_proj.weight",
            "v": f"{p}.self_attn.v_proj.weight",
            "q_bias": f"{p}.self_attn.q_proj.bias",
            "k_bias": f"{p}.self_attn.k_proj.bias",
            "v_bias": f"{p}.self_attn.v_proj.bias",
            "o": f"{p}.self_attn.o_proj.weight",
            "q_norm": f"{p}.self_attn.q_norm.weight",
            "k_norm": f"{p}.self_attn.k_norm.weight",
            "post_attn_norm": f"{p}.post_attention_layernorm.weight",
            "gate": f"{p}.mlp.gate_proj.weight",
            "up": f"{p}.mlp.up_proj.weight",
            "down": f"{p}.mlp.down_proj.weight",
        }
        if kind not in names:
            raise KeyError(f"{self.name} has no tensor of kind {kind!r}")
        return names[kind]

    def lm_head_key(self, hf: dict) -> str:
        return self.hf_key("embed") if hf.get("tie_word_embeddings", False) else self.hf_key("lm_head")

    def moe_layer_ids(self, hf: dict) -> list[int]:
        """0-based ids of the layers whose MLP is a mixture of experts."""
        return []

    # ---- transformers class (for parity checks) ----------------------------------------------
    def hf_model_class(self) -> Any:
        import transformers

        return getattr(transformers, self.architectures[0])

    def default_dtype(self, hf: dict) -> torch.dtype:
        name = hf.get("torch_dtype") or hf.get("dtype") or "float32"
        return getattr(torch, name) if isinstance(name, str) else torch.float32
