"""Load an HF safetensors checkpoint straight into this rank's shard of the Megatron target.

Each rank opens the safetensors files lazily and reads only the slices it owns: its TP rows/columns,
its experts (EP) and their expert-TP slices, its pipeline stage's layers. No rank materialises the full
model; ``SafetensorsReader.bytes_read`` records what was read so tests can prove it.

Sharding rules, by the kind of Megatron parameter:

* vocab rows      (embedding, output layer): rows [r*Vp/tp, (r+1)*Vp/tp) of the vocabulary padded to Vp
* replicated      (norms, router): the whole tensor
* qkv             (linear_qkv): Megatron interleaves per query group [q heads of group g | k_g | v_g];
                  rank r holds groups [r*G/tp, (r+1)*G/tp)
* column          (linear_fc1 = [gate; up]): rows split by tp, gate and up each split then stacked
* row             (linear_proj, linear_fc2): columns split by tp
* expert column/row: the same with the expert-TP rank, for the experts this EP rank owns
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

import torch
from safetensors import safe_open

from specforge_mcore.errors import UserError
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
                with safe_open(path, framework="pt") as handle:
                    for key in handle.keys():
                        self.key_to_file[key] = path
        self._handles: dict[str, object] = {}
        self.bytes_read = 0

    def _handle(self, key: str):
        if key not in self.key_to_file:
            raise UserError(f"{self.hf_dir}: the checkpoint has no tensor {key!r} "
                            f"({len(self.key_to_file)} tensors in it)")
        path = self.key_to_file[key]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path]

    def has(self, key: str) -> bool:
        return key in self.key_to_file

    def shape(self, key: str) -> list[int]:
        return list(self._handle(key).get_slice(key).get_shape())

    def read(self, key: str, rows: Optional[tuple[int, int]] = None, cols: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """The tensor ``key``, or only rows [a, b) / columns [c, d) of it, read from disk."""
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
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$")
_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc1|linear_fc2)\.weight(\d+)$")


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

    def expert(self, layer: int, local_expert: int, which: str) -> torch.Tensor:
        num_local = self.cfg.num_moe_experts // self.ranks.ep_size
        expert = self.ranks.ep_rank * num_local + local_expert
        key = self.family.hf_key
        if which == "linear_fc1":
            return self.column([key("expert_gate", layer, expert), key("expert_up", layer, expert)],
                               self.ranks.etp_rank, self.ranks.etp_size)
        return self.row(key("expert_down", layer, expert), self.ranks.etp_rank, self.ranks.etp_size)

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
        expert = _LOCAL_EXPERT.match(rest) or _GROUPED_EXPERT.match(rest)
        if expert is not None:
            if expert.re is _LOCAL_EXPERT:
                return self.expert(layer, int(expert.group(1)), expert.group(2))
            return self.expert(layer, int(expert.group(2)), expert.group(1))
        raise KeyError(name)


def load_stage_weights(stage: StageModel, hf_dir: str, reader: Optional[SafetensorsReader] = None) -> SafetensorsReader:
    """Fill every parameter of ``stage.model`` from the HF checkpoint in ``hf_dir``."""
    reader = reader or SafetensorsReader(hf_dir)
    loader = WeightLoader(stage, reader)
    with torch.no_grad():
        for name, param in stage.model.named_parameters():
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
