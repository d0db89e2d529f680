"""Load an HF safetensors checkpoint straight into this rank's shard of the Megatron target.

Each rank opens the safetensors files lazily and reads only the slices it owns: its TP rows/columns,
its experts (EP) and their expert-TP slices, its pipeline stage's layers. No rank materialises the full
model; ``SafetensorsReader.bytes_read`` records what was read so tests can prove it.

Sharding rules, by the kind of Megatron parameter:

* vocab rows      (embedding, output layer): rows [r*Vp/tp, (r+1)*Vp/tp) of the vocabulary padded to Vp
* replicated      (norms, router): the whole tensor
* qkv             (linear_qkv): Megatron interleaves per query group [q heads of group g | k_g | v_g];
                  rank r holds groups [r*G/tp, (r+1)*G/tp)
* column          (linear_fc1 = [gate; up]): rows split by tp, gate and up each split then stacked;
                  likewise MLA's up-projections and attention sinks (by head) and shared experts
* row             (linear_proj, linear_fc2): columns split by tp; their biases are whole
* latent down     (MLA linear_q_down_proj / linear_kv_down_proj): rows split by tp on the local spec,
                  whole under TE
* expert column/row: the same with the expert-TP rank, for the experts this EP rank owns; experts
                  stored stacked (GPT-OSS, [E, in, out], gate/up interleaved) are read per expert
* buffers         only the router's expert bias (DeepSeek-V3) comes from the checkpoint
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
        # Block-FP8 checkpoints: tensors with a weight_scale_inv are served through target/fp8.py.
        fmt = fp8.read_checkpoint_format(hf_dir)
        self.block_reads: Optional[fp8.BlockReads] = fp8.BlockReads(fmt) if fmt is not None else None

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
        if self.block_reads is not None:
            if self.has(fp8.scale_key(key)):
                return fp8.read_scaled(self, key, rows, cols)
            self.block_reads.record(key, scaled=False)
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
        if self.block_reads is not None and self.has(fp8.scale_key(key)):
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

    def close(self) -> None:
        self._handles.clear()


def _split(total: int, parts: int, rank: int, what: str) -> tuple[int, int]:
    if total % parts:
        raise UserError(f"{what}: size {total} is not divisible by {parts}")
    size = total // parts
    return rank * size, (rank + 1) * size


class _Ranks:
    """This rank's coordinates in Megatron's groups."""

    def __init__(self) -> None:
        from megatron.core import parallel_state as ps

        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.ep_rank = ps.get_expert_model_parallel_rank()
        self.ep_size = ps.get_expert_model_parallel_world_size()
        self.etp_rank = ps.get_expert_tensor_parallel_rank()
        self.etp_size = ps.get_expert_tensor_parallel_world_size()


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.(weight|bias)$")
_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc1|linear_fc2)\.(weight|bias)(\d+)$")
# Buffers that hold checkpoint values (everything else in a buffer is derived or scratch).
LOADED_BUFFERS = ("mlp.router.expert_bias",)


class WeightLoader:
    def __init__(self, stage: StageModel, reader: SafetensorsReader):
        self.stage = stage
        self.reader = reader
        self.family = stage.family
        self.hf = stage.hf
        self.ranks = _Ranks()
        self.cfg = stage.model.config

    # ---- rules --------------------------------------------------------------------------------
    def vocab_rows(self, key: str) -> torch.Tensor:
        vocab, padded = self.stage.vocab_size, self.stage.padded_vocab_size
        start, end = _split(padded, self.ranks.tp_size, self.ranks.tp_rank, f"vocabulary {padded}")
        hidden = self.reader.shape(key)[1]
        out = torch.zeros(end - start, hidden, dtype=torch.float32)
        if start < vocab:
            out[: min(end, vocab) - start] = self.reader.read(key, rows=(start, min(end, vocab))).float()
        return out

    def qkv(self, layer: int, suffix: str = "") -> torch.Tensor:
        heads, groups, dim = self.cfg.num_attention_heads, self.cfg.num_query_groups, self.cfg.kv_channels
        per_group = heads // groups
        g0, g1 = _split(groups, self.ranks.tp_size, self.ranks.tp_rank, "query groups")
        q, k, v = (self.family.hf_key(kind + suffix, layer) for kind in ("q", "k", "v"))
        pieces = []
        for g in range(g0, g1):
            pieces.append(self.reader.read(q, rows=(g * per_group * dim, (g + 1) * per_group * dim)))
            pieces.append(self.reader.read(k, rows=(g * dim, (g + 1) * dim)))
            pieces.append(self.reader.read(v, rows=(g * dim, (g + 1) * dim)))
        return torch.cat(pieces, dim=0)

    def column(self, keys: list[str], rank: int, size: int) -> torch.Tensor:
        pieces = []
        for key in keys:
            rows = self.reader.shape(key)[0]
            pieces.append(self.reader.read(key, rows=_split(rows, size, rank, key)))
        return torch.cat(pieces, dim=0)

    def row(self, key: str, rank: int, size: int) -> torch.Tensor:
        cols = self.reader.shape(key)[1]
        return self.reader.read(key, cols=_split(cols, size, rank, key))

    def latent_down(self, name: str, key: str) -> torch.Tensor:
        """MLA's q/kv down-projections: the local spec splits their rows over TP (and gathers the
        output), TE keeps them whole on every rank."""
        if self.stage.model.get_parameter(name).shape[0] == self.reader.shape(key)[0]:
            return self.reader.read(key)
        return self.column([key], self.ranks.tp_rank, self.ranks.tp_size)

    def expert(self, layer: int, local_expert: int, which: str, part: str = "weight") -> torch.Tensor:
        num_local = self.cfg.num_moe_experts // self.ranks.ep_size
        expert = self.ranks.ep_rank * num_local + local_expert
        if self.family.stacked_experts:
            return self.stacked_expert(layer, expert, which, part)
        if part != "weight":
            raise KeyError(part)
        key = self.family.hf_key
        if which == "linear_fc1":
            return self.column([key("expert_gate", layer, expert), key("expert_up", layer, expert)],
                               self.ranks.etp_rank, self.ranks.etp_size)
        return self.row(key("expert_down", layer, expert), self.ranks.etp_rank, self.ranks.etp_size)

    def stacked_expert(self, layer: int, expert: int, which: str, part: str) -> torch.Tensor:
        """Experts stacked [E, in, out] (GPT-OSS), gate and up interleaved by column: gate j is column 2j
        and up j column 2j+1, so an expert-TP slice of both is one contiguous column range."""
        key = self.family.hf_key
        rank, size = self.ranks.etp_rank, self.ranks.etp_size
        if which == "linear_fc1":
            gate_up = key("experts_gate_up", layer)
            a, b = _split(self.reader.shape(gate_up)[-1] // 2, size, rank, gate_up)
            if part == "bias":
                both = self.reader.read_stacked(key("experts_gate_up_bias", layer), expert, rows=(2 * a, 2 * b))
            else:
                both = self.reader.read_stacked(gate_up, expert, cols=(2 * a, 2 * b)).t()
            return torch.cat([both[0::2], both[1::2]])  # Megatron's fc1 is [gate; up]
        if part == "bias":  # a row-parallel bias is added once, after the reduction: whole
            return self.reader.read_stacked(key("experts_down_bias", layer), expert)
        down = key("experts_down", layer)
        return self.reader.read_stacked(down, expert, rows=_split(self.reader.shape(down)[1], size, rank, down)).t()

    # ---- name -> tensor -----------------------------------------------------------------------
    def tensor_for(self, name: str) -> torch.Tensor:
        key = self.family.hf_key
        tp = (self.ranks.tp_rank, self.ranks.tp_size)
        if name == "embedding.word_embeddings.weight":
            return self.vocab_rows(key("embed"))
        if name == "output_layer.weight":
            return self.vocab_rows(self.family.lm_head_key(self.hf))
        if name == "decoder.final_layernorm.weight":
            return self.reader.read(key("final_norm"))
        match = _LAYER.match(name)
        if match is None:
            raise KeyError(name)
        local, rest = int(match.group(1)), match.group(2)
        layer = self.stage.model.decoder.layers[local].layer_number - 1
        simple = {
            "input_layernorm.weight": "input_norm",
            "self_attention.linear_qkv.layer_norm_weight": "input_norm",  # TE fuses the norm into qkv
            "self_attention.q_layernorm.weight": "q_norm",
            "self_attention.k_layernorm.weight": "k_norm",
            "pre_mlp_layernorm.weight": "post_attn_norm",
            "mlp.linear_fc1.layer_norm_weight": "post_attn_norm",  # TE fuses the norm into fc1
            "mlp.router.weight": "router",
            "mlp.router.bias": "router_bias",
            "mlp.router.expert_bias": "router_expert_bias",  # a buffer (DeepSeek-V3's correction bias)
            "self_attention.linear_proj.bias": "o_bias",  # row-parallel: added once, whole
            # MLA's latent norms (TE fuses them into the up-projections)
            "self_attention.kv_layernorm.weight": "kv_norm",
            "self_attention.linear_q_up_proj.layer_norm_weight": "q_norm",
            "self_attention.linear_kv_up_proj.layer_norm_weight": "kv_norm",
        }
        if rest in simple:
            return self.reader.read(key(simple[rest], layer))
        if rest == "self_attention.linear_qkv.weight":
            return self.qkv(layer)
        if rest == "self_attention.linear_qkv.bias":
            return self.qkv(layer, "_bias")
        if rest == "self_attention.linear_proj.weight":
            return self.row(key("o", layer), *tp)
        if rest == "mlp.linear_fc1.weight":
            return self.column([key("gate", layer), key("up", layer)], *tp)
        if rest == "mlp.linear_fc2.weight":
            return self.row(key("down", layer), *tp)
        columns = {  # rows split over TP: by head, or by MLP width
            "self_attention.linear_q_proj.weight": ["q"],  # MLA without a query latent
            "self_attention.linear_q_up_proj.weight": ["q_up"],
            "self_attention.linear_kv_up_proj.weight": ["kv_up"],
            "self_attention.core_attention.softmax_offset": ["sinks"],  # one sink logit per head
            "mlp.shared_experts.linear_fc1.weight": ["shared_gate", "shared_up"],
        }
        if rest in columns:
            return self.column([key(kind, layer) for kind in columns[rest]], *tp)
        if rest == "mlp.shared_experts.linear_fc2.weight":
            return self.row(key("shared_down", layer), *tp)
        if rest == "self_attention.linear_q_down_proj.weight":
            return self.latent_down(name, key("q_down", layer))
        if rest == "self_attention.linear_kv_down_proj.weight":
            return self.latent_down(name, key("kv_down", layer))
        expert = _LOCAL_EXPERT.match(rest) or _GROUPED_EXPERT.match(rest)
        if expert is not None:
            if expert.re is _LOCAL_EXPERT:
                return self.expert(layer, int(expert.group(1)), expert.group(2), expert.group(3))
            return self.expert(layer, int(expert.group(3)), expert.group(1), expert.group(2))
        raise KeyError(name)


def load_stage_weights(stage: StageModel, hf_dir: str, reader: Optional[SafetensorsReader] = None,
                       fp8_mode: Optional[str] = None) -> SafetensorsReader:
    """Fill every parameter of ``stage.model`` from the HF checkpoint in ``hf_dir``. ``fp8_mode="native"``
    keeps the decoder's FP8 linear weights in FP8 (``target/fp8.py``); otherwise FP8 is dequantised."""
    reader = reader or SafetensorsReader(hf_dir)
    loader = WeightLoader(stage, reader)
    native = fp8_mode == "native" and reader.block_reads is not None
    if native:
        fp8.check_native_layout(stage.hf, stage.family, stage.layout, reader.block_reads.fmt, f"{hf_dir}/config.json")
    buffers = [(name, b) for name, b in stage.model.named_buffers() if name.endswith(LOADED_BUFFERS)]
    with torch.no_grad():
        for name, param in list(stage.model.named_parameters()) + buffers:
            if native and fp8.is_native_candidate(stage.model, name) and fp8.load_native(loader, name, hf_dir):
                continue
            try:
                tensor = loader.tensor_for(name)
            except KeyError:
                raise UserError(f"{hf_dir}: no rule to load Megatron parameter {name!r} of a "
                                f"{stage.family.name} model (unsupported feature in this checkpoint?)") from None
            if tuple(tensor.shape) != tuple(param.shape):
                raise UserError(f"{hf_dir}: weights for {name} have shape {list(tensor.shape)} on this rank, "
                                f"expected {list(param.shape)} (checkpoint does not match config.json?)")
            param.copy_(tensor.to(param.dtype))
    return reader
