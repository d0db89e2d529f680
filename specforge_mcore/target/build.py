"""Build this rank's piece of the frozen target: a Megatron-Core ``GPTModel`` from an HF ``config.json``.

The layout (TP, PP, EP, expert-TP, SP) is checked against the model's sizes first, with errors that name
the value and what would divide; then Megatron's process groups are created and the model for this
pipeline stage is built with the local layer spec (or Transformer Engine's when it is installed).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch

from specforge_mcore.errors import UserError
from specforge_mcore.fileio import read_json
from specforge_mcore.platform import apply_platform_shims, has_transformer_engine
from specforge_mcore.rope import RopeTable
from specforge_mcore.target.families import Family, family_for
from specforge_mcore.target.sharding import pipeline_split


@dataclass(frozen=True)
class Layout:
    """Model-parallel layout of the target. Data parallelism is whatever the world has left."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: Optional[int] = None  # expert tensor parallel; None = same as tp
    sp: bool = False
    dispatcher: str = "alltoall"  # Megatron's MoE token dispatcher under EP: alltoall | allgather

    @property
    def expert_tp(self) -> int:
        return self.etp if self.etp is not None else self.tp

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp

    def __str__(self) -> str:
        parts = [f"TP{self.tp}"] + (["SP"] if self.sp else [])
        parts += [f"EP{self.ep}" + ("(allgather)" if self.dispatcher == "allgather" else "")] if self.ep > 1 else []
        parts += [f"ETP{self.etp}"] if self.etp is not None and self.etp != self.tp else []
        parts += [f"PP{self.pp}"] if self.pp > 1 else []
        return "×".join(parts)


