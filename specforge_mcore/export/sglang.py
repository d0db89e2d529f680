"""The SGLang EAGLE-3 layout (docs/design.md §5): ``LlamaForCausalLMEagle3`` with ``midlayer.*`` tensors.

The draft's own parameter names already are SGLang's, so the tensors pass through unchanged, except the
EAGLE-3.1 per-captured-layer norms, which SGLang calls ``fc_norm.{0,1,2}`` (enabled by ``fc_norm: true``).
"""

from __future__ import annotations

import torch

from specforge_mcore.draft.model import DraftArch
from specforge_mcore.export import contract
from specforge_mcore.rope import rope_parameters

LAYOUT = contract.SGLANG
WEIGHTS = "model.safetensors"


def _to_serving_name(name: str) -> str:
    return name.replace("layer_norms.", "fc_norm.", 1) if name.startswith("layer_norms.") else name


def _to_draft_name(name: str) -> str:
    return name.replace("fc_norm.", "layer_norms.", 1) if name.startswith("fc_norm.") else name


def tensors(state: dict[str, torch.Tensor], arch: DraftArch) -> dict[str, torch.Tensor]:
    """The draft's state dict (our names) under SGLang's names."""
    return {_to_serving_name(k): v for k, v in state.items()}


def draft_state(tensors: dict[str, torch.Tensor], arch: DraftArch) -> dict[str, torch.Tensor]:
    """Inverse of ``tensors``."""
    return {_to_draft_name(k): v for k, v in tensors.items()}


def config(arch: DraftArch, dtype: torch.dtype, target_path: str | None = None,
           target_architectures: list[str] | None = None) -> dict:
    """SGLang's config.json (the target is not recorded in this layout; the arguments keep the layouts'
    signatures alike)."""
    rope = contract.rope_fields(arch)
    fields = {
        "architectures": [contract.SGLANG_ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_key_value_heads,
        "head_dim": arch.head_dim,
        "num_hidden_layers": 1,
        "vocab_size": arch.vocab_size,
        "draft_vocab_size": arch.draft_vocab_size,
        "rms_norm_eps": arch.rms_norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "max_position_embeddings": arch.max_position_embeddings,
        "rope_theta": rope["rope_theta"],
        "rope_scaling": rope["rope_scaling"],
        "rope_parameters": rope["rope_parameters"],
        "tie_word_embeddings": False,
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": contract.capture_ids(arch, LAYOUT),
            "use_aux_hidden_state": True,
        },
        "torch_dtype": contract.DTYPE_NAMES[dtype],
        "dtype": contract.DTYPE_NAMES[dtype],
    }
    if arch.target_hidden_size != arch.hidden_size:
        fields["target_hidden_size"] = arch.target_hidden_size
    if arch.per_layer_norm:
        fields["fc_norm"] = True
    return fields


def arch_from_config(cfg: dict, where: str) -> DraftArch:
    """The DraftArch an SGLang EAGLE-3 ``config.json`` describes."""
    eagle = cfg.get("eagle_config") or {}
    ids = eagle.get("eagle_aux_hidden_state_layer_ids")
    if not isinstance(ids, list) or len(ids) != 3:
        raise contract.ContractError(f"{where}: eagle_config.eagle_aux_hidden_state_layer_ids must list three "
                                     f"layer ids, found {ids!r}")
    heads = int(cfg["num_attention_heads"])
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    return DraftArch(
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
        vocab_size=int(cfg["vocab_size"]),
        draft_vocab_size=int(cfg.get("draft_vocab_size") or cfg["vocab_size"]),
        target_hidden_size=int(cfg.get("target_hidden_size") or cfg["hidden_size"]),
        rms_norm_eps=float(cfg["rms_norm_eps"]),
        rope=rope_parameters(cfg),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        capture_layer_ids=[int(i) for i in ids],
        per_layer_norm=bool(cfg.get("fc_norm") or cfg.get("use_aux_norm")),
        torch_dtype=str(dtype),
    )


def serving_command(target_path: str, draft_dir: str, steps: int = 3, topk: int = 1, num_draft_tokens: int = 4) -> str:
    return (f"python -m sglang.launch_server --model {target_path} --speculative-algorithm EAGLE3 "
            f"--speculative-draft-model-path {draft_dir} --speculative-num-steps {steps} "
            f"--speculative-eagle-topk {topk} --speculative-num-draft-tokens {num_draft_tokens}")


def readme(arch: DraftArch, dtype: torch.dtype, target_path: str, draft_dir: str, source: str) -> str:
    return f"""# EAGLE-3 draft (SGLang layout)

Written by `specforge-mcore export` from `{source}`.

- target hidden size {arch.target_hidden_size}, draft hidden size {arch.hidden_size}, target vocabulary {arch.vocab_size}, draft vocabulary {arch.draft_vocab_size}
- features: outputs of target layers {arch.capture_layer_ids} (0-based, `eagle_config.eagle_aux_hidden_state_layer_ids`)
- weights: {contract.DTYPE_NAMES[dtype]}; `d2t` int64 offsets (target id = draft id + d2t), `t2d` bool; no `embed_tokens` (the target's is used)

Serve it with SGLang:

```
{serving_command(target_path, draft_dir)}
```

Evaluate it (acceptance length, lossless check) with:

```
specforge-mcore eval --target {target_path} --draft {draft_dir} --prompts gsm8k --configs 3,1,4 5,1,6 7,1,8 5,4,8
```
"""
