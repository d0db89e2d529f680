"""The real client: SGLang's own ``LlamaForCausalLMEagle3`` loads our exports (docs/design.md §5).

SGLang runs in ``.venv-sglang`` (``make sglang-venv``: sglang==0.5.23 with --no-deps and the small CPU set
of requirements/sglang.txt) as a subprocess driven by ``sglang_driver.py``. One subprocess checks every
export below, since importing sglang is the slow part. For each good export, every SGLang parameter but
the embedding must have been written by SGLang's ``load_weights`` and equal ours (q/k/v and gate/up
fused as SGLang fuses them), ``hot_token_id`` must be ``d2t + arange(Vd)``, and the RoPE SGLang built
must have our base and our cos table. An export with one renamed key must fail there (SGLang skips the
name silently, so the parameter stays unwritten) and in our own check.
"""

import json
import os
import shutil
import subprocess
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from specforge_mcore.export import contract
from specforge_mcore.export.io import load_export, write_export
from specforge_mcore.rope import RopeTable

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SGLANG_PYTHON = os.path.join(ROOT, ".venv-sglang", "bin", "python")
DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sglang_driver.py")

LLAMA3_TARGET = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                     max_position_embeddings=8192,
                     rope_parameters={"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192})


def sglang_python() -> str:
    if not os.path.isfile(SGLANG_PYTHON):
        message = f"{SGLANG_PYTHON} is missing: run `make sglang-venv` (bash tests/export/make_sglang_venv.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI builds it in `make setup`; a missing client is a broken setup, not a skip
        pytest.skip(message)
    return SGLANG_PYTHON


def ours_file(draft, path: str) -> str:
    """Our tensors under our own names, in the export dtype: what SGLang's parameters must equal."""
    save_file({k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous()
               for k, v in draft.trainable_state_dict().items()}, path)
    return path


@pytest.mark.slow
def test_sglang_loads_every_parameter(llama_target, tmp_path, random_draft, arch_for):
    python = sglang_python()
    _, hf = llama_target
    drafts = {
        "plain": random_draft(arch_for(hf), seed=1),
        "per_layer_norm": random_draft(arch_for(hf, per_layer_norm=True), seed=2),
        "wide_target": random_draft(replace(arch_for(hf), target_hidden_size=96), seed=3),
        "llama3_rope": random_draft(arch_for(LLAMA3_TARGET, draft_vocab_size=64, capture=(1, 2, 4)), seed=4),
    }
    pairs, exports = [], {}
    for name, draft in drafts.items():
        exports[name] = write_export(draft, str(tmp_path / name))
        pairs.append(f"{exports[name]}:{ours_file(draft, str(tmp_path / f'{name}.ours.safetensors'))}")
    # The negative case: the plain export with one key renamed behind the exporter's back.
    broken = str(tmp_path / "renamed")
    shutil.copytree(exports["plain"], broken)
    tensors = load_file(os.path.join(broken, "model.safetensors"))
    tensors["midlayer.self_attn.k_projection.weight"] = tensors.pop("midlayer.self_attn.k_proj.weight")
    save_file(tensors, os.path.join(broken, "model.safetensors"))
    pairs.append(f"{broken}:{tmp_path / 'plain.ours.safetensors'}")

    result_path = str(tmp_path / "sglang.json")
    start = time.perf_counter()
    proc = subprocess.run([python, DRIVER, result_path, *pairs], capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(result_path, encoding="utf-8") as fh:
        results = json.load(fh)
    print(f"sglang subprocess: {wall:.1f}s wall, import {results['import_seconds']:.1f}s")

    for name, draft in drafts.items():
        got = results["exports"][exports[name]]
        assert got["errors"] == [], (name, got.get("traceback"))
        expected_params = {"model.fc.weight", "model.layers.0.self_attn.qkv_proj.weight",
                           "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.gate_up_proj.weight",
                           "model.layers.0.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight",
                           "model.layers.0.post_attention_layernorm.weight", "model.layers.0.hidden_norm.weight",
                           "model.norm.weight", "lm_head.weight"}
        if draft.arch.per_layer_norm:
            expected_params |= {f"model.fc_norm.{i}.weight" for i in range(3)}
        assert set(got["checked"]) == expected_params, name
        assert got["hot_token_id_ok"], name
        assert got["capture"] == draft.arch.capture_layer_ids
        assert got["rope_base"] == draft.arch.rope["rope_theta"], name
        cos, _ = RopeTable({"rope_parameters": draft.arch.rope}, draft.arch.head_dim).cos_sin(torch.arange(8))
        half = draft.arch.head_dim // 2
        torch.testing.assert_close(torch.tensor(got["rope_cos"]), cos[:, :half], rtol=0, atol=1e-5, msg=name)

    bad = results["exports"][broken]["errors"]
    assert any("self_attn.qkv_proj.weight: not written" in e for e in bad), bad
    with pytest.raises(contract.ContractError, match=r"'midlayer\.self_attn\.k_proj\.weight' is missing"):
        load_export(broken)
