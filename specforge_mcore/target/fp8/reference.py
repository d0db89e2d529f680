"""Block-FP8 checkpoints as references: the same weights dequantised, for HF transformers to run.

``verify-target`` on an FP8 checkpoint compares the hosted target with HF transformers on exactly the
weights the target computes with: the dequantised values.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
import transformers
from safetensors.torch import save_file

from specforge_mcore.target.fp8.format import SCALE_SUFFIX
from specforge_mcore.target.load import SafetensorsReader


def write_dequantized_checkpoint(hf_dir: str, out_dir: str) -> str:
    """Write a block-FP8 checkpoint's weights dequantised to fp32 (no scales, no quantization_config)."""
    reader = SafetensorsReader(hf_dir)
    state = {key: reader.read(key).float().contiguous() for key in reader.key_to_file if not key.endswith(SCALE_SUFFIX)}
    reader.close()
    os.makedirs(out_dir, exist_ok=True)
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(hf_dir):
        path = os.path.join(hf_dir, name)
        if os.path.isfile(path) and not name.endswith(".safetensors") and name != "model.safetensors.index.json":
            shutil.copy(path, os.path.join(out_dir, name))
    with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as fh:
        hf = json.load(fh)
    hf.pop("quantization_config", None)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(hf, fh, indent=2)
    return out_dir


def load_dequantized_hf_model(hf_dir: str):
    """HF transformers' model of a block-FP8 checkpoint with the dequantised weights, in fp32: the exact
    reference for a target hosted from that checkpoint (transformers' own loader maps the tensor names)."""
    with tempfile.TemporaryDirectory(prefix="specforge_dequantized_") as tmp:
        write_dequantized_checkpoint(hf_dir, tmp)
        return transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
