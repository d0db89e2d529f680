"""The serving-checkpoint contract (docs/design.md §5) as data, and the one check every writer and reader runs.

A serving directory is ``config.json`` + ``model.safetensors``. What must be in it is derived from the
draft's ``DraftArch`` alone:

* ``expected_tensors(arch, layout, dtype)``: every tensor name -> (shape, dtype). Nothing may be missing
  and nothing may be extra: SGLang's ``load_weights`` silently skips names it does not know and leaves
  the parameter it should have filled at its random initial value, so a renamed key is a draft that
  serves garbage without an error. The same holds for vLLM's loader.
* ``required_config(arch, layout, dtype)``: dotted config keys -> the value they must have.

Two layouts share the tensors and differ in names and config:

* ``sglang``: ``LlamaForCausalLMEagle3`` (``midlayer.*``, ``eagle_config``, capture ids in the
  output-of-layer convention, as SGLang adds one itself).
* ``speculators``: vLLM speculators' ``Eagle3DraftModel`` (``layers.0.*``, ``speculators_config``,
  ``transformer_layer_config``; vLLM reads ``eagle_aux_hidden_state_layer_ids`` as the *input* of that
  layer, so the ids are ours + 1; ``d2t``/``t2d`` exist only when the draft vocabulary is smaller).

``validate`` raises ``ContractError`` naming the first offending key, value or tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from specforge_mcore.draft.model import DraftArch
from specforge_mcore.errors import UserError

SGLANG = "sglang"
SPECULATORS = "speculators"
LAYOUTS = (SGLANG, SPECULATORS)

SGLANG_ARCHITECTURE = "LlamaForCausalLMEagle3"
SPECULATORS_ARCHITECTURE = "Eagle3DraftModel"

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES: dict[torch.dtype, str] = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


class ContractError(UserError):
    """A serving checkpoint (or one about to be written) that breaks the §5 contract."""


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


def layer_prefix(layout: str) -> str:
    """Where the decoder layer's tensors live in ``layout``."""
    return {SGLANG: "midlayer.", SPECULATORS: "layers.0."}[_check_layout(layout)]


def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise UserError(f"export format {layout!r}: expected one of {', '.join(LAYOUTS)}")
    return layout


def has_vocab_mapping(arch: DraftArch, layout: str) -> bool:
    """speculators drops d2t/t2d when the draft vocabulary is the whole target vocabulary."""
    return layout == SGLANG or arch.draft_vocab_size != arch.vocab_size


def check_representable(arch: DraftArch, layout: str) -> None:
    if arch.per_layer_norm and _check_layout(layout) == SPECULATORS:
        raise ContractError("the speculators Eagle3 layout has no per-captured-layer norms (EAGLE-3.1, "
                            "draft.per_layer_norm=true): export this draft with --format sglang")


def expected_tensors(arch: DraftArch, layout: str, dtype: torch.dtype) -> dict[str, TensorSpec]:
    """Every tensor of a ``layout`` checkpoint of ``arch``, with its shape and dtype (weights in ``dtype``)."""
    check_representable(arch, layout)
    hidden, target_hidden = arch.hidden_size, arch.target_hidden_size
    q_out, kv_out = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    inter = arch.intermediate_size
    layer = layer_prefix(layout)
    shapes: dict[str, tuple[int, ...]] = {
        "fc.weight": (hidden, 3 * target_hidden),
        f"{layer}self_attn.q_proj.weight": (q_out, 2 * hidden),
        f"{layer}self_attn.k_proj.weight": (kv_out, 2 * hidden),
        f"{layer}self_attn.v_proj.weight": (kv_out, 2 * hidden),
        f"{layer}self_attn.o_proj.weight": (hidden, q_out),
        f"{layer}mlp.gate_proj.weight": (inter, hidden),
        f"{layer}mlp.up_proj.weight": (inter, hidden),
        f"{layer}mlp.down_proj.weight": (hidden, inter),
        f"{layer}input_layernorm.weight": (hidden,),
        f"{layer}hidden_norm.weight": (hidden,),
        f"{layer}post_attention_layernorm.weight": (hidden,),
        "norm.weight": (hidden,),
        "lm_head.weight": (arch.draft_vocab_size, hidden),
    }
    if arch.per_layer_norm:
        # SGLang's per-aux RMSNorm before fc (config ``fc_norm: true``).
        shapes.update({f"fc_norm.{i}.weight": (target_hidden,) for i in range(3)})
    specs = {name: TensorSpec(shape, dtype) for name, shape in shapes.items()}
    if has_vocab_mapping(arch, layout):
        specs["d2t"] = TensorSpec((arch.draft_vocab_size,), torch.int64)
        specs["t2d"] = TensorSpec((arch.vocab_size,), torch.bool)
    return specs


def rope_fields(arch: DraftArch) -> dict[str, Any]:
    """Both RoPE spellings (transformers 5.x ``rope_parameters`` and legacy ``rope_theta``/``rope_scaling``),
    so older and newer loaders read the same base."""
    params = dict(arch.rope)
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    legacy_scaling = None if scaling.get("rope_type", "default") == "default" else scaling
    return {"rope_theta": float(params["rope_theta"]), "rope_scaling": legacy_scaling, "rope_parameters": params}


def capture_ids(arch: DraftArch, layout: str) -> list[int]:
    """The capture layer ids as ``layout`` spells them (see module doc)."""
    return [i + 1 for i in arch.capture_layer_ids] if layout == SPECULATORS else list(arch.capture_layer_ids)


