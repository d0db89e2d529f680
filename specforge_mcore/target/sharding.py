"""Which slice of which HF tensor each rank of the target holds: the one place that knows.

Megatron shards the frozen target over tensor (TP), expert (EP), expert-tensor (ETP) and pipeline (PP)
parallelism. ``ShardingRules`` turns a model's HF config, its family, a layout and a rank's coordinates
into *data*: for every Megatron parameter a ``Shard`` that lists the ``Piece`` s of HF tensors it is made
of (tensor name, the rows / columns taken, the stacked entry) and how they are put together. Everyone who
needs that geometry reads these descriptions and computes none of their own:

* ``target/load.py`` reads the pieces from the safetensors files and assembles them;
* ``target/fp8/`` takes each piece's block scales with it, and refuses a layout that cuts a block
  (``block_problems``);
* ``train/plan.py`` sums the shard shapes for its byte counts, without building anything.

The rules, by kind of Megatron parameter (the full shapes come from config.json, and the loader checks
every file against them):

* vocab rows   (embedding, output layer): rows [r*Vp/tp, (r+1)*Vp/tp) of the vocabulary padded to Vp;
               the padding rows are zero
* replicated   (norms, router, row-parallel biases): the whole tensor
* qkv          (linear_qkv): Megatron interleaves per query group [q heads of group g | k_g | v_g]; rank r
               holds groups [r*G/tp, (r+1)*G/tp)
* column       (linear_fc1 = [gate; up], MLA's up-projections, attention sinks, shared experts): rows split
               by tp, each source split and then stacked
* row          (linear_proj, linear_fc2): columns split by tp
* latent down  (MLA linear_q_down_proj / linear_kv_down_proj): rows split by tp on the local spec, whole
               under Transformer Engine
* experts      the same with the expert-TP rank, for the experts this EP rank owns (experts
               [e*E/ep, (e+1)*E/ep)); experts stored stacked (GPT-OSS: [E, in, out], gate and up
               interleaved by column) are one entry of the stack, transposed, gate and up de-interleaved
* buffers      only the router's expert bias (DeepSeek-V3) is read from the checkpoint; the token counts
               beside it are scratch (counted by the planner, never loaded)

A new family only names its tensors (``Family.hf_key``) and translates its config; it writes no geometry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from specforge_mcore.errors import UserError

Span = tuple[int, int]


# ----------------------------------------------------------------------------------------------
# Pipeline stages
# ----------------------------------------------------------------------------------------------


def pipeline_split(num_layers: int, pp: int, where: str = "config.json") -> list[int]:
    """Layers per pipeline stage: even when possible, else Megatron's uneven first/last stages with
    the middle stages equal, choosing the most balanced such split (lighter first/last stages)."""
    if pp < 1 or num_layers < pp:
        raise UserError(f"{where}: num_hidden_layers={num_layers} cannot be split over pp={pp} stages "
                        f"(every stage needs at least one layer; pp must be <= {num_layers})")
    if num_layers % pp == 0:
        return [num_layers // pp] * pp
    if pp == 2:
        return [num_layers // 2, num_layers - num_layers // 2]
    best = None
    for first in range(1, num_layers):
        for last in range(1, num_layers - first):
            middle_total = num_layers - first - last
            if middle_total % (pp - 2) or middle_total // (pp - 2) < 1:
                continue
            split = [first] + [middle_total // (pp - 2)] * (pp - 2) + [last]
            # The first and last stages also hold the embedding and the output layer + teacher.
            key = (max(split), first + last, abs(first - last))
            if best is None or key < best[0]:
                best = (key, split)
    if best is None:
        raise UserError(f"{where}: num_hidden_layers={num_layers} cannot be split over pp={pp} stages")
    return best[1]


def stage_layers(split: list[int], stage: int) -> range:
    """Global 0-based ids of the decoder layers on pipeline ``stage``."""
    first = sum(split[:stage])
    return range(first, first + split[stage])


def stage_of_layer(layer_id: int, split: list[int]) -> int:
    """The pipeline stage that holds decoder layer ``layer_id``."""
    bound = 0
    for stage, count in enumerate(split):
        bound += count
        if layer_id < bound:
            return stage
    raise ValueError(f"layer {layer_id} is beyond the {sum(split)} layers of split {split}")


def split_even(total: int, parts: int, rank: int, what: str) -> Span:
    """Rank ``rank``'s share [start, end) of ``total`` cut into ``parts`` equal pieces."""
    if total % parts:
        raise UserError(f"{what}: size {total} is not divisible by {parts}")
    size = total // parts
    return rank * size, (rank + 1) * size


