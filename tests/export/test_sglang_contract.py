"""docs/design.md §5: the SGLang export has exactly the contract's keys, shapes, dtypes and config fields."""

import json
import os
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from specforge_mcore.cli import main as cli_main
from specforge_mcore.errors import UserError
from specforge_mcore.export import contract, io
from specforge_mcore.export.io import export_checkpoint, load_export, write_export
from specforge_mcore.rope import RopeTable


# Written out by hand, not derived from the contract module: this is the contract.
SGLANG_KEYS = {
    "fc.weight",
    "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight", "midlayer.self_attn.o_proj.weight",
    "midlayer.mlp.gate_proj.weight", "midlayer.mlp.up_proj.weight", "midlayer.mlp.down_proj.weight",
    "midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight", "midlayer.post_attention_layernorm.weight",
    "norm.weight", "lm_head.weight", "d2t", "t2d",
}


def read(export_dir):
    with open(os.path.join(export_dir, "config.json"), encoding="utf-8") as fh:
        return json.load(fh), load_file(os.path.join(export_dir, "model.safetensors"))


def test_exact_keys_shapes_and_dtypes(checkpoint, tmp_path):
    ckpt, draft = checkpoint
    out = export_checkpoint(ckpt, str(tmp_path / "export"))
    cfg, tensors = read(out)
    assert set(tensors) == SGLANG_KEYS
    assert not any("embed_tokens" in k for k in tensors)
    # Target: hidden 64, 4 heads / 2 KV heads of 16, intermediate 128, vocab 512; draft vocab 100.
    shapes = {k: list(v.shape) for k, v in tensors.items()}
    assert shapes == {
        "fc.weight": [64, 192],
        "midlayer.self_attn.q_proj.weight": [64, 128], "midlayer.self_attn.k_proj.weight": [32, 128],
        "midlayer.self_attn.v_proj.weight": [32, 128], "midlayer.self_attn.o_proj.weight": [64, 64],
        "midlayer.mlp.gate_proj.weight": [128, 64], "midlayer.mlp.up_proj.weight": [128, 64],
        "midlayer.mlp.down_proj.weight": [64, 128],
        "midlayer.input_layernorm.weight": [64], "midlayer.hidden_norm.weight": [64],
        "midlayer.post_attention_layernorm.weight": [64], "norm.weight": [64],
        "lm_head.weight": [100, 64], "d2t": [100], "t2d": [512],
    }
    for key, tensor in tensors.items():
        expected = {"d2t": torch.int64, "t2d": torch.bool}.get(key, torch.bfloat16)
        assert tensor.dtype == expected, key
    state = draft.trainable_state_dict()
    for key, tensor in tensors.items():
        ours = state[key].to(torch.bfloat16) if state[key].is_floating_point() else state[key]
        assert torch.equal(tensor, ours), key
    # d2t holds offsets: draft id i is target id i + d2t[i], and t2d marks exactly those.
    target_ids = tensors["d2t"] + torch.arange(100)
    assert torch.equal(torch.nonzero(tensors["t2d"]).flatten(), target_ids)


def test_config_fields(checkpoint, tmp_path, llama_target):
    ckpt, draft = checkpoint
    cfg, _ = read(export_checkpoint(ckpt, str(tmp_path / "export")))
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    expected = {
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 1, "vocab_size": 512,
        "draft_vocab_size": 100, "rms_norm_eps": 1e-6, "hidden_act": "silu", "max_position_embeddings": 2048,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "rope_theta": 10000.0,
    }
    assert {k: cfg[k] for k in expected} == expected
    # Output-of-layer convention, exactly the ids the draft was trained on (SGLang adds one itself).
    assert cfg["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [1, 3, 4], "use_aux_hidden_state": True}
    assert "target_hidden_size" not in cfg  # only written when it differs from hidden_size
    assert cfg["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "default"}


LEGACY_LLAMA3 = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                     max_position_embeddings=8192, rope_theta=500000.0,
                     rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192})
