"""The vLLM speculators layout: Eagle3DraftModel, speculators_config, transformer_layer_config, layers.0.*."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from specforge_mcore.export import contract
from specforge_mcore.export.io import export_checkpoint, load_export, write_export

SPECULATORS_KEYS = {
    "fc.weight",
    "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight",
    "layers.0.self_attn.v_proj.weight", "layers.0.self_attn.o_proj.weight",
    "layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight",
    "layers.0.input_layernorm.weight", "layers.0.hidden_norm.weight", "layers.0.post_attention_layernorm.weight",
    "norm.weight", "lm_head.weight", "d2t", "t2d",
}


def read(export_dir):
    with open(os.path.join(export_dir, "config.json"), encoding="utf-8") as fh:
        return json.load(fh), load_file(os.path.join(export_dir, "model.safetensors"))


def test_keys_and_config(checkpoint, tmp_path, llama_target):
    ckpt, draft = checkpoint
    cfg, tensors = read(export_checkpoint(ckpt, str(tmp_path / "export"), layout="speculators"))
    assert set(tensors) == SPECULATORS_KEYS
    state = draft.trainable_state_dict()
    for key, tensor in tensors.items():
        ours = state[key.replace("layers.0.", "midlayer.", 1)]
        assert torch.equal(tensor, ours.to(torch.bfloat16) if ours.is_floating_point() else ours), key
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool

    assert cfg["architectures"] == ["Eagle3DraftModel"]
    assert cfg["speculators_model_type"] == "eagle3"
    assert cfg["draft_vocab_size"] == 100
    assert cfg["norm_before_residual"] is False  # vLLM assumes true when the field is absent
    # vLLM captures the *input* of each listed layer: output of layers [1, 3, 4] = input of [2, 4, 5].
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    layer = cfg["transformer_layer_config"]
    assert {k: layer[k] for k in ("model_type", "hidden_size", "intermediate_size", "num_attention_heads",
                                  "num_key_value_heads", "head_dim", "num_hidden_layers", "vocab_size",
                                  "rope_theta", "tie_word_embeddings")} == {
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 1, "vocab_size": 512,
        "rope_theta": 10000.0, "tie_word_embeddings": False}
    # The fields vLLM's speculators config reader requires (it raises on any of them missing).
    spec = cfg["speculators_config"]
    assert spec["algorithm"] == "eagle3" and spec["default_proposal_method"] == "greedy"
    assert spec["proposal_methods"][0]["proposal_type"] == "greedy"
    assert spec["proposal_methods"][0]["speculative_tokens"] == 3
    assert spec["verifier"] == {"name_or_path": llama_target[0], "architectures": ["LlamaForCausalLM"]}
    assert isinstance(layer, dict)


def test_full_vocabulary_draft_has_no_mapping(llama_target, tmp_path, random_draft, arch_for):
    _, hf = llama_target
    draft = random_draft(arch_for(hf, draft_vocab_size=512))
    cfg, tensors = read(write_export(draft, str(tmp_path / "export"), layout="speculators"))
    assert set(tensors) == SPECULATORS_KEYS - {"d2t", "t2d"}
    loaded = load_export(str(tmp_path / "export"))
    assert not loaded.d2t.any() and loaded.t2d.all()


def test_renamed_key_fails_the_check(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    out = export_checkpoint(ckpt, str(tmp_path / "export"), layout="speculators")
    tensors = load_file(os.path.join(out, "model.safetensors"))
    tensors["midlayer.hidden_norm.weight"] = tensors.pop("layers.0.hidden_norm.weight")  # SGLang's name: wrong here
    save_file(tensors, os.path.join(out, "model.safetensors"))
    with pytest.raises(contract.ContractError, match=r"'layers\.0\.hidden_norm\.weight' is missing"):
        load_export(out)


def test_per_layer_norm_is_refused(llama_target, tmp_path, random_draft, arch_for):
    _, hf = llama_target
    draft = random_draft(arch_for(hf, per_layer_norm=True))
    with pytest.raises(contract.ContractError, match="--format sglang"):
        write_export(draft, str(tmp_path / "export"), layout="speculators")
    assert not (tmp_path / "export").exists()
