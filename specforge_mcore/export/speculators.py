"""The vLLM speculators layout: ``Eagle3DraftModel`` with ``layers.0.*`` tensors.

``config.json`` carries ``speculators_model_type: eagle3``, a ``speculators_config`` (algorithm, one greedy
proposal method, the verifier = the target), the decoder layer's sizes as a Llama config under
``transformer_layer_config``, and the EAGLE-3 fields at the top level. Two conventions differ from
SGLang's and are converted here (see ``contract``): the capture layer ids are written as the input of
the next layer (ours + 1), and ``norm_before_residual`` is written explicitly as false (vLLM assumes true
when it is absent).
"""

from __future__ import annotations

import torch

from specforge_mcore.draft.model import DraftArch
from specforge_mcore.export import contract
from specforge_mcore.rope import rope_parameters

LAYOUT = contract.SPECULATORS
WEIGHTS = "model.safetensors"
_OURS, _THEIRS = "midlayer.", contract.layer_prefix(LAYOUT)


def tensors(state: dict[str, torch.Tensor], arch: DraftArch) -> dict[str, torch.Tensor]:
    """The draft's state dict under speculators' names (d2t/t2d only with a reduced vocabulary)."""
    contract.check_representable(arch, LAYOUT)
    keep_mapping = contract.has_vocab_mapping(arch, LAYOUT)
    if not keep_mapping and bool(state["d2t"].any()):
        raise contract.ContractError("the draft vocabulary is the whole target vocabulary but d2t is not the "
                                     "identity; the speculators layout cannot represent that mapping")
    out = {}
    for name, tensor in state.items():
        if name in ("d2t", "t2d") and not keep_mapping:
            continue
        out[_THEIRS + name[len(_OURS):] if name.startswith(_OURS) else name] = tensor
    return out


def draft_state(tensors: dict[str, torch.Tensor], arch: DraftArch) -> dict[str, torch.Tensor]:
    """Inverse of ``tensors`` (an identity mapping is filled in when d2t/t2d are absent)."""
    state = {_OURS + k[len(_THEIRS):] if k.startswith(_THEIRS) else k: v for k, v in tensors.items()}
    if not contract.has_vocab_mapping(arch, LAYOUT):
        state["d2t"] = torch.zeros(arch.draft_vocab_size, dtype=torch.int64)
        state["t2d"] = torch.ones(arch.vocab_size, dtype=torch.bool)
    return state


def config(arch: DraftArch, dtype: torch.dtype, target_path: str | None = None,
           target_architectures: list[str] | None = None, speculative_tokens: int = 3) -> dict:
    rope = contract.rope_fields(arch)
    layer = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_key_value_heads,
        "head_dim": arch.head_dim,
        "num_hidden_layers": 1,
        "vocab_size": arch.vocab_size,
        "rms_norm_eps": arch.rms_norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "max_position_embeddings": arch.max_position_embeddings,
        "rope_theta": rope["rope_theta"],
        "rope_scaling": rope["rope_scaling"],
        "rope_parameters": rope["rope_parameters"],
        "tie_word_embeddings": False,
    }
    fields = {
        "architectures": [contract.SPECULATORS_ARCHITECTURE],
        "speculators_model_type": "eagle3",
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": speculative_tokens,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": target_path, "architectures": list(target_architectures or [])},
        },
        "transformer_layer_config": layer,
        "draft_vocab_size": arch.draft_vocab_size,
        "norm_before_residual": False,
        "target_hidden_size": arch.target_hidden_size if arch.target_hidden_size != arch.hidden_size else None,
        "eagle_aux_hidden_state_layer_ids": contract.capture_ids(arch, LAYOUT),
        "torch_dtype": contract.DTYPE_NAMES[dtype],
        "dtype": contract.DTYPE_NAMES[dtype],
    }
    return fields


def arch_from_config(cfg: dict, where: str) -> DraftArch:
    """The DraftArch a speculators Eagle3 ``config.json`` describes."""
    layer = cfg.get("transformer_layer_config")
    if not isinstance(layer, dict):
        raise contract.ContractError(f"{where}: speculators config without a transformer_layer_config object")
    ids = cfg.get("eagle_aux_hidden_state_layer_ids")
    if not isinstance(ids, list) or len(ids) != 3:
        raise contract.ContractError(f"{where}: eagle_aux_hidden_state_layer_ids must list three layer ids, "
                                     f"found {ids!r}")
    if min(ids) < 1:
        raise contract.ContractError(f"{where}: eagle_aux_hidden_state_layer_ids={ids} includes the embedding "
                                     "(id 0), which this project's drafts cannot capture")
    heads = int(layer["num_attention_heads"])
    hidden = int(layer["hidden_size"])
    return DraftArch(
        hidden_size=hidden,
        intermediate_size=int(layer["intermediate_size"]),
        num_attention_heads=heads,
        num_key_value_heads=int(layer.get("num_key_value_heads") or heads),
        head_dim=int(layer.get("head_dim") or hidden // heads),
        vocab_size=int(layer["vocab_size"]),
        draft_vocab_size=int(cfg.get("draft_vocab_size") or layer["vocab_size"]),
        target_hidden_size=int(cfg.get("target_hidden_size") or hidden),
        rms_norm_eps=float(layer["rms_norm_eps"]),
        rope=rope_parameters(layer),
        max_position_embeddings=int(layer.get("max_position_embeddings", 4096)),
        capture_layer_ids=[int(i) - 1 for i in ids],  # input of layer i+1 == output of layer i
        per_layer_norm=False,
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
    )


def serving_command(target_path: str, draft_dir: str, steps: int = 3) -> str:
    return (f"vllm serve {target_path} --speculative-config "
            f"'{{\"model\": \"{draft_dir}\", \"method\": \"eagle3\", \"num_speculative_tokens\": {steps}}}'")


def readme(arch: DraftArch, dtype: torch.dtype, target_path: str, draft_dir: str, source: str) -> str:
    ids = contract.capture_ids(arch, LAYOUT)
    return f"""# EAGLE-3 draft (vLLM speculators layout)

Written by `specforge-mcore export --format speculators` from `{source}`.

- target hidden size {arch.target_hidden_size}, draft hidden size {arch.hidden_size}, target vocabulary {arch.vocab_size}, draft vocabulary {arch.draft_vocab_size}
- features: outputs of target layers {arch.capture_layer_ids} (0-based), written as `eagle_aux_hidden_state_layer_ids: {ids}` (vLLM reads the input of layer i, i.e. the output of layer i-1)
- weights: {contract.DTYPE_NAMES[dtype]}; no `embed_tokens` (the target's is used)

Serve it with vLLM:

```
{serving_command(target_path, draft_dir)}
```
"""