NEW_STYLE = dict(LEGACY_LLAMA3, rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"})
del NEW_STYLE["rope_theta"], NEW_STYLE["rope_scaling"]


@pytest.mark.parametrize("hf, base", [(LEGACY_LLAMA3, 500000.0), (NEW_STYLE, 1000000.0)], ids=["legacy", "rope_parameters"])
def test_rope_base_survives(hf, base, tmp_path, random_draft, arch_for):
    from transformers import LlamaConfig

    draft = random_draft(arch_for(hf, capture=(1, 2, 4)))
    out = write_export(draft, str(tmp_path / "export"))
    cfg, _ = read(out)
    assert cfg["rope_theta"] == base and cfg["rope_parameters"]["rope_theta"] == base
    if "rope_scaling" in hf:  # the scaling survives both spellings too
        assert cfg["rope_parameters"]["rope_type"] == "llama3" and cfg["rope_scaling"]["rope_type"] == "llama3"
        assert cfg["rope_scaling"]["factor"] == 8.0
    # A transformers 5.x loader (what SGLang builds its config with) reads the same base...
    assert LlamaConfig.from_pretrained(out).rope_parameters["rope_theta"] == base
    # ...and so does ours: identical rotary frequencies after the round trip.
    loaded = load_export(out)
    assert torch.equal(loaded.rope.inv_freq, draft.rope.inv_freq)
    assert torch.equal(loaded.rope.inv_freq, RopeTable({"rope_parameters": draft.arch.rope}, 16).inv_freq)


def test_target_hidden_size_written_when_it_differs(llama_target, tmp_path, random_draft, arch_for):
    _, hf = llama_target
    arch = replace(arch_for(hf), target_hidden_size=96)
    draft = random_draft(arch)
    cfg, tensors = read(write_export(draft, str(tmp_path / "export")))
    assert cfg["target_hidden_size"] == 96
    assert list(tensors["fc.weight"].shape) == [64, 3 * 96]


def test_per_layer_norm_draft_uses_sglang_fc_norm(llama_target, tmp_path, random_draft, arch_for):
    _, hf = llama_target
    draft = random_draft(arch_for(hf, per_layer_norm=True))
    cfg, tensors = read(write_export(draft, str(tmp_path / "export")))
    assert cfg["fc_norm"] is True
    assert set(tensors) == SGLANG_KEYS | {"fc_norm.0.weight", "fc_norm.1.weight", "fc_norm.2.weight"}
    assert torch.equal(tensors["fc_norm.1.weight"], draft.layer_norms[1].weight.detach().to(torch.bfloat16))


def test_readme_has_the_serving_line(checkpoint, tmp_path, llama_target):
    ckpt, _ = checkpoint
    out = export_checkpoint(ckpt, str(tmp_path / "export"))
    with open(os.path.join(out, "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    line = (f"python -m sglang.launch_server --model {llama_target[0]} --speculative-algorithm EAGLE3 "
            f"--speculative-draft-model-path {out} --speculative-num-steps 3 --speculative-eagle-topk 1 "
            f"--speculative-num-draft-tokens 4")
    assert line in text.splitlines()


def test_readme_placeholder_without_target_dir(llama_target, tmp_path, random_draft, arch_for, write_checkpoint):
    _, hf = llama_target
    ckpt = write_checkpoint(random_draft(arch_for(hf)), str(tmp_path / "ckpt"), target_dir=None)
    out = export_checkpoint(ckpt, str(tmp_path / "export"))
    with open(os.path.join(out, "README.md"), encoding="utf-8") as fh:
        assert f"--model {io.TARGET_PLACEHOLDER} " in fh.read()


def test_overwrite_is_refused_without_the_flag(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    out = str(tmp_path / "export")
    assert cli_main(["export", "--checkpoint", ckpt, "--out", out]) == 0
    assert cli_main(["export", "--checkpoint", ckpt, "--out", out]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert cli_main(["export", "--checkpoint", ckpt, "--out", out, "--overwrite", "--dtype", "fp32"]) == 0
    cfg, tensors = read(out)
    assert cfg["torch_dtype"] == "float32" and tensors["fc.weight"].dtype == torch.float32
    # --overwrite never deletes a directory that is not an export.
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an export"):
        export_checkpoint(ckpt, str(other), overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"


def test_failed_write_leaves_nothing_or_the_previous_export(checkpoint, tmp_path, monkeypatch):
    ckpt, _ = checkpoint
    out = tmp_path / "export"

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_safetensors", broken_save)
    # A failed write is one user-facing error naming the export (the CLI prints one line, exit status 2).
    with pytest.raises(UserError, match=rf"writing the export to {out} failed: disk full"):
        export_checkpoint(ckpt, str(out))
    assert sorted(os.listdir(tmp_path)) == ["checkpoints"]  # no export, no temporary directory
    monkeypatch.undo()

    export_checkpoint(ckpt, str(out))
    before = read(str(out))
    monkeypatch.setattr(io, "save_safetensors", broken_save)
    with pytest.raises(UserError, match=rf"the existing {out} is untouched"):
        export_checkpoint(ckpt, str(out), overwrite=True, dtype="fp32")
    after = read(str(out))
    assert after[0] == before[0] and all(torch.equal(after[1][k], before[1][k]) for k in before[1])
    assert sorted(os.listdir(tmp_path)) == ["checkpoints", "export"]


def test_exporter_refuses_a_renamed_key(checkpoint, tmp_path, monkeypatch):
    from specforge_mcore.export import sglang

    ckpt, _ = checkpoint
    original = sglang.tensors

    def renamed(state, arch):
        out = original(state, arch)
        out["midlayer.self_attn.k_projection.weight"] = out.pop("midlayer.self_attn.k_proj.weight")
        return out

    monkeypatch.setattr(sglang, "tensors", renamed)
    with pytest.raises(contract.ContractError, match=r"'midlayer\.self_attn\.k_proj\.weight' is missing"):
        export_checkpoint(ckpt, str(tmp_path / "export"))
    assert not (tmp_path / "export").exists()


def test_validate_names_the_offending_key(checkpoint, tmp_path):
    ckpt, draft = checkpoint
    out = export_checkpoint(ckpt, str(tmp_path / "export"))
    cfg, tensors = read(out)
    arch, bf16 = draft.arch, torch.bfloat16
    contract.validate(tensors, cfg, arch, "sglang", bf16, "x")  # the export itself passes

    def fails(pattern, tensors=tensors, cfg=cfg):
        with pytest.raises(contract.ContractError, match=pattern):
            contract.validate(tensors, cfg, arch, "sglang", bf16, "x")

    fails(r"unexpected tensor 'embed_tokens.weight'", tensors=dict(tensors, **{"embed_tokens.weight": torch.zeros(512, 64, dtype=bf16)}))
    fails(r"'norm.weight' is missing", tensors={k: v for k, v in tensors.items() if k != "norm.weight"})
    fails(r"'lm_head.weight' has shape \[99, 64\]", tensors=dict(tensors, **{"lm_head.weight": tensors["lm_head.weight"][:99]}))
    fails(r"'fc.weight' has dtype torch.float32", tensors=dict(tensors, **{"fc.weight": tensors["fc.weight"].float()}))
    nan = tensors["norm.weight"].clone()
    nan[3] = float("nan")
    fails(r"'norm.weight' holds non-finite", tensors=dict(tensors, **{"norm.weight": nan}))
    fails(r"d2t maps two draft ids", tensors=dict(tensors, d2t=torch.zeros_like(tensors["d2t"]).index_fill_(0, torch.tensor([1]), -1)))
    fails(r"eagle_config.eagle_aux_hidden_state_layer_ids=\[2, 4, 5\]",
          cfg=dict(cfg, eagle_config={"eagle_aux_hidden_state_layer_ids": [2, 4, 5], "use_aux_hidden_state": True}))
    fails(r"lacks 'rope_theta'", cfg={k: v for k, v in cfg.items() if k != "rope_theta"})
    fails(r"tie_word_embeddings=True", cfg=dict(cfg, tie_word_embeddings=True))
    # load_export runs the same check on a directory with a renamed key, and names it.
    tensors = dict(tensors)
    tensors["midlayer.mlp.gate.weight"] = tensors.pop("midlayer.mlp.gate_proj.weight")
    save_file(tensors, os.path.join(out, "model.safetensors"))
    with pytest.raises(contract.ContractError, match=r"'midlayer\.mlp\.gate_proj\.weight' is missing"):
        load_export(out)


def test_fp16_overflow_is_caught(checkpoint, tmp_path):
    ckpt, draft = checkpoint
    with torch.no_grad():
        draft.midlayer.mlp.up_proj.weight[0, 0] = 1e6
    with pytest.raises(contract.ContractError, match=r"'midlayer\.mlp\.up_proj\.weight' holds non-finite"):
        write_export(draft, str(tmp_path / "export"), dtype="fp16")


def test_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        export_checkpoint(str(tmp_path / "nope"), str(tmp_path / "export"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no draft_arch.json"):
        export_checkpoint(str(tmp_path / "empty"), str(tmp_path / "export"))
