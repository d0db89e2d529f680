"""``import-draft``: drafts written by other tools become checkpoints of ours, and export gives back the
same tensors.

Each foreign layout is made from one of our own exports, renamed and re-configured the way that tool
writes it (SGLang / SpecForge: our export as is; the EAGLE reference: no eagle_config, fp16 in
pytorch_model.bin; ModelOpt: ``layers.0.*``, ``d2t`` without ``t2d``, ModelOpt's eagle_config flags;
vLLM speculators: our speculators export). The vocabulary mapping and the captured-layer ids must come
through untouched.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from specforge_mcore.cli import main as cli_main
from specforge_mcore.draft.io import load_draft
from specforge_mcore.errors import UserError
from specforge_mcore.export.importer import import_draft
from specforge_mcore.export.io import export_checkpoint, write_export
from specforge_mcore.train.checkpoint import read_trainer_state


def _files(directory):
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as fh:
        return json.load(fh), load_file(os.path.join(directory, "model.safetensors"))


def _write(directory, cfg, tensors, bin_file=False):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(cfg, fh, indent=2)
    if bin_file:
        torch.save(tensors, os.path.join(directory, "pytorch_model.bin"))
    else:
        save_file(tensors, os.path.join(directory, "model.safetensors"))
    return str(directory)


def as_modelopt(sglang_dir, out):
    """ModelOpt's deployment export of the same draft: its config template, layers.0.*, d2t only."""
    cfg, tensors = _files(sglang_dir)
    keep = ["hidden_act", "hidden_size", "intermediate_size", "max_position_embeddings", "num_attention_heads",
            "num_key_value_heads", "num_hidden_layers", "rms_norm_eps", "torch_dtype", "vocab_size",
            "draft_vocab_size", "rope_scaling", "attention_bias", "head_dim", "mlp_bias", "rope_theta"]
    modelopt_cfg = {k: cfg[k] for k in keep}
    modelopt_cfg.update(architectures=["LlamaForCausalLMEagle3"], model_type="llama", tie_word_embeddings=False,
                        bos_token_id=1, eos_token_id=2, pad_token_id=None, initializer_range=0.02, use_cache=True,
                        attention_dropout=0.0, pretraining_tp=1, transformers_version="4.57.1",
                        eagle_config={"eagle_aux_hidden_state_layer_ids": cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"],
                                      "use_aux_hidden_state": True, "use_input_layernorm_in_first_layer": True,
                                      "use_last_layernorm": True, "use_mtp_layernorm": False,
                                      "next_layer_regular": True, "parallel_draft_step": 1,
                                      "parallel_draft_heads_num_layers": None})
    renamed = {("layers.0." + k[len("midlayer."):] if k.startswith("midlayer.") else k): v
               for k, v in tensors.items() if k != "t2d"}
    return _write(out, modelopt_cfg, renamed)