# ----------------------------------------------------------------------------------------------
# Slice descriptions
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """One contiguous read: rows/columns of an HF tensor (of one entry of it, for stacked experts)."""

    key: str
    full: tuple[int, ...]  # the HF tensor's shape, as config.json implies it
    rows: Optional[Span] = None  # None: all (dim 0, or dim 1 of a stacked tensor)
    cols: Optional[Span] = None  # None: all (the next dimension)
    entry: Optional[int] = None  # stacked [N, ...] tensors: which N
    transposed: bool = False  # stored [in, out]; Megatron holds [out, in]

    @property
    def matrix(self) -> tuple[int, ...]:
        """The shape of the (entry of the) HF tensor this piece is cut from."""
        return self.full[1:] if self.entry is not None else self.full

    @property
    def row_span(self) -> Span:
        return self.rows if self.rows is not None else (0, self.matrix[0])

    @property
    def col_span(self) -> Optional[Span]:
        if len(self.matrix) < 2:
            return None
        return self.cols if self.cols is not None else (0, self.matrix[1])

    @property
    def shape(self) -> tuple[int, ...]:
        r0, r1 = self.row_span
        cols = self.col_span
        shape = (r1 - r0,) if cols is None else (r1 - r0, cols[1] - cols[0])
        return tuple(reversed(shape)) if self.transposed else shape


@dataclass(frozen=True)
class Shard:
    """What one rank holds of one Megatron parameter (or loaded buffer), and where it comes from."""

    name: str  # the Megatron name, with the global layer id for decoder layers
    shape: tuple[int, ...]  # on this rank
    pieces: tuple[Piece, ...]  # read in order
    # "stack": pieces concatenated on dim 0; "pad": the one piece, then zero rows up to ``shape``;
    # "deinterleave": one piece whose rows alternate gate, up -> [gate; up]
    assemble: str = "stack"
    linear: bool = False  # a decoder linear weight: what block-FP8 checkpoints quantize
    fp32: bool = False  # held in fp32 whatever target.dtype (the router's expert bookkeeping)
    loaded: bool = True  # False: scratch Megatron keeps beside the weights, counted but never read

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


# ----------------------------------------------------------------------------------------------
# The rules
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Coords:
    """A rank's place in the target's tensor, expert and expert-tensor parallel groups."""

    tp_rank: int = 0
    ep_rank: int = 0
    etp_rank: int = 0


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.(weight|bias)$")
_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc1|linear_fc2)\.(weight|bias)(\d+)$")

