"""Bad targets and layouts give one clear error naming the value and what was expected."""

import json
import os
import shutil

import pytest

from specforge_mcore.errors import UserError
from specforge_mcore.parallel import SpawnError, spawn
from specforge_mcore.target.build import Layout, check_layout, read_hf_config
from specforge_mcore.target.sharding import pipeline_split
from specforge_mcore.target.families import family_for
from specforge_mcore.target.load import SafetensorsReader
from specforge_mcore.target.random import random_target
from specforge_mcore.target.verify import layout_worker, random_inputs


def _hf(family):
    return read_hf_config(random_target(family))


def test_unknown_architecture_lists_supported():
    with pytest.raises(UserError, match=r"unknown architecture.*FalconForCausalLM.*supported: .*LlamaForCausalLM"):
        family_for({"architectures": ["FalconForCausalLM"]})


@pytest.mark.parametrize("family,layout,pattern", [
    ("llama", Layout(tp=3), r"num_attention_heads=4 is not divisible by tp=3 \(tp must divide it: \[1, 2, 4\]\)"),
    ("llama", Layout(tp=4), r"num_key_value_heads=2 is not divisible by tp=4"),
    ("qwen3_moe", Layout(ep=3), r"4 experts are not divisible by ep=3"),
    ("llama", Layout(pp=9), r"num_hidden_layers=8 cannot be split over pp=9 stages"),
    ("llama", Layout(ep=2), r"ep/etp only apply to MoE targets"),
    ("llama", Layout(sp=True), r"sequence parallelism \(sp\) needs tp > 1"),
])
def test_layout_that_does_not_divide(family, layout, pattern):
    hf = _hf(family)
    with pytest.raises(UserError, match=pattern):
        check_layout(hf, family_for(hf), layout, 16, "config.json")


def test_world_size_must_fit_layout():
    hf = _hf("llama")
    with pytest.raises(UserError, match=r"world size 3 is not divisible by tp\*pp=2"):
        check_layout(hf, family_for(hf), Layout(tp=2), 3, "config.json")


def test_uneven_pipeline_split_is_balanced():
    assert pipeline_split(30, 4) == [7, 8, 8, 7]  # SmolLM2 on PP4
    assert pipeline_split(30, 2) == [15, 15]
    assert pipeline_split(94, 4) == [23, 24, 24, 23]  # Qwen3-235B-A22B
    assert sum(pipeline_split(61, 8)) == 61


@pytest.mark.parametrize("change,pattern", [
    ({"use_sliding_window": True, "sliding_window": 128}, r"sliding-window attention .* not supported for qwen3"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, r"rope_type='yarn' is not supported"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported"),
])
def test_feature_the_family_lacks(change, pattern):
    hf = dict(_hf("qwen3"), **change)
    with pytest.raises(UserError, match=pattern):
        family_for(hf).check(hf, "config.json")


def test_missing_shard_file(tmp_path):
    src = random_target("llama")
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    os.rename(dst / "model.safetensors", dst / "model-00001-of-00002.safetensors")
    with open(dst / "model.safetensors.index.json", "w") as fh:
        json.dump({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors",
                                  "lm_head.weight": "model-00002-of-00002.safetensors"}}, fh)
    with pytest.raises(UserError, match=r"lists model-00002-of-00002.safetensors, which is not in"):
        SafetensorsReader(str(dst))


def test_no_weights(tmp_path):
    shutil.copy(os.path.join(random_target("llama"), "config.json"), tmp_path / "config.json")
    with pytest.raises(UserError, match=r"no \*.safetensors weights"):
        SafetensorsReader(str(tmp_path))


def test_weights_that_do_not_match_config(tmp_path):
    """config.json says hidden 64; the weights were written for another size."""
    dst = tmp_path / "model"
    shutil.copytree(random_target("llama", {"hidden_size": 32, "head_dim": 8}), dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(hidden_size=64, head_dim=16)
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpawnError, match=r"model.safetensors: model.embed_tokens.weight has shape \[512, 32\], but config.json "
                                         r"implies \[512, 64\] \(checkpoint does not match config.json\?\)"):
        spawn(layout_worker, 1, str(dst), [Layout()], [random_inputs(512, seed=0)])


def _copy_of(family, tmp_path):
    target = tmp_path / "target"
    shutil.copytree(random_target(family), target)
    return target


def test_truncated_weight_shard_is_named(tmp_path):
    target = _copy_of("llama", tmp_path)
    weights = target / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])  # the tail of the last tensor is gone
    with pytest.raises(UserError, match=rf"{weights}: not a readable safetensors file .*file not fully covered"):
        SafetensorsReader(str(target))
    weights.write_bytes(b"\x00" * 64)  # not safetensors at all
    with pytest.raises(UserError, match=rf"{weights}: not a readable safetensors file"):
        SafetensorsReader(str(target))


@pytest.mark.parametrize("edit,pattern", [
    (lambda c: c.pop("num_hidden_layers"), r"config.json: missing num_hidden_layers"),
    (lambda c: c.update(hidden_size="64"), r"config.json: hidden_size='64': expected positive integers"),
])
def test_config_json_with_missing_or_wrong_fields(tmp_path, edit, pattern):
    target = _copy_of("llama", tmp_path)
    config = json.loads((target / "config.json").read_text())
    edit(config)
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=pattern):
        read_hf_config(str(target))


def test_config_json_that_is_not_json(tmp_path):
    target = _copy_of("llama", tmp_path)
    (target / "config.json").write_text('{"hidden_size": 64')
    with pytest.raises(UserError, match=r"config.json: not valid JSON"):
        read_hf_config(str(target))


def test_tensor_missing_from_the_index_is_named(tmp_path):
    """A sharded checkpoint whose index forgot a tensor: the first rank that needs it names the tensor."""
    from specforge_mcore.target.sharding import ShardingRules

    target = _copy_of("qwen3", tmp_path)
    reader = SafetensorsReader(str(target))
    missing = "model.layers.3.mlp.down_proj.weight"
    weight_map = {key: "model.safetensors" for key in reader.key_to_file if key != missing}
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    hf = read_hf_config(str(target))
    rules = ShardingRules(hf, family_for(hf), Layout(tp=2))
    shard = rules.shard("decoder.layers.3.mlp.linear_fc2.weight")
    with pytest.raises(UserError, match=rf"{target}: the checkpoint has no tensor '{missing}' \({len(weight_map)} tensors"):
        SafetensorsReader(str(target)).read_piece(shard.pieces[0])