def as_eagle_reference(sglang_dir, out):
    """The EAGLE reference code's checkpoint: no eagle_config (the target's default layers), fp16 .bin."""
    cfg, tensors = _files(sglang_dir)
    cfg = {k: v for k, v in cfg.items() if k not in ("eagle_config", "rope_parameters", "dtype")}
    cfg["torch_dtype"] = "float16"
    return _write(out, cfg, {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, bin_file=True)


def same_tensors(a_dir, b_dir):
    (_, a), (_, b) = _files(a_dir), _files(b_dir)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# ---- import -> export gives back the same tensors ------------------------------------------------------


@pytest.mark.parametrize("layout,dtype", [("sglang", "bf16"), ("sglang", "fp32"), ("speculators", "bf16"),
                                          ("modelopt", "bf16")])
def test_import_then_export_gives_back_the_same_tensors(layout, dtype, llama_target, tmp_path, random_draft, arch_for):
    target_dir, hf = llama_target
    draft = random_draft(arch_for(hf, capture=(1, 3, 5)))
    ours = write_export(draft, str(tmp_path / "ours"), layout="speculators" if layout == "speculators" else "sglang",
                        dtype=dtype)
    source = as_modelopt(ours, tmp_path / "modelopt") if layout == "modelopt" else ours
    result = import_draft(source, str(tmp_path / "ckpt"), target=target_dir)
    assert result.layout == layout
    assert result.arch.capture_layer_ids == [1, 3, 5]  # speculators' [2, 4, 6] converted back
    ckpt = str(tmp_path / "ckpt")
    assert sorted(os.listdir(ckpt)) == ["COMPLETE", "MANIFEST.json", "config.yaml", "draft.safetensors", "draft_arch.json",
                                        "trainer_state.json", "vocab.safetensors"]
    state = read_trainer_state(ckpt)
    assert state["step"] == 0 and state["format"] == layout and state["imported_from"] == os.path.abspath(source)
    imported = load_draft(ckpt)
    assert torch.equal(imported.d2t, draft.d2t) and torch.equal(imported.t2d, draft.t2d)  # the mapping is kept
    back = export_checkpoint(ckpt, str(tmp_path / "back"), layout="speculators" if layout == "speculators" else "sglang",
                             dtype=dtype)
    same_tensors(ours, back)
    assert _files(back)[0]["eagle_config" if layout != "speculators" else "eagle_aux_hidden_state_layer_ids"] == \
        _files(ours)[0]["eagle_config" if layout != "speculators" else "eagle_aux_hidden_state_layer_ids"]
    with open(os.path.join(back, "README.md")) as fh:  # config.yaml carries the target to the export
        assert target_dir in fh.read()


def test_eagle_reference_checkpoint_takes_the_targets_default_layers(llama_target, tmp_path, random_draft, arch_for):
    target_dir, hf = llama_target
    draft = random_draft(arch_for(hf, capture=(1, 3, 4)))  # [1, L//2-1, L-4] for the 8-layer target
    ours = write_export(draft, str(tmp_path / "ours"), dtype="fp32")
    source = as_eagle_reference(ours, tmp_path / "eagle")
    with pytest.raises(UserError, match=r"does not record which target layers.*pass --target HF_DIR"):
        import_draft(source, str(tmp_path / "ckpt"))
    result = import_draft(source, str(tmp_path / "ckpt"), target=target_dir)
    assert result.layout == "sglang" and result.arch.capture_layer_ids == [1, 3, 4]
    imported = load_draft(str(tmp_path / "ckpt"))
    for key, value in draft.trainable_state_dict().items():
        expected = value.half().float() if value.is_floating_point() else value
        assert torch.equal(imported.trainable_state_dict()[key], expected), key


def test_full_vocabulary_speculators_draft_gets_the_identity_mapping(llama_target, tmp_path, random_draft, arch_for):
    _, hf = llama_target
    draft = random_draft(arch_for(hf, draft_vocab_size=hf["vocab_size"]))
    draft.set_vocab(torch.zeros(hf["vocab_size"], dtype=torch.int64), torch.ones(hf["vocab_size"], dtype=torch.bool))
    ours = write_export(draft, str(tmp_path / "ours"), layout="speculators")
    assert "d2t" not in _files(ours)[1]
    imported = load_draft(import_draft(ours, str(tmp_path / "ckpt")).out_dir)
    assert not imported.d2t.any() and imported.t2d.all()


def test_cli_and_fine_tune_hint(llama_target, tmp_path, random_draft, arch_for, capsys):
    target_dir, hf = llama_target
    ours = write_export(random_draft(arch_for(hf)), str(tmp_path / "ours"))
    out = str(tmp_path / "ckpt")
    assert cli_main(["import-draft", "--from", ours, "--out", out, "--target", target_dir]) == 0
    printed = capsys.readouterr().out
    assert f"draft.init_from={out}" in printed and "target.capture_layer_ids=[1, 3, 4]" in printed
    assert cli_main(["import-draft", "--from", ours, "--out", out]) == 2  # exists: needs --overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    assert cli_main(["import-draft", "--from", ours, "--out", out, "--overwrite"]) == 0


# ---- what cannot be imported is refused, with the reason ----------------------------------------------


def _edited(directory, out, config=None, tensors=None):
    cfg, weights = _files(directory)
    cfg = config(cfg) if config else cfg
    weights = tensors(weights) if tensors else weights
    return _write(out, cfg, weights)


@pytest.mark.parametrize("case,pattern", [
    ("residual_norm", r"norm_before_residual=absent \(speculators: true\).*raw fc output as the residual"),
    ("norm_before_fc", r"norm_before_fc=true"),
    ("mtp_norm", r"eagle_config.use_mtp_layernorm=True.*implies use_mtp_layernorm=False"),
    ("two_layers", r"num_hidden_layers=2.*one Llama decoder layer"),
    ("missing", r"missing \['midlayer.mlp.down_proj.weight'\]"),
    ("bias", r"unexpected \['midlayer.self_attn.q_proj.bias'\]"),
    ("shape", r"fc.weight has shape \[64, 128\], the config implies \[64, 192\]"),
    ("bad_mapping", r"d2t maps draft ids outside the target vocabulary"),
    ("unknown", r"not an EAGLE-3 draft this command knows"),
])
def test_refused_drafts(case, pattern, llama_target, tmp_path, random_draft, arch_for):
    _, hf = llama_target
    draft = random_draft(arch_for(hf))
    sg = write_export(draft, str(tmp_path / "sglang"), dtype="fp32")
    spec = write_export(draft, str(tmp_path / "spec"), layout="speculators", dtype="fp32")
    out = tmp_path / "src"
    if case == "residual_norm":
        source = _edited(spec, out, config=lambda c: {k: v for k, v in c.items() if k != "norm_before_residual"})
    elif case == "norm_before_fc":
        source = _edited(spec, out, config=lambda c: dict(c, norm_before_fc=True))
    elif case == "mtp_norm":
        modelopt = as_modelopt(sg, tmp_path / "modelopt")
        source = _edited(modelopt, out, config=lambda c: dict(c, eagle_config=dict(c["eagle_config"], use_mtp_layernorm=True)))
    elif case == "two_layers":
        source = _edited(sg, out, config=lambda c: dict(c, num_hidden_layers=2))
    elif case == "missing":
        source = _edited(sg, out, tensors=lambda t: {k: v for k, v in t.items() if k != "midlayer.mlp.down_proj.weight"})
    elif case == "bias":
        source = _edited(sg, out, tensors=lambda t: dict(t, **{"midlayer.self_attn.q_proj.bias": torch.zeros(64)}))
    elif case == "shape":
        source = _edited(sg, out, tensors=lambda t: dict(t, **{"fc.weight": torch.zeros(64, 128)}))
    elif case == "bad_mapping":
        modelopt = as_modelopt(sg, tmp_path / "modelopt")
        source = _edited(modelopt, out, tensors=lambda t: dict(t, d2t=t["d2t"] + hf["vocab_size"]))
    else:
        source = _edited(sg, out, tensors=lambda t: {k.replace("midlayer.", "decoder."): v for k, v in t.items()})
    with pytest.raises(UserError, match=pattern):
        import_draft(source, str(tmp_path / "ckpt"))
    assert not os.path.exists(tmp_path / "ckpt")  # nothing half-written


def test_draft_for_another_target_is_refused(llama_target, tmp_path, random_draft, arch_for):
    from specforge_mcore.target.random import random_target

    _, hf = llama_target
    ours = write_export(random_draft(arch_for(hf)), str(tmp_path / "ours"))
    other = random_target("llama", {"vocab_size": 640})
    with pytest.raises(UserError, match=r"vocabulary of 512 tokens, this target has vocab_size=640"):
        import_draft(ours, str(tmp_path / "ckpt"), target=other)
    deep = random_target("llama", {"num_hidden_layers": 4})
    with pytest.raises(UserError, match=r"reads target layers \[1, 3, 4\], the target has layers 0..3"):
        import_draft(ours, str(tmp_path / "ckpt"), target=deep)


# ---- the trainer fine-tunes from it -------------------------------------------------------------------


@pytest.mark.slow
def test_trainer_fine_tunes_from_an_imported_modelopt_draft(tmp_path, random_draft):
    """A ModelOpt draft for the tiny config's target, imported, then one training step with
    draft.init_from: the run starts from its weights (AdamW's first step moves each by at most lr) and keeps
    its vocabulary mapping."""
    from specforge_mcore.config import DraftConfig, config_to_dict, load_config
    from specforge_mcore.draft.model import DraftArch
    from specforge_mcore.parallel import spawn
    from specforge_mcore.target.build import read_hf_config
    from specforge_mcore.target.random import random_target
    from specforge_mcore.train.run import train_worker

    cfg = load_config("configs/tiny.yaml")
    target_dir = random_target(cfg.target.random.family, cfg.target.random.hf_config, cfg.target.random.seed)
    hf = read_hf_config(target_dir)
    arch = DraftArch.from_target(hf, DraftConfig(draft_vocab_size=cfg.draft.draft_vocab_size), [1, 3, 4],
                                 cfg.draft.draft_vocab_size)
    draft = random_draft(arch)
    ours = write_export(draft, str(tmp_path / "ours"), dtype="fp32")
    ckpt = import_draft(as_modelopt(ours, tmp_path / "modelopt"), str(tmp_path / "ckpt"), target=target_dir).out_dir
    lr = 1e-3
    tree = config_to_dict(load_config("configs/tiny.yaml", [
        f"draft.init_from={ckpt}", "train.max_steps=1", "train.eval_every=0", "train.save_every=0", "train.plot=false",
        f"optim.lr={lr}", "optim.warmup_steps=0", "optim.min_lr_ratio=1.0", f"train.out_dir={tmp_path / 'run'}"]))
    result = spawn(train_worker, 1, tree, str(tmp_path / "run"), threads=1)[0]  # one thread: forking is safe
    assert result["history"]
    after = result["weights"]
    assert torch.equal(after["d2t"], draft.d2t) and torch.equal(after["t2d"], draft.t2d)
    for key, before in draft.trainable_state_dict().items():
        if before.is_floating_point():
            assert float((after[key] - before).abs().max()) <= lr * 1.01, key
