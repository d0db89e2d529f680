"""The sharding rules are the one source of the target's geometry; these tests hold them to the truth.

* The pieces of all ranks of a layout tile every HF tensor of the checkpoint: each element is read the
  same number of times (once per rank that replicates it), none is missed, no tensor is forgotten.
* Megatron, built for real (every family, several layouts, 4 spawned gloo ranks), holds exactly the
  parameters and buffers the rules list for each rank, in the shapes they give; the loader reads those
  shards, and the planner's byte count of each stage is the sum of the same shards (checked against the
  bytes the built model holds).
* The FP8 layout check reads the same descriptions (tests/target/test_fp8.py compares it with the tiles
  of the data).
"""

import pytest
import torch

from specforge_mcore.parallel import spawn
from specforge_mcore.target.build import Layout, read_hf_config
from specforge_mcore.target.families import family_for
from specforge_mcore.target.load import SafetensorsReader
from specforge_mcore.target.random import random_target
from specforge_mcore.target.sharding import Coords, ShardingRules, pipeline_split, stage_of_layer
from specforge_mcore.train.plan import stage_weight_bytes

FAMILIES = ["llama", "qwen3", "qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"]
MOE = {"qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"}
LAYOUTS = [Layout(), Layout(tp=2), Layout(pp=2), Layout(tp=2, pp=4)]
MOE_LAYOUTS = LAYOUTS + [Layout(ep=2), Layout(ep=4, tp=2), Layout(tp=2, ep=2, etp=1), Layout(tp=2, etp=2, ep=2, pp=2)]


def _coverage(hf: dict, family, layout: Layout, reader: SafetensorsReader) -> dict[str, torch.Tensor]:
    """How many ranks read each element of each HF tensor, over every rank of ``layout`` (one DP replica)."""
    counts: dict[str, torch.Tensor] = {}
    for stage in range(layout.pp):
        for tp_rank in range(layout.tp):
            for ep_rank in range(layout.ep):
                for etp_rank in range(layout.expert_tp):
                    rules = ShardingRules(hf, family, layout, Coords(tp_rank, ep_rank, etp_rank))
                    for shard in rules.stage_shards(stage):
                        for piece in shard.pieces:
                            assert list(piece.full) == reader.shape(piece.key), f"{piece.key}: full shape"
                            count = counts.setdefault(piece.key, torch.zeros(piece.full, dtype=torch.int32))
                            view = count[piece.entry] if piece.entry is not None else count
                            (r0, r1), cols = piece.row_span, piece.col_span
                            view = view[r0:r1]
                            if cols is not None:
                                view = view[:, cols[0]:cols[1]]
                            view += 1
    return counts


@pytest.mark.parametrize("family_name", FAMILIES)
def test_pieces_tile_every_tensor_of_the_checkpoint(family_name):
    hf_dir = random_target(family_name)
    hf = read_hf_config(hf_dir)
    family = family_for(hf)
    reader = SafetensorsReader(hf_dir)
    for layout in MOE_LAYOUTS if family_name in MOE else LAYOUTS:
        counts = _coverage(hf, family, layout, reader)
        assert set(counts) == set(reader.key_to_file), f"{family_name} {layout}: tensors never read " \
            f"{sorted(set(reader.key_to_file) - set(counts))[:3]}, read but absent {sorted(set(counts) - set(reader.key_to_file))[:3]}"
        replicas = layout.tp * layout.ep * layout.expert_tp
        # A tied output layer is a second copy of the embedding on the last stage.
        copies = {family.hf_key("embed"): 2} if hf.get("tie_word_embeddings") and layout.pp > 1 else {}
        for key, count in counts.items():
            low, high = int(count.min()), int(count.max())
            assert low == high, f"{family_name} {layout}: {key} read {low} to {high} times (missed or overlapping)"
            low //= copies.get(key, 1)
            assert replicas % low == 0, f"{family_name} {layout}: {key} read {low} times by {replicas} rank coordinates"
            if "experts" in key and "shared" not in key and layout.ep > 1:
                assert low < replicas, f"{family_name} {layout}: expert tensor {key} read by every EP rank"


def test_stage_of_layer_follows_the_split():
    for layers, pp in [(8, 1), (8, 2), (8, 4), (61, 8), (94, 4), (36, 3)]:
        split = pipeline_split(layers, pp)
        owners = [stage_of_layer(i, split) for i in range(layers)]
        assert owners == sorted(owners) and [owners.count(s) for s in range(pp)] == split


# ---- against Megatron, built for real -------------------------------------------------------------


def _built_worker(rank: int, world: int, cases: list[tuple[str, Layout]]) -> list[dict]:
    from megatron.core import parallel_state as ps

    from specforge_mcore.parallel import init_distributed
    from specforge_mcore.target.build import build_stage_model, init_model_parallel
    from specforge_mcore.target.fp8 import module_bytes

    init_distributed()
    out = []
    for family_name, layout in cases:
        init_model_parallel(layout)
        stage = build_stage_model(read_hf_config(random_target(family_name)), layout)
        layer_ids = stage.layer_ids

        def global_name(name: str) -> str:
            parts = name.split(".")
            if name.startswith("decoder.layers."):
                parts[2] = str(layer_ids[int(parts[2])])
            return ".".join(parts)

        held = {global_name(n): tuple(t.shape) for n, t in list(stage.model.named_parameters()) + list(stage.model.named_buffers())}
        out.append(dict(family=family_name, layout=str(layout), held=held, bytes=module_bytes(stage.model),
                        pp=ps.get_pipeline_model_parallel_rank(), use_te=stage.use_te,
                        coords=(ps.get_tensor_model_parallel_rank(), ps.get_expert_model_parallel_rank(),
                                ps.get_expert_tensor_parallel_rank())))
        del stage
        ps.destroy_model_parallel()
    return out


@pytest.mark.slow
def test_megatron_holds_what_the_rules_describe():
    cases = [(f, Layout()) for f in FAMILIES]
    cases += [("llama", Layout(tp=2, pp=2)), ("qwen3", Layout(tp=2)), ("qwen3_moe", Layout(tp=2, ep=2, etp=1, pp=2)),
              ("mixtral", Layout(ep=4)), ("deepseek_v3", Layout(tp=2, ep=2, etp=1, pp=2)), ("gpt_oss", Layout(tp=2, ep=2, etp=1, pp=2))]
    results = spawn(_built_worker, 4, cases, threads=1)
    for per_rank in results:
        for (family_name, layout), got in zip(cases, per_rank):
            hf = read_hf_config(random_target(family_name))
            rules = ShardingRules(hf, family_for(hf), layout, Coords(*got["coords"]), latent_down_split=not got["use_te"])
            listed = {name: rules.shard(name).shape for name in rules.stage_names(got["pp"])}
            where = f"{family_name} {layout} rank {got['coords']} stage {got['pp']}"
            assert set(got["held"]) == set(listed), \
                f"{where}: Megatron holds {sorted(set(got['held']) - set(listed))[:4]} beyond the rules, " \
                f"the rules list {sorted(set(listed) - set(got['held']))[:4]} that Megatron does not hold"
            for name, shape in listed.items():
                assert got["held"][name] == shape, f"{where}: {name} is {got['held'][name]} in Megatron, {shape} by the rules"
            planned = stage_weight_bytes(hf, family_for(hf), layout, 4)[got["pp"]]
            assert got["bytes"] == planned, f"{where}: holds {got['bytes']} bytes, the planner says {planned}"