# Parameters that are a whole HF tensor on every rank: Megatron suffix -> family tensor kind. Transformer
# Engine fuses some norms into the next linear layer; those names are here too.
_REPLICATED = {
    "input_layernorm.weight": "input_norm",
    "self_attention.linear_qkv.layer_norm_weight": "input_norm",
    "self_attention.q_layernorm.weight": "q_norm",
    "self_attention.k_layernorm.weight": "k_norm",
    "pre_mlp_layernorm.weight": "post_attn_norm",
    "mlp.linear_fc1.layer_norm_weight": "post_attn_norm",
    "mlp.router.weight": "router",
    "mlp.router.bias": "router_bias",
    "mlp.router.expert_bias": "router_expert_bias",
    "self_attention.linear_proj.bias": "o_bias",  # row-parallel: added once, after the reduction
    "self_attention.kv_layernorm.weight": "kv_norm",
    "self_attention.linear_q_up_proj.layer_norm_weight": "q_norm",
    "self_attention.linear_kv_up_proj.layer_norm_weight": "kv_norm",
}
# Column-parallel (rows split over TP) from one or more HF tensors, stacked.
_COLUMN = {
    "mlp.linear_fc1.weight": ("gate", "up"),
    "self_attention.linear_q_proj.weight": ("q",),  # MLA without a query latent
    "self_attention.linear_q_up_proj.weight": ("q_up",),
    "self_attention.linear_kv_up_proj.weight": ("kv_up",),
    "self_attention.core_attention.softmax_offset": ("sinks",),  # one sink logit per head
    "mlp.shared_experts.linear_fc1.weight": ("shared_gate", "shared_up"),
}
# Row-parallel (columns split over TP).
_ROW = {
    "self_attention.linear_proj.weight": "o",
    "mlp.linear_fc2.weight": "down",
    "mlp.shared_experts.linear_fc2.weight": "shared_down",
}
_LATENT_DOWN = {
    "self_attention.linear_q_down_proj.weight": "q_down",
    "self_attention.linear_kv_down_proj.weight": "kv_down",
}
_FP32_BUFFERS = ("mlp.router.expert_bias", "mlp.router.local_tokens_per_expert")


