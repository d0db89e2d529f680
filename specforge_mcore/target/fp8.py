"""Block-scaled FP8 targets: the layout of the official ``*-FP8`` releases (Qwen3, DeepSeek-V3).

Such a checkpoint says ``quantization_config: {quant_method: "fp8", fmt: "e4m3", weight_block_size:
[128, 128], activation_scheme: "dynamic"}``; every quantized linear ``X.weight`` is stored as
``float8_e4m3fn`` next to ``X.weight_scale_inv`` of shape ``[ceil(rows/128), ceil(cols/128)]``, and the real
weight is ``X.weight * weight_scale_inv`` blockwise (a partial block at the end of a dimension has its
own scale). Embeddings, norms, routers and the LM head stay in bf16.

Two ways to host one (``target.fp8``):

* ``dequantize``: ``SafetensorsReader.read`` returns the dequantised values of whatever slice a loading
  rule asks for. Each element is multiplied by the scale of the block it came from, so any TP/EP/PP
  slicing is exact, even one that cuts a block.
* ``native``: each rank keeps its linear weights in FP8 with their block scales (half the bytes of
  bf16) and runs the GEMMs in FP8 on GPUs that can (``F.scaled_mm``, 1x128 activation blocks quantised on
  the fly, 128x128 weight blocks); elsewhere a GEMM dequantises its weight first. A rank's FP8 tensor
  must be made of whole blocks, so a layout whose shard boundaries cut a block is refused, naming the
  tensor and the layouts that keep whole blocks (``check_native_layout``). The loading rules of
  ``target/load.py`` slice the FP8 payload and, separately, a map of block ids; the scales are then
  taken per tile of the rank's tensor from that map, so they follow the weights through every rule
  (qkv interleaving, [gate; up] stacking, expert and TP slices) by construction.

``write_fp8_checkpoint`` writes such a checkpoint from a full-precision one (tests, benchmarks).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from specforge_mcore.errors import UserError

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = 448.0
SCALE_SUFFIX = "_scale_inv"
MODES = ("auto", "dequantize", "native")
# A block id packs (tensor number, block row, block column) into one int64.
_KEY_SHIFT = 40


@dataclass(frozen=True)
class BlockFp8:
    """The quantization of a block-FP8 checkpoint."""

    block: tuple[int, int]  # (rows, cols) covered by one scale
    activation_scheme: str = "dynamic"

    def __str__(self) -> str:
        return f"FP8 e4m3 with {self.block[0]}x{self.block[1]} block scales"


def scale_key(key: str) -> str:
    return key + SCALE_SUFFIX


def checkpoint_format(hf: dict, where: str = "config.json") -> Optional[BlockFp8]:
    """The block-FP8 format ``hf`` declares, None for a full-precision checkpoint; any other quantization
    is a UserError (its weights would be read without the scales that give them meaning)."""
    q = hf.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    dequantize_first = "dequantize the checkpoint to bf16 first (or use its full-precision release)"
    if method != "fp8":
        raise UserError(f"{where}: quantization_config quant_method={method!r} is not supported: the target host "
                        "reads block-scaled FP8 (quant_method 'fp8' with weight_block_size, the format of the official "
                        f"Qwen3-*-FP8 and DeepSeek-V3 releases); {dequantize_first}")
    if q.get("fmt", "e4m3") != "e4m3":
        raise UserError(f"{where}: quantization_config fmt={q['fmt']!r} is not supported (expected 'e4m3', "
                        f"torch.float8_e4m3fn); {dequantize_first}")
    block = q.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise UserError(f"{where}: quantization_config (quant_method='fp8') has weight_block_size={block!r}; "
                        "expected two positive integers such as [128, 128] (per-tensor FP8 without blocks is not "
                        "supported); " + dequantize_first)
    return BlockFp8((int(block[0]), int(block[1])), str(q.get("activation_scheme", "dynamic")))


def read_checkpoint_format(hf_dir: str) -> Optional[BlockFp8]:
    """``checkpoint_format`` of the ``config.json`` in ``hf_dir`` (None when there is none)."""
    from specforge_mcore.target.build import read_hf_config

    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        return None
    return checkpoint_format(read_hf_config(hf_dir), os.path.join(hf_dir, "config.json"))


def resolve_mode(requested: str, fmt: Optional[BlockFp8], device: torch.device, where: str) -> Optional[str]:
    """``target.fp8`` for this checkpoint and device: "dequantize", "native", or None (not an FP8 checkpoint)."""
    if requested not in MODES:
        raise UserError(f"target.fp8={requested!r}: expected one of {', '.join(MODES)}")
    if fmt is None:
        if requested == "native":
            raise UserError(f"target.fp8=native: {where} is not an FP8 checkpoint (no quantization_config); "
                            "to quantize a full-precision target on the fly set target.quantize=fp8")
        return None
    if requested == "auto":
        # On a GPU the point of an FP8 release is its memory; on CPU plain weights keep every GEMM simple.
        return "native" if device.type == "cuda" else "dequantize"
    return requested


# ----------------------------------------------------------------------------------------------
# Block math
# ----------------------------------------------------------------------------------------------


def quantize_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, fp32 scale_inv [ceil(R/br), ceil(C/bc)]): each block scaled so its largest magnitude is
    E4M3_MAX, as the official releases do (an all-zero block gets scale 1)."""
    rows, cols = weight.shape
    br, bc = block
    nr, nc = -(-rows // br), -(-cols // bc)
    padded = torch.zeros(nr * br, nc * bc, dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    tiles = padded.view(nr, br, nc, bc)
    amax = tiles.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (tiles / scale_inv[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return q.view(nr * br, nc * bc)[:rows, :cols].contiguous(), scale_inv


def expand_scales(scale_inv: torch.Tensor, block: tuple[int, int], rows: tuple[int, int],
                  cols: tuple[int, int]) -> torch.Tensor:
    """Per-element scales [r1-r0, c1-c0] for rows [r0, r1) / columns [c0, c1) of the weight, from the scale
    rows/columns that cover them (``scale_inv`` holds blocks r0//br.. and c0//bc.. onwards)."""
    br, bc = block
    (r0, r1), (c0, c1) = rows, cols
    full = scale_inv.float().repeat_interleave(br, dim=0).repeat_interleave(bc, dim=1)
    return full[r0 % br: r0 % br + (r1 - r0), c0 % bc: c0 % bc + (c1 - c0)]


def dequantize_blocks(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The fp32 weight of a whole FP8 tensor and its scales."""
    rows, cols = q.shape
    return q.float() * expand_scales(scale_inv, block, (0, rows), (0, cols))


def _scale_rows(start: int, end: int, size: int) -> tuple[int, int]:
    return start // size, -(-end // size)


# ----------------------------------------------------------------------------------------------
# Reading slices (SafetensorsReader.read calls this for every tensor that has a weight_scale_inv)
# ----------------------------------------------------------------------------------------------


class BlockReads:
    """How the reader serves scaled tensors, and what it served.

    mode ``dequantize``: fp32 values; ``raw``: the FP8 payload; ``blocks``: int64 block ids (the same shape
    as the payload), from which ``tile_scales`` rebuilds the scales of whatever the rules assembled.
    """

    def __init__(self, fmt: BlockFp8):
        self.fmt = fmt
        self.mode = "dequantize"
        self.scaled_keys: list[str] = []
        self.plain_keys: list[str] = []
        self.key_numbers: dict[str, int] = {}

    def record(self, key: str, scaled: bool) -> None:
        if self.mode != "dequantize":  # only a native load asks what a parameter was built from
            (self.scaled_keys if scaled else self.plain_keys).append(key)

    def number(self, key: str) -> int:
        return self.key_numbers.setdefault(key, len(self.key_numbers))

    def key_of(self, number: int) -> str:
        return next(k for k, n in self.key_numbers.items() if n == number)


def read_scaled(reader, key: str, rows: Optional[tuple[int, int]], cols: Optional[tuple[int, int]]) -> torch.Tensor:
    """Rows [a, b) / columns [c, d) of the scaled tensor ``key`` as ``reader.block_reads.mode`` asks."""
    reads: BlockReads = reader.block_reads
    reads.record(key, scaled=True)
    shape = reader.shape(key)
    if len(shape) != 2:
        raise UserError(f"{reader.hf_dir}: {key} has a block scale but shape {shape}; block-FP8 scales apply to "
                        "matrices only")
    br, bc = reads.fmt.block
    r0, r1 = rows if rows is not None else (0, shape[0])
    c0, c1 = cols if cols is not None else (0, shape[1])
    skey = scale_key(key)
    expected = [-(-shape[0] // br), -(-shape[1] // bc)]
    if reader.shape(skey) != expected:
        raise UserError(f"{reader.hf_dir}: {skey} has shape {reader.shape(skey)}, but {key} {shape} in {br}x{bc} "
                        f"blocks (weight_block_size in config.json) needs {expected}")
    sr, sc = _scale_rows(r0, r1, br), _scale_rows(c0, c1, bc)
    if reads.mode == "blocks":
        block_rows = torch.arange(sr[0], sr[1]).repeat_interleave(br)[r0 % br: r0 % br + r1 - r0]
        block_cols = torch.arange(sc[0], sc[1]).repeat_interleave(bc)[c0 % bc: c0 % bc + c1 - c0]
        local = block_rows[:, None] * expected[1] + block_cols[None, :]
        return local + (reads.number(key) << _KEY_SHIFT)
    q = reader.read_raw(key, rows=(r0, r1), cols=(c0, c1))
    if q.dtype != FP8_DTYPE:
        raise UserError(f"{reader.hf_dir}: {key} has a block scale but dtype {q.dtype} (expected float8_e4m3fn)")
    if reads.mode == "raw":
        return q
    scale = reader.read_raw(skey, rows=sr, cols=sc)
    return q.float() * expand_scales(scale, reads.fmt.block, (r0, r1), (c0, c1))


@contextlib.contextmanager
def reading(reader, mode: str) -> Iterator[BlockReads]:
    """Serve scaled tensors in ``mode`` and record which keys were read, for the duration of the block."""
    reads: BlockReads = reader.block_reads
    reads.mode, reads.scaled_keys, reads.plain_keys = mode, [], []
    try:
        yield reads
    finally:
        reads.mode = "dequantize"


def tile_scales(reader, ids: torch.Tensor, name: str, where: str) -> torch.Tensor:
    """The [ceil(R/br), ceil(C/bc)] scales of a rank's FP8 tensor whose elements came from the blocks ``ids``.
    Every tile must come from one checkpoint block (else this layout cut a block: a UserError)."""
    reads: BlockReads = reader.block_reads
    br, bc = reads.fmt.block
    rows, cols = ids.shape
    corner = ids[::br, ::bc]
    if not torch.equal(corner.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols], ids):
        raise UserError(f"{where}: target.fp8=native: on this rank {name} (from {sorted(set(reads.scaled_keys))[:2]}) "
                        f"would put parts of different {br}x{bc} FP8 blocks into one tile; this layout cuts the "
                        "checkpoint's blocks. Set target.fp8=dequantize, or a layout whose shards are whole blocks")
    scales = torch.empty(corner.shape, dtype=torch.float32)
    numbers = corner >> _KEY_SHIFT
    for number in numbers.unique().tolist():
        key = reads.key_of(number)
        table = reader.read_raw(scale_key(key)).float()
        local = corner[numbers == number] & ((1 << _KEY_SHIFT) - 1)
        scales[numbers == number] = table.flatten()[local]
    return scales


# ----------------------------------------------------------------------------------------------
# Which layouts keep whole blocks (native mode), and what the weights weigh (the planner)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearShard:
    """One rank's piece of the HF linear weights of one kind, in one decoder layer."""

    what: str  # the HF projection, e.g. "self_attn.q_proj" (several pieces for qkv: one per query group)
    rows: int
    cols: int
    count: int  # such pieces on the rank, per layer
    rows_must_align: bool  # its rows are cut between ranks, or stacked onto other pieces in one tensor
    cols_must_align: bool  # its columns are cut between ranks
    size_name: str = ""  # the config value the cut dimension comes from (for messages)


def linear_shards(tc: dict, layout, moe_layer: bool, latent_down_split: bool = True) -> list[LinearShard]:
    """The quantized linear pieces a rank holds in one decoder layer (Megatron config ``tc``), following the
    loading rules of ``target/load.py``."""
    tp, ep, etp = layout.tp, layout.ep, layout.expert_tp
    H, heads = tc["hidden_size"], tc["num_attention_heads"]
    out: list[LinearShard] = []
    if tc.get("multi_latent_attention"):
        qk, rope, v = tc["qk_head_dim"], tc["qk_pos_emb_head_dim"], tc["v_head_dim"]
        q_lora, kv_lora = tc.get("q_lora_rank"), tc["kv_lora_rank"]
        split = latent_down_split and tp > 1
        if q_lora:
            out.append(LinearShard("self_attn.q_a_proj", q_lora // tp if split else q_lora, H, 1, split, False, "q_lora_rank"))
            out.append(LinearShard("self_attn.q_b_proj", heads // tp * (qk + rope), q_lora, 1, tp > 1, False,
                                   "num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim)"))
        else:
            out.append(LinearShard("self_attn.q_proj", heads // tp * (qk + rope), H, 1, tp > 1, False,
                                   "num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim)"))
        latent = kv_lora + rope
        out.append(LinearShard("self_attn.kv_a_proj_with_mqa", latent // tp if split else latent, H, 1, split, False,
                               "kv_lora_rank + qk_rope_head_dim"))
        out.append(LinearShard("self_attn.kv_b_proj", heads // tp * (qk + v), kv_lora, 1, tp > 1, False,
                               "num_attention_heads * (qk_nope_head_dim + v_head_dim)"))
        out.append(LinearShard("self_attn.o_proj", H, heads // tp * v, 1, False, tp > 1, "num_attention_heads * v_head_dim"))
    else:
        kv, groups = tc["kv_channels"], tc["num_query_groups"]
        local_groups = groups // tp
        # Megatron interleaves [q_g | k_g | v_g] per query group: every piece is stacked onto the next.
        out.append(LinearShard("self_attn.q_proj", heads // groups * kv, H, local_groups, True, False,
                               "head_dim * num_attention_heads / num_key_value_heads"))
        out.append(LinearShard("self_attn.k_proj", kv, H, local_groups, True, False, "head_dim"))
        out.append(LinearShard("self_attn.v_proj", kv, H, local_groups, True, False, "head_dim"))
        out.append(LinearShard("self_attn.o_proj", H, heads * kv // tp, 1, False, tp > 1, "num_attention_heads * head_dim"))
    if moe_layer:
        mf, experts = tc["moe_ffn_hidden_size"], tc["num_moe_experts"] // ep
        out.append(LinearShard("mlp.experts.*.gate_proj", mf // etp, H, experts, True, False, "moe_intermediate_size"))
        out.append(LinearShard("mlp.experts.*.up_proj", mf // etp, H, experts, True, False, "moe_intermediate_size"))
        out.append(LinearShard("mlp.experts.*.down_proj", H, mf // etp, experts, False, etp > 1, "moe_intermediate_size"))
        shared = tc.get("moe_shared_expert_intermediate_size")
        if shared:
            out.append(LinearShard("mlp.shared_experts.gate_proj", shared // tp, H, 1, True, False, "shared expert width"))
            out.append(LinearShard("mlp.shared_experts.up_proj", shared // tp, H, 1, True, False, "shared expert width"))
            out.append(LinearShard("mlp.shared_experts.down_proj", H, shared // tp, 1, False, tp > 1, "shared expert width"))
    else:
        ffn = tc["ffn_hidden_size"]
        out.append(LinearShard("mlp.gate_proj", ffn // tp, H, 1, True, False, "intermediate_size"))
        out.append(LinearShard("mlp.up_proj", ffn // tp, H, 1, True, False, "intermediate_size"))
        out.append(LinearShard("mlp.down_proj", H, ffn // tp, 1, False, tp > 1, "intermediate_size"))
    return out


def _moe_layers(tc: dict, family) -> list[bool]:
    freq = tc.get("moe_layer_freq")
    return [bool(freq[i]) if isinstance(freq, list) else family.is_moe for i in range(tc["num_layers"])]


def native_layout_problems(hf: dict, family, layout, block: tuple[int, int]) -> list[str]:
    """Why ``layout`` would cut FP8 blocks (empty when every rank's pieces are whole blocks)."""
    tc = family.transformer_config(hf)
    br, bc = block
    problems = []
    for moe in sorted(set(_moe_layers(tc, family))):
        for s in linear_shards(tc, layout, moe):
            if s.rows_must_align and s.rows % br:
                problems.append(f"{s.what} pieces of {s.rows} rows ({s.size_name} over this layout) are not a "
                                f"multiple of the {br}-row blocks")
            if s.cols_must_align and s.cols % bc:
                problems.append(f"{s.what} pieces of {s.cols} columns ({s.size_name} over this layout) are not a "
                                f"multiple of the {bc}-column blocks")
    return list(dict.fromkeys(problems))


def native_layouts_that_fit(hf: dict, family, layout, block: tuple[int, int]) -> list[str]:
    """Other tp / expert-tp values (same pp, ep) whose shards keep whole blocks, as ``tp=.. etp=..`` strings."""
    from dataclasses import replace

    tc = family.transformer_config(hf)
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    fits = []
    for tp in range(1, heads + 1):
        if heads % tp or kv_heads % tp or hf["intermediate_size"] % tp:
            continue
        etps = [None] if not family.is_moe else \
            [e for e in range(1, tp + 1) if tc["moe_ffn_hidden_size"] % e == 0]
        for etp in etps:
            candidate = replace(layout, tp=tp, etp=etp, sp=layout.sp and tp > 1)
            if not native_layout_problems(hf, family, candidate, block):
                fits.append(f"tp={tp}" + (f" etp={etp}" if etp is not None else ""))
    return fits


def check_native_layout(hf: dict, family, layout, fmt: BlockFp8, where: str) -> None:
    """A UserError naming the first tensor whose shards ``layout`` cuts through FP8 blocks, and the layouts
    that would keep them whole."""
    problems = native_layout_problems(hf, family, layout, fmt.block)
    if not problems:
        return
    fits = native_layouts_that_fit(hf, family, layout, fmt.block)
    hint = f"layouts that keep whole blocks (same pp/ep): {', '.join(fits[:8])}" if fits else \
        "no tp/etp keeps whole blocks for this model"
    raise UserError(f"{where}: target.fp8=native keeps the checkpoint's {fmt.block[0]}x{fmt.block[1]} FP8 blocks "
                    f"on each rank, but layout {layout} would cut them: {problems[0]}"
                    f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}; {hint}; or set "
                    "target.fp8=dequantize, which takes any layout (weights in target.dtype)")


def stage_linear_counts(hf: dict, family, layout, block: tuple[int, int]) -> list[tuple[int, int]]:
    """(quantized weight elements, scale blocks) on one rank of each pipeline stage."""
    from specforge_mcore.target.build import pipeline_split

    tc = family.transformer_config(hf)
    moe = _moe_layers(tc, family)
    br, bc = block
    out, first = [], 0
    for count in pipeline_split(tc["num_layers"], layout.pp):
        elements = blocks = 0
        for layer in range(first, first + count):
            for s in linear_shards(tc, layout, moe[layer]):
                elements += s.rows * s.cols * s.count
                # Megatron's tensor stacks the pieces; with whole blocks the scale count is the sum.
                blocks += -(-s.rows // br) * -(-s.cols // bc) * s.count
        first += count
        out.append((elements, blocks))
    return out


def planned_weight_bytes(target_cfg, hf: dict, family, layout, full_bytes: list[int], dtype_bytes: int,
                         device: str) -> tuple[str, list[int]]:
    """The planner's line for the target's weights: ``full_bytes`` (every parameter in target.dtype) unless the
    weights are held in FP8 (a native FP8 checkpoint, or target.quantize=fp8), then 1 byte per quantized
    element plus one fp32 scale per block."""
    fmt = checkpoint_format(hf)
    quantize = getattr(target_cfg, "quantize", "none") == "fp8"
    mode = resolve_mode(getattr(target_cfg, "fp8", "auto"), fmt, torch.device(device), "the target") if fmt else None
    if mode != "native" and not quantize:
        if mode == "dequantize":
            return f"target weights (FP8 checkpoint dequantized to {target_cfg.dtype})", full_bytes
        return f"target weights ({target_cfg.dtype} shard)", full_bytes
    block = fmt.block if fmt is not None else (128, 128)
    counts = stage_linear_counts(hf, family, layout, block)
    out = [full - elements * (dtype_bytes - 1) + blocks * 4 for full, (elements, blocks) in zip(full_bytes, counts)]
    how = "FP8 checkpoint kept in FP8" if mode == "native" else "quantized to FP8 by ModelOpt"
    return f"target weights ({how}: linears 1 B + {block[0]}x{block[1]} scales, rest {target_cfg.dtype})", out


# ----------------------------------------------------------------------------------------------
# Native mode: FP8 weights kept on the rank, FP8 GEMMs where the GPU has them
# ----------------------------------------------------------------------------------------------


def is_native_candidate(model: torch.nn.Module, name: str) -> bool:
    """Decoder-layer linear weights: the embedding and output layer are read whole by the draft and the
    teacher, and stay in target.dtype."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    if not name.startswith("decoder.") or not name.endswith(".weight"):
        return False
    return isinstance(model.get_submodule(name[: -len(".weight")]), (ColumnParallelLinear, RowParallelLinear))


def load_native(loader, name: str, where: str) -> bool:
    """Load Megatron parameter ``name`` as FP8 + block scales when its checkpoint tensors are FP8; return
    whether it did (False: they are not quantized, load it as usual)."""
    reader = loader.reader
    with reading(reader, "raw") as reads:
        payload = loader.tensor_for(name)
        scaled, plain = list(reads.scaled_keys), list(reads.plain_keys)
    if not scaled:
        return False
    if plain:
        raise UserError(f"{where}: {name} is built from FP8 tensors ({scaled[0]}) and unquantized ones ({plain[0]}); "
                        "target.fp8=native needs them all in FP8: set target.fp8=dequantize")
    with reading(reader, "blocks"):
        ids = loader.tensor_for(name)
        scales = tile_scales(reader, ids, name, where)
    module = loader.stage.model.get_submodule(name[: -len(".weight")])
    if tuple(payload.shape) != tuple(module.weight.shape):
        raise UserError(f"{where}: weights for {name} have shape {list(payload.shape)} on this rank, expected "
                        f"{list(module.weight.shape)} (checkpoint does not match config.json?)")
    keep_fp8(module, payload.contiguous(), scales, reader.block_reads.fmt.block)
    return True


def keep_fp8(module: torch.nn.Module, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> None:
    """Make a Megatron Column/RowParallelLinear hold ``weight`` in FP8 and run its GEMM through ``fp8_linear``."""
    dtype = module.weight.dtype
    module.register_buffer("weight_fp8", weight, persistent=False)
    module.register_buffer("weight_scale_inv", scale_inv, persistent=False)
    module.fp8_block = block
    # The full-precision parameter goes; an empty one keeps Megatron's forward (which reads self.weight) working.
    module.weight = torch.nn.Parameter(torch.empty(0, dtype=dtype, device=weight.device), requires_grad=False)
    module._forward_impl = functools.partial(_fp8_forward_impl, module)


def _fp8_forward_impl(module, input, weight, bias, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                      sequence_parallel=False, tp_group=None, grad_output_buffer=None, wgrad_deferral_limit=None,
                      **unused):
    """Stands in for Megatron's ``linear_with_frozen_weight`` (same arguments; the target is frozen, so
    there is no backward): gather the sequence-parallel input, then the FP8 GEMM."""
    if sequence_parallel:
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True,
                                                     group=tp_group if tp_group is not None else module.tp_group)
    out = fp8_linear(input, module.weight_fp8, module.weight_scale_inv, module.fp8_block)
    return out + bias if bias is not None else out


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``x @ dequant(weight).T`` for an FP8 weight [N, K] with block scales: an FP8 GEMM when the device can
    (``fp8_gemm_available``), else the weight is dequantised to x's dtype for this one GEMM."""
    n, k = weight.shape
    if x.is_cuda and block == (128, 128) and k % 128 == 0 and n % 128 == 0 and fp8_gemm_available(x.device)[0]:
        out = _blockwise_fp8_gemm(x.reshape(-1, k), weight, scale_inv, x.dtype)
        return out.view(*x.shape[:-1], n)
    return torch.matmul(x, dequantize_blocks(weight, scale_inv, block).to(x.dtype).t())


def _blockwise_fp8_gemm(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """FP8 x FP8 on tensor cores: activations quantised per token and 128 channels (the checkpoints'
    ``activation_scheme: dynamic``), weights with their 128x128 scales."""
    import torch.nn.functional as F

    m, k = x.shape
    pad = -m % 16  # the CUTLASS kernels want the row count aligned
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    groups = x.float().view(-1, k // 128, 128)
    scale_a = (groups.abs().amax(-1) / E4M3_MAX).clamp(min=1e-12)
    xq = (groups / scale_a[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE).view(-1, k)
    out = F.scaled_mm(xq, weight.t(), scale_a.t().contiguous().t(), F.ScalingType.BlockWise1x128,
                      scale_inv.float().t(), F.ScalingType.BlockWise128x128, output_dtype=out_dtype)
    return out[:m]


@functools.lru_cache(maxsize=None)
def fp8_gemm_available(device: torch.device) -> tuple[bool, str]:
    """(usable, why) for the block-scaled FP8 GEMM on ``device``: needs CUDA compute capability >= 9.0 and a
    torch whose ``scaled_mm`` takes 1x128 / 128x128 block scales; checked once against the dequantised
    GEMM on a small product, so a kernel that is missing or wrong here is never used."""
    if device.type != "cuda":
        return False, f"no FP8 GEMM on {device.type}"
    import torch.nn.functional as F

    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (9, 0) or not hasattr(F, "scaled_mm"):
        return False, f"compute capability {major}.{minor} / torch {torch.__version__} has no block-scaled FP8 GEMM"
    gen = torch.Generator(device="cpu").manual_seed(0)
    w = torch.randn(256, 512, generator=gen)
    x = torch.randn(48, 512, generator=gen).to(device, torch.bfloat16)
    q, s = quantize_blocks(w, (128, 128))
    q, s = q.to(device), s.to(device)
    try:
        out = _blockwise_fp8_gemm(x, q, s, torch.bfloat16).float()
    except RuntimeError as exc:  # the kernel is not built for this device / torch: report, use the fallback
        return False, f"scaled_mm refused block scales here ({str(exc).splitlines()[0]})"
    ref = x.float() @ dequantize_blocks(q, s, (128, 128)).t()
    error = float((out - ref).norm() / ref.norm())
    if not error < 0.05:  # activation quantisation alone costs ~1%
        return False, f"scaled_mm with block scales disagrees with the dequantised GEMM (relative error {error:.3f})"
    return True, f"FP8 GEMMs (torch scaled_mm, 1x128 activation / 128x128 weight blocks), checked to {error:.4f}"


def describe_native(device: torch.device) -> str:
    usable, why = fp8_gemm_available(device)
    return why if usable else f"weights kept in FP8, each GEMM dequantizes its weight ({why})"


# ----------------------------------------------------------------------------------------------
# Writing an FP8 checkpoint, and reading one into HF transformers (references for verification)
# ----------------------------------------------------------------------------------------------


def default_quantized(key: str, shape: list[int]) -> bool:
    """The tensors the official FP8 releases quantize: 2-D weights inside decoder layers, except routers."""
    if len(shape) != 2 or not key.endswith(".weight") or ".layers." not in key:
        return False
    return not key.endswith(("mlp.gate.weight", "mlp.router.weight", "block_sparse_moe.gate.weight"))


def write_fp8_checkpoint(src_dir: str, out_dir: str, block: tuple[int, int] = (128, 128)) -> str:
    """Write ``src_dir`` (full precision) as a block-FP8 checkpoint at ``out_dir``; other files are copied."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from specforge_mcore.target.load import SafetensorsReader

    reader = SafetensorsReader(src_dir)
    if reader.block_reads is not None:
        raise UserError(f"{src_dir} is already an FP8 checkpoint")
    os.makedirs(out_dir, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for key in sorted(reader.key_to_file):
        with safe_open(reader.key_to_file[key], framework="pt") as handle:
            tensor = handle.get_tensor(key)
        if default_quantized(key, list(tensor.shape)):
            tensors[key], tensors[scale_key(key)] = quantize_blocks(tensor, block)
        else:
            tensors[key] = tensor.contiguous()
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(src_dir):
        if name.endswith(".safetensors") or name == "model.safetensors.index.json":
            continue
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copy(os.path.join(src_dir, name), os.path.join(out_dir, name))
    with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as fh:
        hf = json.load(fh)
    hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                 "weight_block_size": list(block)}
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(hf, fh, indent=2)
    return out_dir


def write_dequantized_checkpoint(hf_dir: str, out_dir: str) -> str:
    """Write a block-FP8 checkpoint's weights dequantised to fp32 (no scales, no quantization_config)."""
    import shutil

    from safetensors.torch import save_file

    from specforge_mcore.target.load import SafetensorsReader

    reader = SafetensorsReader(hf_dir)
    state = {key: reader.read(key).float().contiguous() for key in reader.key_to_file if not key.endswith(SCALE_SUFFIX)}
    reader.close()
    os.makedirs(out_dir, exist_ok=True)
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(hf_dir):
        path = os.path.join(hf_dir, name)
        if os.path.isfile(path) and not name.endswith(".safetensors") and name != "model.safetensors.index.json":
            shutil.copy(path, os.path.join(out_dir, name))
    with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as fh:
        hf = json.load(fh)
    hf.pop("quantization_config", None)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(hf, fh, indent=2)
    return out_dir


def load_dequantized_hf_model(hf_dir: str):
    """HF transformers' model of a block-FP8 checkpoint with the dequantised weights, in fp32: the exact
    reference for a target hosted from that checkpoint (transformers' own loader maps the tensor names)."""
    import tempfile

    import transformers

    with tempfile.TemporaryDirectory(prefix="specforge_dequantized_") as tmp:
        write_dequantized_checkpoint(hf_dir, tmp)
        return transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()


def e4m3_rounding_bound(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The largest error rounding ``weight`` to e4m3 in its block may make, per element: half a unit in the last
    place, 2^-4 of the magnitude for normal values (3 mantissa bits), 2^-10 of the block scale for subnormals."""
    rows, cols = weight.shape
    scale = expand_scales(scale_inv, block, (0, rows), (0, cols))
    return torch.maximum(weight.float().abs() * 2.0 ** -4, scale * 2.0 ** -10)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (FP8 weights and scales included)."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))

