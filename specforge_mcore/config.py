"""The one config system: typed dataclasses, filled from a YAML file, overridable as ``a.b=value``.

Every field is checked against its declared type; an unknown key or a value of the wrong type is a
``ConfigError`` naming the file, the dotted key and what was expected.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

from specforge_mcore.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the schema."""


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


@dataclass
class RandomTargetConfig:
    """A target generated on the fly (random weights, no download) from an HF-style config dict."""

    family: Literal["llama", "qwen3", "qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"] = "qwen3_moe"
    hf_config: dict = field(default_factory=dict)  # overrides of the family's small defaults
    seed: int = 1234


@dataclass
class TargetConfig:
    # Either an HF directory (config.json + *.safetensors + tokenizer) or a generated random target.
    hf_dir: Optional[str] = None
    random: Optional[RandomTargetConfig] = None
    tokenizer_dir: Optional[str] = None  # defaults to hf_dir
    # Model-parallel layout of the frozen target.
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: Optional[int] = None  # expert tensor parallel (MoE only); unset = the same as tp, as in Megatron
    sp: bool = False
    # Output-of-layer ids (0-based) whose hidden states feed the draft; None = [1, L//2-1, L-4].
    capture_layer_ids: Optional[list[int]] = None
    micro_batch_size: int = 1  # sequences per target micro-batch in the pipeline schedule
    # The target's weights and activations (the dtype policy: specforge_mcore/precision.py).
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    moe_token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    # Block-FP8 checkpoints (quantization_config quant_method "fp8" with weight_block_size, as the official
    # Qwen3-*-FP8 and DeepSeek-V3 releases): "dequantize" expands the weights to `dtype` at load (any
    # device, any layout); "native" keeps the decoder's linear weights in FP8 with their block scales (half
    # the memory of bf16; layouts must not cut a block) and runs FP8 GEMMs on GPUs that have them (others
    # dequantize each weight for its GEMM); "auto": native on CUDA, dequantize on CPU. Ignored otherwise.
    fp8: Literal["auto", "dequantize", "native"] = "auto"
    # On-the-fly FP8 for a full-precision target: "fp8" quantizes the loaded linear weights to FP8 with
    # 128x128 block scales through NVIDIA ModelOpt (pip install nvidia-modelopt) and keeps them compressed.
    quantize: Literal["none", "fp8"] = "none"


@dataclass
class DraftConfig:
    # Sizes default to the target's (hidden, heads, kv heads, head dim, intermediate).
    hidden_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    draft_vocab_size: int = 32000
    rms_norm_eps: Optional[float] = None
    # The draft's compute dtype; master weights and AdamW state are always fp32. auto: bf16 on CUDA, fp32 on
    # CPU (specforge_mcore/precision.py).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    ttt_steps: int = 7
    ttt_decay: float = 0.8
    # The per-position loss against the target: soft_ce (EAGLE-3's soft cross-entropy), forward_kl (the same
    # gradient, reads 0 at the optimum), lk_alpha (-log of the acceptance probability sum_v min(p_v, q_v), an
    # LK loss: optimizes acceptance itself). See kernels/ttt_loss.py and docs/design.md §10.
    objective: Literal["soft_ce", "forward_kl", "lk_alpha"] = "soft_ce"
    # EAGLE-3.1: an RMSNorm on each captured layer before fc.
    per_layer_norm: bool = False
    attention_backend: Literal["auto", "reference", "flex", "csrc"] = "auto"
    # Fine-tune from an existing checkpoint of ours (its vocab mapping is kept).
    init_from: Optional[str] = None


@dataclass
class DataConfig:
    # Conversation files (JSON / JSONL, ShareGPT or OpenAI-messages shape) or packaged sources
    # (data/sources.py CONVERSATION_SOURCES: "sharegpt", "sharegpt:heldout", "gsm8k:train").
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    # When eval_files is empty, this fraction of the training conversations is held out.
    eval_fraction: float = 0.02
    max_samples: Optional[int] = None
    max_length: int = 2048
    pack: bool = True
    loss_on: Literal["all_assistant_turns", "last_assistant_turn"] = "all_assistant_turns"
    on_bad_sample: Literal["skip", "error"] = "skip"
    cache_dir: Optional[str] = None  # default: <out>/../.cache/data or $SPECFORGE_MCORE_CACHE
    vocab_file: Optional[str] = None  # a saved draft vocab (d2t/t2d); built when absent
    # An offline feature store (specforge_mcore/features/store.py). Complete: the training rows' features are
    # read from it instead of running the target (held-out evaluation still runs the target). Absent or
    # unfinished with train.cache_features: the first epoch runs online and writes it.
    features: Optional[str] = None
    features_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    num_workers: int = 0
    seed: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 50
    clip_grad: float = 0.5
    grad_accum: int = 1


@dataclass
class KernelConfig:
    projection: Literal["auto", "reference", "chunked", "triton"] = "auto"
    loss: Literal["auto", "reference", "chunked", "triton"] = "auto"
    teacher: Literal["auto", "reference", "chunked", "triton"] = "auto"
    loss_chunk_tokens: int = 1024
    teacher_chunk_tokens: int = 1024


@dataclass
class TrainConfig:
    out_dir: Optional[str] = None
    seed: int = 0
    # Sequences per optimizer step over the whole world (before grad accumulation is split).
    global_batch_size: int = 8
    epochs: float = 1.0
    max_steps: Optional[int] = None
    # Stop this invocation (after a checkpoint) once this step is reached, leaving the schedule as
    # max_steps/epochs define it: for time-limited allocations that requeue with --resume.
    exit_after_step: Optional[int] = None
    log_every: int = 1
    eval_every: int = 0
    eval_batches: int = 8
    # Real speculative decoding at every evaluation on the first N held-out prompts (rank 0, an fp32 HF copy
    # of the target on the CPU: small targets; train/spec_eval.py); 0: off.
    eval_spec_prompts: int = 0
    eval_spec_max_new_tokens: int = 64
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    # Starting afresh where checkpoints exist is refused unless overwrite (then they are deleted).
    overwrite: bool = False
    # Write the first epoch's features to data.features while training on them; later epochs read them.
    cache_features: bool = False
    max_nonfinite_steps: int = 5
    tensorboard: bool = False
    plot: bool = True
    profile: bool = False
    profile_steps: str = "2:4"


@dataclass
class PlanConfig:
    """The hardware a recipe was planned for; read by ``specforge-mcore plan``, ignored by training."""

    hf_config: Optional[str] = None  # a config.json to plan from while target.hf_dir is not on this machine
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory: str = "80GiB"


@dataclass
class RunConfig:
    name: str = "run"
    target: TargetConfig = field(default_factory=TargetConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (recursing into dataclasses and lists)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = args or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "2e-3" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _build(cls: type, values: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]} (known keys of {cls.__name__}: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for key, value in values.items():
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. train.max_steps=10)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key.strip().split("."), value


def _set_dotted(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Read a YAML run config, apply ``key=value`` overrides, and check every field's type."""
    tree: dict = {}
    source = "<defaults>"
    if path is not None:
        source = path
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} does not exist")
        with open(path, encoding="utf-8") as fh:
            try:
                tree = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(tree).__name__}")
    for text in overrides or []:
        key_path, value = _parse_override(text)
        _set_dotted(tree, key_path, value)
    try:
        return _build(RunConfig, tree, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(tree: dict, source: str = "<dict>") -> RunConfig:
    try:
        return _build(RunConfig, tree, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def save_config(cfg: RunConfig, path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False)
