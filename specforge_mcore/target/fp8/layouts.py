"""Which layouts keep an FP8 checkpoint's blocks whole on every rank, and what FP8 weights weigh.

Both read the slice descriptions of ``target/sharding.py``: a layout is refused when one of a rank's
pieces of a linear weight starts inside a block, or ends inside one with another piece stacked after it
(then one tile of the rank's tensor would mix two blocks and need two scales).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from specforge_mcore.errors import UserError
from specforge_mcore.target.fp8.format import BlockFp8, checkpoint_format, resolve_mode
from specforge_mcore.target.sharding import Coords, ShardingRules, block_problems


def _sample_layers(rules: ShardingRules) -> list[int]:
    """One dense and one MoE decoder layer (all layers of a kind are cut alike)."""
    layers = range(rules.tc["num_layers"])
    dense = [i for i in layers if i not in rules.moe_layers][:1]
    moe = [i for i in layers if i in rules.moe_layers][:1]
    return dense + moe


def native_layout_problems(hf: dict, family, layout, block: tuple[int, int]) -> list[str]:
    """Why ``layout`` would cut FP8 blocks (empty when every rank's pieces are whole blocks). Tensor-parallel
    shards depend on the TP rank, expert shards on the expert-TP rank; experts are never cut over EP."""
    problems: list[str] = []
    for r in range(max(layout.tp, layout.expert_tp)):
        rules = ShardingRules(hf, family, layout, Coords(tp_rank=r % layout.tp, etp_rank=r % layout.expert_tp))
        for layer in _sample_layers(rules):
            for name in rules.layer_names(layer):
                shard = rules.shard(name)
                if shard.linear:
                    problems += block_problems(shard, block)
    return list(dict.fromkeys(problems))


def native_layouts_that_fit(hf: dict, family, layout, block: tuple[int, int]) -> list[str]:
    """Other tp / expert-tp values (same pp, ep) whose shards keep whole blocks, as ``tp=.. etp=..`` strings."""
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
    rules = ShardingRules(hf, family, layout)
    br, bc = block
    out = []
    for stage in range(layout.pp):
        elements = blocks = 0
        for shard in rules.stage_shards(stage):
            if shard.linear and shard.name.startswith("decoder."):
                rows, cols = shard.shape
                elements += rows * cols
                blocks += -(-rows // br) * -(-cols // bc)
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