def required_config(arch: DraftArch, layout: str, dtype: torch.dtype) -> dict[str, Any]:
    """Dotted config key -> the value a ``layout`` checkpoint of ``arch`` must carry."""
    _check_layout(layout)
    rope = rope_fields(arch)
    layer = {
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
        "max_position_embeddings": arch.max_position_embeddings,
        "tie_word_embeddings": False,
        "rope_theta": rope["rope_theta"],
        "rope_parameters.rope_theta": rope["rope_theta"],
        "rope_parameters.rope_type": arch.rope.get("rope_type", "default"),
    }
    ids = capture_ids(arch, layout)
    if layout == SGLANG:
        fields = dict(layer)
        fields.update({
            "architectures": [SGLANG_ARCHITECTURE],
            "draft_vocab_size": arch.draft_vocab_size,
            "eagle_config.eagle_aux_hidden_state_layer_ids": ids,
            "eagle_config.use_aux_hidden_state": True,
            "torch_dtype": DTYPE_NAMES[dtype],
        })
        if arch.target_hidden_size != arch.hidden_size:
            fields["target_hidden_size"] = arch.target_hidden_size
        if arch.per_layer_norm:
            fields["fc_norm"] = True
        return fields
    fields = {f"transformer_layer_config.{k}": v for k, v in layer.items()}
    fields.update({
        "architectures": [SPECULATORS_ARCHITECTURE],
        "speculators_model_type": "eagle3",
        "speculators_config.algorithm": "eagle3",
        "speculators_config.default_proposal_method": "greedy",
        "speculators_config.proposal_methods.0.proposal_type": "greedy",
        "draft_vocab_size": arch.draft_vocab_size,
        # vLLM defaults a missing flag to True; our residual is fc(features) itself, not its norm.
        "norm_before_residual": False,
        "eagle_aux_hidden_state_layer_ids": ids,
        "torch_dtype": DTYPE_NAMES[dtype],
    })
    if arch.target_hidden_size != arch.hidden_size:
        fields["target_hidden_size"] = arch.target_hidden_size
    return fields


_MISSING = object()


def lookup(config: Mapping, dotted: str) -> Any:
    """``config["a"]["b"][0]`` for ``"a.b.0"``; ``_MISSING`` where the path does not exist."""
    node: Any = config
    for part in dotted.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _same(value: Any, expected: Any) -> bool:
    if isinstance(expected, bool) or isinstance(value, bool):
        return value is expected
    if isinstance(expected, float) and isinstance(value, (int, float)):
        return float(value) == expected
    return value == expected


def validate(tensors: Mapping[str, torch.Tensor], config: Mapping, arch: DraftArch, layout: str,
             dtype: torch.dtype, where: str) -> None:
    """Raise ``ContractError`` (naming ``where`` and the key) unless ``tensors`` and ``config`` are exactly a
    ``layout`` checkpoint of ``arch`` with weights in ``dtype``."""
    expected = expected_tensors(arch, layout, dtype)
    names = {SGLANG: "SGLang EAGLE-3", SPECULATORS: "speculators Eagle3"}[layout]
    for key in sorted(set(expected) - set(tensors)):
        spec = expected[key]
        raise ContractError(f"{where}: tensor {key!r} is missing (the {names} contract needs shape "
                            f"{list(spec.shape)}, {DTYPE_NAMES.get(spec.dtype, spec.dtype)})")
    for key in sorted(set(tensors) - set(expected)):
        raise ContractError(f"{where}: unexpected tensor {key!r}: it is not in the {names} contract, and the "
                            "serving loader would skip it silently (leaving its parameter uninitialised)")
    for key, spec in expected.items():
        tensor = tensors[key]
        if tuple(tensor.shape) != spec.shape:
            raise ContractError(f"{where}: tensor {key!r} has shape {list(tensor.shape)}, the draft's "
                                f"architecture requires {list(spec.shape)}")
        if tensor.dtype != spec.dtype:
            raise ContractError(f"{where}: tensor {key!r} has dtype {tensor.dtype}, expected {spec.dtype}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ContractError(f"{where}: tensor {key!r} holds non-finite values (NaN/Inf, or overflow when "
                                f"cast to {spec.dtype})")
    if "d2t" in expected:
        _check_vocab_mapping(tensors["d2t"], tensors["t2d"], arch, where)
    for key, value in required_config(arch, layout, dtype).items():
        found = lookup(config, key)
        if found is _MISSING:
            raise ContractError(f"{where}: config.json lacks {key!r} (expected {value!r})")
        if not _same(found, value):
            raise ContractError(f"{where}: config.json has {key}={found!r}, expected {value!r}")
    if layout == SGLANG and arch.target_hidden_size == arch.hidden_size and "target_hidden_size" in config \
            and config["target_hidden_size"] != arch.hidden_size:
        raise ContractError(f"{where}: config.json has target_hidden_size={config['target_hidden_size']!r} but "
                            f"the draft reads features of width {arch.hidden_size}")


def _check_vocab_mapping(d2t: torch.Tensor, t2d: torch.Tensor, arch: DraftArch, where: str) -> None:
    """d2t holds offsets (draft id i -> target id i + d2t[i]); t2d marks exactly those target ids."""
    target_ids = d2t + torch.arange(d2t.numel(), dtype=d2t.dtype)
    if d2t.numel() and (int(target_ids.min()) < 0 or int(target_ids.max()) >= arch.vocab_size):
        raise ContractError(f"{where}: d2t maps draft ids outside the target vocabulary [0, {arch.vocab_size}) "
                            "(d2t must hold offsets target_id - draft_id)")
    if torch.unique(target_ids).numel() != target_ids.numel():
        raise ContractError(f"{where}: d2t maps two draft ids to the same target id")
    if int(t2d.sum()) != arch.draft_vocab_size or not bool(t2d[target_ids].all()):
        raise ContractError(f"{where}: t2d does not mark exactly the {arch.draft_vocab_size} target ids that d2t "
                            "maps to")
