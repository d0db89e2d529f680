"""Block-scaled FP8 checkpoints: what the format says, and the block math.

The official ``*-FP8`` releases (Qwen3, DeepSeek-V3) say ``quantization_config: {quant_method: "fp8", fmt:
"e4m3", weight_block_size: [128, 128], activation_scheme: "dynamic"}``; every quantized linear ``X.weight``
is stored as ``float8_e4m3fn`` next to ``X.weight_scale_inv`` of shape ``[ceil(rows/128), ceil(cols/128)]``,
and the real weight is ``X.weight * weight_scale_inv`` blockwise (a partial block at the end of a dimension
has its own scale). Embeddings, norms, routers and the LM head stay in bf16.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from specforge_mcore.errors import UserError

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = 448.0
SCALE_SUFFIX = "_scale_inv"
MODES = ("auto", "dequantize", "native")


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
