"""Load an HF safetensors checkpoint straight into this rank's shard of the Megatron target.

Each rank opens the safetensors files lazily and reads only the slices it owns: its TP rows/columns,
its experts (EP) and their expert-TP slices, its pipeline stage's layers. No rank materialises the full
model; ``SafetensorsReader.bytes_read`` records what was read so tests can prove it.

Which slices those are is not decided here: ``target/sharding.py`` describes every parameter's shard as
pieces of HF tensors, and this module reads the pieces (checking each file tensor against the shape
config.json implies) and puts them together.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

import torch

from specforge_mcore.errors import UserError
from specforge_mcore.fileio import open_safetensors
from specforge_mcore.target import fp8
from specforge_mcore.target.build import StageModel
from specforge_mcore.target.fp8 import reads as fp8_reads
from specforge_mcore.target.sharding import Coords, Piece, Shard, ShardingRules


class SafetensorsReader:
    """Lazy, slice-wise access to the tensors of an HF checkpoint (single file or sharded + index)."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        index_path = os.path.join(hf_dir, "model.safetensors.index.json")
        self.key_to_file: dict[str, str] = {}
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as fh:
                weight_map = json.load(fh).get("weight_map", {})
            for key, file in weight_map.items():
                self.key_to_file[key] = os.path.join(hf_dir, file)
            missing = sorted({f for f in self.key_to_file.values() if not os.path.isfile(f)})
            if missing:
                raise UserError(f"{index_path}: lists {os.path.basename(missing[0])}, which is not in {hf_dir}"
                                f" ({len(missing)} shard file(s) missing)")
        else:
            files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
            if not files:
                raise UserError(f"{hf_dir}: no *.safetensors weights (and no model.safetensors.index.json)")
            for file in files:
                path = os.path.join(hf_dir, file)
                with open_safetensors(path) as handle:
                    for key in handle.keys():
                        self.key_to_file[key] = path
        self._handles: dict[str, object] = {}
        self.bytes_read = 0
        # Block-FP8 checkpoints: tensors with a weight_scale_inv are dequantised by target/fp8/reads.py.
        self.fmt: Optional[fp8.BlockFp8] = fp8.read_checkpoint_format(hf_dir)

    def _handle(self, key: str):
        if key not in self.key_to_file:
            raise UserError(f"{self.hf_dir}: the checkpoint has no tensor {key!r} "
                            f"({len(self.key_to_file)} tensors in it)")
        path = self.key_to_file[key]
        if path not in self._handles:
            self._handles[path] = open_safetensors(path)
        return self._handles[path]

    def has(self, key: str) -> bool:
        return key in self.key_to_file

    def shape(self, key: str) -> list[int]:
        return list(self._handle(key).get_slice(key).get_shape())

    def read(self, key: str, rows: Optional[tuple[int, int]] = None, cols: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """The tensor ``key``, or only rows [a, b) / columns [c, d) of it, read from disk (FP8 ones
        dequantised, unless a native FP8 load asked for their payload)."""
        if self.fmt is not None and self.has(fp8.scale_key(key)):
            return fp8_reads.read_scaled(self, self.fmt, key, rows, cols)
        tensor = self.read_raw(key, rows, cols)
        if tensor.dtype == fp8.FP8_DTYPE:
            raise UserError(f"{self.key_to_file[key]}: {key} is stored in float8 but has no {fp8.scale_key(key)} "
                            "block scale (and config.json no block-FP8 quantization_config)")
        return tensor

    def read_raw(self, key: str, rows: Optional[tuple[int, int]] = None, cols: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Rows [a, b) / columns [c, d) of ``key`` exactly as stored."""
        piece = self._handle(key).get_slice(key)
        shape = piece.get_shape()
        r0, r1 = rows if rows is not None else (0, shape[0])
        if cols is None:
            tensor = piece[r0:r1]
        else:
            if len(shape) != 2:
                raise UserError(f"{self.key_to_file[key]}: {key} has shape {list(shape)}, expected a matrix")
            tensor = piece[r0:r1, cols[0]:cols[1]]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def read_stacked(self, key: str, index: int, rows: Optional[tuple[int, int]] = None,
                     cols: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Entry ``index`` of a stacked tensor [N, R] or [N, R, C] (rows [a, b) / columns [c, d) of it)."""
        if self.fmt is not None and self.has(fp8.scale_key(key)):
            raise UserError(f"{self.hf_dir}: {key} is stacked experts stored in block FP8, which is not supported; "
                            "dequantize the checkpoint to bf16 first")
        piece = self._handle(key).get_slice(key)
        shape = piece.get_shape()
        r0, r1 = rows if rows is not None else (0, shape[1])
        if len(shape) == 2:
            tensor = piece[index:index + 1, r0:r1][0]
        elif len(shape) == 3:
            c0, c1 = cols if cols is not None else (0, shape[2])
            tensor = piece[index:index + 1, r0:r1, c0:c1][0]
        else:
            raise UserError(f"{self.key_to_file[key]}: {key} has shape {list(shape)}, expected stacked experts")
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def read_piece(self, piece: Piece) -> torch.Tensor:
        """One piece of a shard (``target/sharding.py``), after checking the file's tensor has the shape
        config.json implies."""
        shape = self.shape(piece.key)
        if tuple(shape) != piece.full:
            raise UserError(f"{self.key_to_file[piece.key]}: {piece.key} has shape {shape}, but config.json "
                            f"implies {list(piece.full)} (checkpoint does not match config.json?)")
        if piece.entry is not None:
            tensor = self.read_stacked(piece.key, piece.entry, piece.rows, piece.cols)
        else:
            tensor = self.read(piece.key, piece.rows, piece.cols)
        return tensor.t() if piece.transposed else tensor

    def close(self) -> None:
        self._handles.clear()


def assemble(shard: Shard, tensors: list[torch.Tensor]) -> torch.Tensor:
    """The rank's tensor of ``shard`` from its pieces, read in order."""
    if shard.assemble == "pad":  # vocabulary rows padded to a multiple of TP: the padding is zero
        out = torch.zeros(shard.shape, dtype=tensors[0].dtype if tensors else torch.float32)
        if tensors:
            out[: tensors[0].shape[0]] = tensors[0]
        return out
    if shard.assemble == "deinterleave":  # gate j, up j alternate by row; Megatron's fc1 is [gate; up]
        (both,) = tensors
        return torch.cat([both[0::2], both[1::2]])
    return torch.cat(tensors) if len(tensors) > 1 else tensors[0]


def rank_coords() -> Coords:
    """This rank's coordinates in Megatron's tensor, expert and expert-tensor parallel groups."""
    from megatron.core import parallel_state as ps  # Megatron is only imported where a target is hosted

    return Coords(tp_rank=ps.get_tensor_model_parallel_rank(), ep_rank=ps.get_expert_model_parallel_rank(),
                  etp_rank=ps.get_expert_tensor_parallel_rank())


_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# Buffers that hold checkpoint values (everything else in a buffer is derived or scratch).
LOADED_BUFFERS = ("mlp.router.expert_bias",)


class WeightLoader:
    """Reads the shards of one pipeline stage on this rank."""

    def __init__(self, stage: StageModel, reader: SafetensorsReader, coords: Optional[Coords] = None):
        self.stage = stage
        self.reader = reader
        self.rules = ShardingRules(stage.hf, stage.family, stage.layout, coords or rank_coords(),
                                   latent_down_split=not stage.use_te)

    def shard_for(self, name: str) -> Shard:
        """The shard of this stage's parameter ``name`` (its decoder layers are numbered from 0 on every stage)."""
        match = _LOCAL_LAYER.match(name)
        if match is not None:
            name = f"decoder.layers.{self.stage.layer_ids[int(match.group(1))]}.{match.group(2)}"
        return self.rules.shard(name)

    def read(self, shard: Shard) -> torch.Tensor:
        return assemble(shard, [self.reader.read_piece(piece) for piece in shard.pieces])


def load_stage_weights(stage: StageModel, hf_dir: str, reader: Optional[SafetensorsReader] = None,
                       fp8_mode: Optional[str] = None) -> SafetensorsReader:
    """Fill every parameter of ``stage.model`` from the HF checkpoint in ``hf_dir``. ``fp8_mode="native"``
    keeps the decoder's FP8 linear weights in FP8 (``target/fp8/``); otherwise FP8 is dequantised."""
    reader = reader or SafetensorsReader(hf_dir)
    loader = WeightLoader(stage, reader)
    native = fp8_mode == "native" and reader.fmt is not None
    if native:
        from specforge_mcore.target.fp8 import megatron_patch  # imports Megatron's linear layers

        fp8.check_native_layout(stage.hf, stage.family, stage.layout, reader.fmt, f"{hf_dir}/config.json")
    buffers = [(name, b) for name, b in stage.model.named_buffers() if name.endswith(LOADED_BUFFERS)]
    with torch.no_grad():
        for name, param in list(stage.model.named_parameters()) + buffers:
            try:
                shard = loader.shard_for(name)
            except KeyError:
                raise UserError(f"{hf_dir}: no rule to load Megatron parameter {name!r} of a "
                                f"{stage.family.name} model (unsupported feature in this checkpoint?)") from None
            if tuple(shard.shape) != tuple(param.shape):
                raise UserError(f"{hf_dir}: weights for {name} have shape {list(shard.shape)} on this rank, "
                                f"expected {list(param.shape)} (checkpoint does not match config.json?)")
            if native and megatron_patch.is_native_candidate(stage.model, name):
                held = fp8_reads.read_native(reader, reader.fmt, shard, hf_dir)
                if held is not None:
                    module = stage.model.get_submodule(name[: -len(".weight")])
                    megatron_patch.keep_fp8(module, held[0], held[1], reader.fmt.block)
                    continue
            param.copy_(loader.read(shard).to(param.dtype))
    return reader