REQUIRED_HF_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def read_hf_config(hf_dir: str) -> dict:
    hf = read_json(os.path.join(hf_dir, "config.json"),
                   f"{hf_dir}: no config.json (expected a Hugging Face model directory)")
    # Multimodal or nested configs keep the language model under text_config.
    if "text_config" in hf and "num_hidden_layers" not in hf:
        outer = hf
        hf = dict(hf["text_config"], architectures=hf.get("architectures"))
        if outer.get("quantization_config") and "quantization_config" not in hf:
            hf["quantization_config"] = outer["quantization_config"]  # it describes the tensors of the whole file
    if not isinstance(hf, dict):
        raise UserError(f"{hf_dir}/config.json: expected a JSON object, got {type(hf).__name__}")
    missing = [key for key in REQUIRED_HF_FIELDS if key not in hf]
    if missing:
        raise UserError(f"{hf_dir}/config.json: missing {', '.join(missing)} (every decoder config has "
                        f"{', '.join(REQUIRED_HF_FIELDS)}; is this the model's own config.json?)")
    wrong = [f"{key}={hf[key]!r}" for key in REQUIRED_HF_FIELDS if not isinstance(hf[key], int) or hf[key] <= 0]
    if wrong:
        raise UserError(f"{hf_dir}/config.json: {', '.join(wrong)}: expected positive integers")
    return hf


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_layout(hf: dict, family: Family, layout: Layout, world_size: int, where: str) -> None:
    """Raise a UserError naming the first size that the layout does not divide (or what the config asks
    for that the family cannot build)."""
    family.check(hf, where)
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    for name, value in (("tp", layout.tp), ("pp", layout.pp), ("ep", layout.ep), ("etp", layout.expert_tp)):
        if value < 1:
            raise UserError(f"layout {name}={value}: must be >= 1")
    if layout.dispatcher not in ("alltoall", "allgather"):
        raise UserError(f"layout dispatcher={layout.dispatcher!r}: expected 'alltoall' or 'allgather'")
    if layout.sp and layout.tp == 1:
        raise UserError("sequence parallelism (sp) needs tp > 1")
    if heads % layout.tp:
        raise UserError(f"{where}: num_attention_heads={heads} is not divisible by tp={layout.tp} "
                        f"(tp must divide it: {_divisors(heads)})")
    if kv_heads % layout.tp:
        raise UserError(f"{where}: num_key_value_heads={kv_heads} is not divisible by tp={layout.tp} "
                        f"(tp must divide it: {_divisors(kv_heads)})")
    if hf["intermediate_size"] % layout.tp:
        raise UserError(f"{where}: intermediate_size={hf['intermediate_size']} is not divisible by tp={layout.tp}")
    if family.is_moe:
        cfg = family.transformer_config(hf)
        experts = cfg["num_moe_experts"]
        if experts % layout.ep:
            raise UserError(f"{where}: {experts} experts are not divisible by ep={layout.ep} "
                            f"(ep must divide it: {_divisors(experts)})")
        if cfg["moe_ffn_hidden_size"] % layout.expert_tp:
            raise UserError(f"{where}: moe_intermediate_size={cfg['moe_ffn_hidden_size']} is not divisible by "
                            f"expert tp={layout.expert_tp}")
    elif layout.ep > 1 or layout.etp not in (None, layout.tp):
        raise UserError(f"layout {layout}: ep/etp only apply to MoE targets; {where} is a dense "
                        f"{family.name} model")
    family.check_layout(hf, layout, where)
    pipeline_split(hf["num_hidden_layers"], layout.pp, where)
    mp = layout.tp * layout.pp
    if world_size % mp:
        raise UserError(f"layout {layout}: world size {world_size} is not divisible by tp*pp={mp}")
    data_parallel = world_size // mp
    expert_grid = layout.ep * layout.expert_tp
    if (world_size // layout.pp) % expert_grid:
        raise UserError(f"layout {layout}: ep*etp={expert_grid} must divide world_size/pp="
                        f"{world_size // layout.pp} (data-parallel size is {data_parallel})")


def init_model_parallel(layout: Layout, seed: int = 1234) -> None:
    """Megatron's process groups for the layout (the default group must exist)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    apply_platform_shims()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
        create_gloo_process_groups=False,
    )
    # inference_rng_tracker: the CUDA RNG tracker would fork CUDA generators; the frozen target uses
    # no randomness, so the plain tracker is exact on every device.
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)


def transformer_config(hf: dict, family: Family, layout: Layout, dtype: torch.dtype, use_te: Optional[bool] = None,
                       cpu_init: bool = False):
    """Megatron's config for the model. ``use_te`` defaults to "when installed"; ``cpu_init`` builds the
    parameters in host memory even when CUDA is there (native FP8 replaces most of them before they move)."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    kwargs = family.transformer_config(hf)
    config_class = MLATransformerConfig if kwargs.get("multi_latent_attention") else TransformerConfig
    split = pipeline_split(hf["num_hidden_layers"], layout.pp)
    if layout.pp > 1 and len(set(split)) > 1:
        kwargs.update(num_layers_in_first_pipeline_stage=split[0], num_layers_in_last_pipeline_stage=split[-1])
    use_te = has_transformer_engine() if use_te is None else use_te
    kwargs.update(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
        sequence_parallel=layout.sp and layout.tp > 1,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        # Weights come from the checkpoint: skip random init (and its CPU-side master copies).
        perform_initialization=False,
        use_cpu_initialization=cpu_init or not torch.cuda.is_available(),
        # batch_p2p_comm would call torch.cuda.synchronize around every exchange; the plain
        # isend/irecv path is equally exact on gloo and NCCL.
        batch_p2p_comm=False,
        variable_seq_lengths=False,
    )
    if family.is_moe:
        kwargs.update(moe_token_dispatcher_type=layout.dispatcher, moe_grouped_gemm=use_te,
                      moe_permute_fusion=False)
    return config_class(**kwargs)


class FrozenRMSNorm(torch.nn.Module):
    """RMSNorm for the local (non-TE) spec, computed like the HF reference (fp32 statistics).

    Megatron's WrappedTorchNorm refuses sequence parallelism because, when training, SP norm weights
    need their gradients all-reduced over TP; the frozen target has no gradients, so the plain norm
    is exact under SP too.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _replace_module(spec, old, new):
    """Swap every use of module class ``old`` in a (nested) Megatron layer spec for ``new``."""
    import dataclasses

    from megatron.core.transformer.spec_utils import ModuleSpec

    if spec is old:
        return new
    if isinstance(spec, ModuleSpec):
        spec.module = _replace_module(spec.module, old, new)
        spec.submodules = _replace_module(spec.submodules, old, new)
        return spec
    if isinstance(spec, (list, tuple)):
        return type(spec)(_replace_module(item, old, new) for item in spec)
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        for f in dataclasses.fields(spec):
            setattr(spec, f.name, _replace_module(getattr(spec, f.name), old, new))
    return spec


@functools.lru_cache(maxsize=None)
def target_dot_product_attention() -> type:
    """The class below, made on first use (this module imports Megatron lazily)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class TargetDotProductAttention(DotProductAttention):
        """Megatron's local attention plus what the MLA and sliding-window targets need:

        * MLA builds its core attention with ``k_channels`` / ``v_channels`` (as TE's attention takes them);
          the local one has no such arguments. Keys may be wider than values; the output width per head is
          ``config.kv_channels``, which the MLA family sets to the value head.
        * On a sliding-window layer the local softmax replaces the given mask with a plain sliding-window
          mask, which would let packed documents see each other; here the window is added to the host's
          document mask instead.
        """

        def __init__(self, *args, k_channels: Optional[int] = None, v_channels: Optional[int] = None, **kwargs):
            super().__init__(*args, **kwargs)
            if v_channels is not None and v_channels != self.config.kv_channels:
                raise ValueError(f"value head {v_channels} != kv_channels {self.config.kv_channels}")
            self.window = self.scale_mask_softmax.window_size
            self.scale_mask_softmax.window_size = None

        def forward(self, query, key, value, attention_mask, *args, **kwargs):
            if self.window is not None:
                sq, sk = query.shape[0], key.shape[0]
                q = torch.arange(sk - sq, sk, device=query.device)[:, None]
                k = torch.arange(sk, device=query.device)[None, :]
                outside = (k < q - self.window[0]) | (k > q + self.window[1])
                attention_mask = outside if attention_mask is None else attention_mask | outside
            return super().forward(query, key, value, attention_mask, *args, **kwargs)

    return TargetDotProductAttention


class PositionRotary(torch.nn.Module):
    """RoPE for Megatron's MLA from explicit position ids.

    MLA refuses a ``rotary_pos_emb`` argument and computes angles for positions 0..s-1 itself, from its
    ``rotary_pos_emb`` module; packed documents restart at position 0. This module stands in for that
    one in every MLA layer of the stage: the host sets the micro-batch's positions, and each layer gets
    the angles [s, b, 1, d] (and, for YaRN, the cos/sin factor, as Megatron's YaRN module returns it).
    """

    def __init__(self, table: RopeTable, yarn: bool):
        super().__init__()
        self.table = table
        self.yarn = yarn
        self.freqs: Optional[torch.Tensor] = None

    def set_positions(self, position_ids: torch.Tensor) -> None:
        self.freqs = self.table.freqs(position_ids)

    def get_rotary_seq_len(self, *args, **kwargs) -> int:
        return self.freqs.shape[0]

    def forward(self, *args, **kwargs):
        if self.freqs is None:
            raise RuntimeError("PositionRotary.set_positions was not called before the forward")
        return (self.freqs, self.table.attention_factor) if self.yarn else self.freqs


@dataclass
class StageModel:
    """This rank's part of the target and where it sits."""

    model: torch.nn.Module  # a megatron GPTModel for this pipeline stage
    hf: dict
    family: Family
    layout: Layout
    layer_ids: list[int]  # global 0-based ids of the decoder layers on this stage
    padded_vocab_size: int
    vocab_size: int
    # MLA targets: where the host puts each micro-batch's positions (see PositionRotary)
    position_rotary: Optional["PositionRotary"] = None
    use_te: bool = False  # built from Transformer Engine's spec (its layers shard a few tensors differently)

    @property
    def pre_process(self) -> bool:
        return self.model.pre_process

    @property
    def post_process(self) -> bool:
        return self.model.post_process


def build_stage_model(hf: dict, layout: Layout, dtype: torch.dtype = torch.float32,
                      where: str = "config.json", native_fp8: bool = False) -> StageModel:
    """Build the (empty, frozen) GPTModel piece this rank owns. Megatron's groups must be initialised.

    ``native_fp8``: the weights will be loaded in FP8 (``target/fp8/``), whose GEMMs replace those of
    Megatron's local linear layers: the local spec is used even with Transformer Engine installed, and the
    model stays in host memory until ``StageModel.to_device`` (after loading)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    family = family_for(hf, where)
    family.check(hf, where)
    use_te = has_transformer_engine() and not native_fp8
    config = transformer_config(hf, family, layout, dtype, use_te=use_te, cpu_init=native_fp8)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization="RMSNorm")
    if not use_te:
        from megatron.core.transformer.dot_product_attention import DotProductAttention
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        spec = _replace_module(spec, WrappedTorchNorm, FrozenRMSNorm)
        if config.multi_latent_attention or config.window_size is not None:
            spec = _replace_module(spec, DotProductAttention, target_dot_product_attention())
    vocab = int(hf["vocab_size"])
    padded_vocab = -(-vocab // layout.tp) * layout.tp  # VocabParallelEmbedding needs tp | vocab
    kwargs = family.gpt_model_kwargs(hf)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab,
        max_sequence_length=kwargs.pop("max_sequence_length"),
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        **kwargs,
    )
    model.requires_grad_(False)
    model.eval()
    if torch.cuda.is_available() and not native_fp8:
        model.cuda()
    layer_ids = [layer.layer_number - 1 for layer in model.decoder.layers]
    position_rotary = None
    if config.multi_latent_attention:
        position_rotary = PositionRotary(RopeTable(hf, config.qk_pos_emb_head_dim), config.rope_type == "yarn")
        for layer in model.decoder.layers:
            layer.self_attention.rotary_pos_emb = position_rotary
    return StageModel(model, hf, family, layout, layer_ids, padded_vocab, vocab, position_rotary, use_te)
