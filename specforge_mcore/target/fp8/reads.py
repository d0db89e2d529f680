"""Reading a block-FP8 checkpoint: any slice dequantised, or a rank's shard in FP8 with its own scales.

* ``dequantize`` (``read_scaled``): every element of whatever rows/columns a loading rule asks for is
  multiplied by the scale of the block it came from, so any TP/EP/PP slicing is exact, even one that cuts
  a block.
* ``native`` (``read_native``): a shard's pieces (``target/sharding.py``) are read as stored, and each
  piece brings the rows/columns of the scale table that cover it. ``layouts.check_native_layout`` has
  already refused any layout in which a piece starts inside a block or stops inside one with another piece
  stacked after it, so the pieces' scale tables stack into exactly the scales of the rank's tensor.
"""

from __future__ import annotations

from typing import Optional

import torch

from specforge_mcore.errors import UserError
from specforge_mcore.target.fp8.format import FP8_DTYPE, BlockFp8, expand_scales, scale_key
from specforge_mcore.target.sharding import Shard, Span


def _block_span(span: Span, size: int) -> Span:
    """The scale rows (or columns) covering weight rows (or columns) [start, end)."""
    return span[0] // size, -(-span[1] // size)


def check_scale_shape(reader, key: str, block: tuple[int, int]) -> list[int]:
    """The shape of matrix ``key``, after checking that its scale table has one entry per block."""
    shape = reader.shape(key)
    if len(shape) != 2:
        raise UserError(f"{reader.hf_dir}: {key} has a block scale but shape {shape}; block-FP8 scales apply to "
                        "matrices only")
    br, bc = block
    expected = [-(-shape[0] // br), -(-shape[1] // bc)]
    if reader.shape(scale_key(key)) != expected:
        raise UserError(f"{reader.hf_dir}: {scale_key(key)} has shape {reader.shape(scale_key(key))}, but {key} "
                        f"{shape} in {br}x{bc} blocks (weight_block_size in config.json) needs {expected}")
    return shape


def _payload(reader, key: str, rows: Span, cols: Span) -> torch.Tensor:
    q = reader.read_raw(key, rows=rows, cols=cols)
    if q.dtype != FP8_DTYPE:
        raise UserError(f"{reader.hf_dir}: {key} has a block scale but dtype {q.dtype} (expected float8_e4m3fn)")
    return q


def read_scaled(reader, fmt: BlockFp8, key: str, rows: Optional[Span], cols: Optional[Span]) -> torch.Tensor:
    """Rows [a, b) / columns [c, d) of the scaled matrix ``key``, dequantised to fp32."""
    shape = check_scale_shape(reader, key, fmt.block)
    rows = rows if rows is not None else (0, shape[0])
    cols = cols if cols is not None else (0, shape[1])
    br, bc = fmt.block
    q = _payload(reader, key, rows, cols)
    scale = reader.read_raw(scale_key(key), rows=_block_span(rows, br), cols=_block_span(cols, bc))
    return q.float() * expand_scales(scale, fmt.block, rows, cols)


def read_native(reader, fmt: BlockFp8, shard: Shard, where: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(FP8 payload, fp32 scales [ceil(R/br), ceil(C/bc)]) of ``shard`` on this rank, or None when its
    tensors are not quantized (load it as usual)."""
    scaled = [reader.has(scale_key(p.key)) for p in shard.pieces]
    if not any(scaled):
        return None
    if not all(scaled):
        plain = next(p.key for p, s in zip(shard.pieces, scaled) if not s)
        quantized = next(p.key for p, s in zip(shard.pieces, scaled) if s)
        raise UserError(f"{where}: {shard.name} is built from FP8 tensors ({quantized}) and unquantized ones ({plain}); "
                        "target.fp8=native needs them all in FP8: set target.fp8=dequantize")
    if shard.assemble != "stack" or any(p.entry is not None or p.transposed for p in shard.pieces):
        raise UserError(f"{where}: {shard.name} is stored as stacked experts in block FP8, which is not supported; "
                        "dequantize the checkpoint to bf16 first")
    br, bc = fmt.block
    payloads, scales = [], []
    for piece in shard.pieces:
        check_scale_shape(reader, piece.key, fmt.block)
        rows, cols = piece.row_span, piece.col_span
        payloads.append(_payload(reader, piece.key, rows, cols))
        scales.append(reader.read_raw(scale_key(piece.key), rows=_block_span(rows, br), cols=_block_span(cols, bc)).float())
    return torch.cat(payloads).contiguous(), torch.cat(scales).contiguous()