class ShardingRules:
    """The shards of one rank of ``layout`` for a model (``hf`` config.json, its ``family``).

    ``latent_down_split``: MLA's latent down-projections are split over TP (Megatron's local spec) or
    whole (Transformer Engine)."""

    def __init__(self, hf: dict, family, layout, coords: Coords = Coords(), latent_down_split: bool = True):
        self.hf, self.family, self.layout, self.coords = hf, family, layout, coords
        self.latent_down_split = latent_down_split
        self.tc = family.transformer_config(hf)
        self.vocab = int(hf["vocab_size"])
        self.padded_vocab = -(-self.vocab // layout.tp) * layout.tp  # VocabParallelEmbedding needs tp | vocab
        self.moe_layers = frozenset(family.moe_layer_ids(hf))
        self.split = pipeline_split(self.tc["num_layers"], layout.pp)
        self._full = self._full_shapes()

    # ---- config -> HF shapes --------------------------------------------------------------------
    def _full_shapes(self) -> dict[str, tuple[int, ...]]:
        tc = self.tc
        H, heads = tc["hidden_size"], tc["num_attention_heads"]
        shapes: dict[str, tuple[int, ...]] = {
            "embed": (self.vocab, H), "lm_head": (self.vocab, H), "final_norm": (H,),
            "input_norm": (H,), "post_attn_norm": (H,), "o_bias": (H,), "sinks": (heads,),
            "gate": (tc["ffn_hidden_size"], H), "up": (tc["ffn_hidden_size"], H), "down": (H, tc["ffn_hidden_size"]),
        }
        if tc.get("multi_latent_attention"):
            qk, rope, v = tc["qk_head_dim"], tc["qk_pos_emb_head_dim"], tc["v_head_dim"]
            q_lora, kv_lora = tc.get("q_lora_rank"), tc["kv_lora_rank"]
            shapes.update(q=(heads * (qk + rope), H), kv_down=(kv_lora + rope, H), kv_norm=(kv_lora,),
                          kv_up=(heads * (qk + v), kv_lora), o=(H, heads * v))
            if q_lora:
                shapes.update(q_down=(q_lora, H), q_norm=(q_lora,), q_up=(heads * (qk + rope), q_lora))
        else:
            kv, groups = tc["kv_channels"], tc["num_query_groups"]
            shapes.update(q=(heads * kv, H), k=(groups * kv, H), v=(groups * kv, H), q_norm=(kv,), k_norm=(kv,),
                          o=(H, heads * kv), q_bias=(heads * kv,), k_bias=(groups * kv,), v_bias=(groups * kv,))
        if self.moe_layers:
            E, mf = tc["num_moe_experts"], tc["moe_ffn_hidden_size"]
            shapes.update(router=(E, H), router_bias=(E,), router_expert_bias=(E,),
                          expert_gate=(mf, H), expert_up=(mf, H), expert_down=(H, mf),
                          experts_gate_up=(E, H, 2 * mf), experts_gate_up_bias=(E, 2 * mf),
                          experts_down=(E, mf, H), experts_down_bias=(E, H))
            shared = tc.get("moe_shared_expert_intermediate_size")
            if shared:
                shapes.update(shared_gate=(shared, H), shared_up=(shared, H), shared_down=(H, shared))
        return shapes

    def full_shape(self, kind: str) -> tuple[int, ...]:
        if kind not in self._full:
            raise KeyError(f"{self.family.name}: no tensor of kind {kind!r} in this model")
        return self._full[kind]

    # ---- pieces ---------------------------------------------------------------------------------
    def _piece(self, kind: str, layer: Optional[int] = None, expert: Optional[int] = None, **cut) -> Piece:
        key = self.family.lm_head_key(self.hf) if kind == "lm_head" else self.family.hf_key(kind, layer, expert)
        return Piece(key, self.full_shape(kind), **cut)

    def _whole(self, name: str, kind: str, layer: Optional[int] = None, **flags) -> Shard:
        piece = self._piece(kind, layer)
        return Shard(name, piece.shape, (piece,), **flags)

    def _stack(self, name: str, pieces: list[Piece], **flags) -> Shard:
        rows = sum(p.shape[0] for p in pieces)
        return Shard(name, (rows,) + pieces[0].shape[1:], tuple(pieces), **flags)

    def _vocab_rows(self, name: str, kind: str) -> Shard:
        start, end = split_even(self.padded_vocab, self.layout.tp, self.coords.tp_rank, f"vocabulary {self.padded_vocab}")
        H = self.tc["hidden_size"]
        pieces = (self._piece(kind, rows=(start, min(end, self.vocab))),) if start < self.vocab else ()
        return Shard(name, (end - start, H), pieces, assemble="pad")

    def _column(self, name: str, kinds: tuple[str, ...], layer: int, rank: int, size: int,
                expert: Optional[int] = None, linear: bool = True) -> Shard:
        pieces = []
        for kind in kinds:
            full = self.full_shape(kind)
            pieces.append(self._piece(kind, layer, expert, rows=split_even(full[0], size, rank, self._what(kind, layer))))
        return self._stack(name, pieces, linear=linear)

    def _row(self, name: str, kind: str, layer: int, rank: int, size: int, expert: Optional[int] = None) -> Shard:
        full = self.full_shape(kind)
        piece = self._piece(kind, layer, expert, cols=split_even(full[1], size, rank, self._what(kind, layer)))
        return Shard(name, piece.shape, (piece,), linear=True)

    def _what(self, kind: str, layer: Optional[int]) -> str:
        return self.family.hf_key(kind, layer, 0)

    def _qkv(self, name: str, layer: int, bias: bool) -> Shard:
        tc = self.tc
        heads, groups, dim = tc["num_attention_heads"], tc["num_query_groups"], tc["kv_channels"]
        per_group = heads // groups
        g0, g1 = split_even(groups, self.layout.tp, self.coords.tp_rank, "query groups")
        suffix = "_bias" if bias else ""
        pieces = []
        for g in range(g0, g1):
            pieces.append(self._piece("q" + suffix, layer, rows=(g * per_group * dim, (g + 1) * per_group * dim)))
            pieces.append(self._piece("k" + suffix, layer, rows=(g * dim, (g + 1) * dim)))
            pieces.append(self._piece("v" + suffix, layer, rows=(g * dim, (g + 1) * dim)))
        return self._stack(name, pieces, linear=not bias)

    def _expert(self, name: str, layer: int, local: int, which: str, part: str) -> Shard:
        num_local = self.tc["num_moe_experts"] // self.layout.ep
        expert = self.coords.ep_rank * num_local + local
        rank, size = self.coords.etp_rank, self.layout.expert_tp
        if self.family.stacked_experts:
            return self._stacked_expert(name, layer, expert, which, part, rank, size)
        if part != "weight":
            raise KeyError(name)
        if which == "linear_fc1":
            return self._column(name, ("expert_gate", "expert_up"), layer, rank, size, expert)
        return self._row(name, "expert_down", layer, rank, size, expert)

    def _stacked_expert(self, name: str, layer: int, expert: int, which: str, part: str, rank: int, size: int) -> Shard:
        """Experts stacked [E, in, out] (GPT-OSS), gate and up interleaved by column: gate j is column 2j and
        up j column 2j+1, so an expert-TP slice of both is one contiguous column range."""
        mf = self.tc["moe_ffn_hidden_size"]
        a, b = split_even(mf, size, rank, self._what("experts_gate_up", layer))
        if which == "linear_fc1":
            if part == "bias":
                piece = self._piece("experts_gate_up_bias", layer, entry=expert, rows=(2 * a, 2 * b))
            else:
                piece = self._piece("experts_gate_up", layer, entry=expert, cols=(2 * a, 2 * b), transposed=True)
            return Shard(name, piece.shape, (piece,), assemble="deinterleave", linear=part == "weight")
        if part == "bias":  # a row-parallel bias is added once, after the reduction: whole
            piece = self._piece("experts_down_bias", layer, entry=expert)
            return Shard(name, piece.shape, (piece,))
        piece = self._piece("experts_down", layer, entry=expert, rows=(a, b), transposed=True)
        return Shard(name, piece.shape, (piece,), linear=True)

    # ---- Megatron name -> shard -----------------------------------------------------------------
    def shard(self, name: str) -> Shard:
        """The shard of Megatron parameter ``name`` (decoder layers numbered by their global id)."""
        if name == "embedding.word_embeddings.weight":
            return self._vocab_rows(name, "embed")
        if name == "output_layer.weight":
            return self._vocab_rows(name, "lm_head")
        if name == "decoder.final_layernorm.weight":
            return self._whole(name, "final_norm")
        match = _LAYER.match(name)
        if match is None:
            raise KeyError(name)
        layer, rest = int(match.group(1)), match.group(2)
        tp = (self.coords.tp_rank, self.layout.tp)
        if rest in _REPLICATED:
            return self._whole(name, _REPLICATED[rest], layer, fp32=rest in _FP32_BUFFERS)
        if rest == "mlp.router.local_tokens_per_expert":
            return Shard(name, (self.tc["num_moe_experts"],), (), fp32=True, loaded=False)
        if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            return self._qkv(name, layer, bias=rest.endswith("bias"))
        if rest in _COLUMN:
            return self._column(name, _COLUMN[rest], layer, *tp, linear=rest.endswith("weight"))
        if rest in _ROW:
            return self._row(name, _ROW[rest], layer, *tp)
        if rest in _LATENT_DOWN:
            if self.latent_down_split:
                return self._column(name, (_LATENT_DOWN[rest],), layer, *tp)
            return self._whole(name, _LATENT_DOWN[rest], layer, linear=True)
        expert = _LOCAL_EXPERT.match(rest) or _GROUPED_EXPERT.match(rest)
        if expert is not None:
            if expert.re is _LOCAL_EXPERT:
                return self._expert(name, layer, int(expert.group(1)), expert.group(2), expert.group(3))
            return self._expert(name, layer, int(expert.group(3)), expert.group(1), expert.group(2))
        raise KeyError(name)

    # ---- what a rank holds (Megatron's local spec) --------------------------------------------
    def layer_names(self, layer: int) -> list[str]:
        """The parameters and buffers of decoder layer ``layer`` as Megatron's local spec names them."""
        tc, p = self.tc, f"decoder.layers.{layer}."
        names = ["input_layernorm.weight"]
        if tc.get("multi_latent_attention"):
            if tc.get("q_lora_rank"):
                names += ["self_attention.linear_q_down_proj.weight", "self_attention.q_layernorm.weight",
                          "self_attention.linear_q_up_proj.weight"]
            else:
                names += ["self_attention.linear_q_proj.weight"]
            names += ["self_attention.linear_kv_down_proj.weight", "self_attention.kv_layernorm.weight",
                      "self_attention.linear_kv_up_proj.weight"]
        else:
            names += ["self_attention.linear_qkv.weight"]
            names += ["self_attention.linear_qkv.bias"] if tc.get("add_qkv_bias") else []
            names += ["self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"] \
                if tc.get("qk_layernorm") else []
        names += ["self_attention.linear_proj.weight"]
        names += ["self_attention.linear_proj.bias"] if tc.get("add_bias_linear") else []
        names += ["self_attention.core_attention.softmax_offset"] if tc.get("softmax_type") == "learnable" else []
        names += ["pre_mlp_layernorm.weight"]
        if layer in self.moe_layers:
            names += ["mlp.router.weight"] + (["mlp.router.bias"] if tc.get("add_bias_linear") else [])
            if tc.get("moe_router_enable_expert_bias"):
                names += ["mlp.router.expert_bias", "mlp.router.local_tokens_per_expert"]
            parts = ("weight", "bias") if tc.get("add_bias_linear") else ("weight",)
            for e in range(tc["num_moe_experts"] // self.layout.ep):
                names += [f"mlp.experts.local_experts.{e}.{fc}.{part}"
                          for fc in ("linear_fc1", "linear_fc2") for part in parts]
            if tc.get("moe_shared_expert_intermediate_size"):
                names += ["mlp.shared_experts.linear_fc1.weight", "mlp.shared_experts.linear_fc2.weight"]
        else:
            names += ["mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
        return [p + n for n in names]

    def stage_names(self, stage: int) -> list[str]:
        """Every parameter and buffer a rank of pipeline ``stage`` holds."""
        names = ["embedding.word_embeddings.weight"] if stage == 0 else []
        for layer in stage_layers(self.split, stage):
            names += self.layer_names(layer)
        if stage == self.layout.pp - 1:
            names.append("decoder.final_layernorm.weight")
            # A tied output layer is the embedding itself when one stage holds both, a copy otherwise.
            if not (self.hf.get("tie_word_embeddings", False) and self.layout.pp == 1):
                names.append("output_layer.weight")
        return names

    def stage_shards(self, stage: int) -> list[Shard]:
        return [self.shard(name) for name in self.stage_names(stage)]


# ----------------------------------------------------------------------------------------------
# Block-FP8: which layouts keep whole blocks
# ----------------------------------------------------------------------------------------------


def block_problems(shard: Shard, block: Span) -> list[str]:
    """Why ``shard`` (a linear weight) would put parts of different ``block`` s into one tile of the rank's
    tensor: a piece that starts inside a block, or one that ends inside a block with another piece stacked
    after it. Empty when every tile of the rank's tensor comes from one checkpoint block."""
    br, bc = block
    problems = []
    for i, piece in enumerate(shard.pieces):
        (r0, r1), cols = piece.row_span, piece.col_span
        followed = i + 1 < len(shard.pieces)
        if r0 % br or (followed and (r1 - r0) % br):
            problems.append(f"{piece.key} rows [{r0}, {r1}) of {piece.matrix[0]} do not start and end on the "
                            f"{br}-row blocks")
        if cols is not None and cols[0] % bc:
            problems.append(f"{piece.key} columns [{cols[0]}, {cols[1]}) of {piece.matrix[1]} do not start on the "
                            f"{bc}-column blocks")
    return problems
