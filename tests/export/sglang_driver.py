"""Runs inside ``.venv-sglang`` (sglang==0.5.23, CPU torch): load exports with SGLang's own EAGLE-3 class.

    python sglang_driver.py RESULT.json EXPORT_DIR:OURS.safetensors [EXPORT_DIR:OURS.safetensors ...]

For each export: build ``LlamaForCausalLMEagle3`` from the export's ``config.json`` the way SGLang's
model loader does (default dtype = the config's), fill every parameter with NaN, run SGLang's own
``load_weights`` over the exported safetensors, then compare every parameter except the embedding
with our tensors (``OURS``, our names), fused as SGLang fuses them (q/k/v -> qkv_proj, gate/up ->
gate_up_proj). A parameter that ``load_weights`` skipped stays NaN and is reported. Also reported:
``hot_token_id == d2t + arange(Vd)`` and the RoPE base and cos table SGLang built.

This script imports nothing from specforge_mcore (it is not installed in that venv). The two CPU shims
live here only: a stub ``torchvision`` (sglang's multimodal configs import it at module level; nothing
on the EAGLE-3 path uses it) and ``rotary_embedding.base._is_cpu = True`` (so RoPE takes its
torch-native path on a machine without a GPU).
"""

import importlib.abc
import importlib.machinery
import json
import sys
import time
import types
import warnings
from types import SimpleNamespace


def _install_torchvision_stub() -> None:
    import transformers.utils.import_utils as hf_imports

    # transformers caches its answer; ask first so it keeps seeing "no torchvision" after the stub exists.
    assert not hf_imports.is_torchvision_available(), "a real torchvision is installed in the sglang venv"

    class _Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name == "torchvision" or name.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            return _Stub(spec.name)

        def exec_module(self, module):
            module.__path__ = []

    sys.meta_path.insert(0, _Finder())


FUSED = {
    "self_attn.qkv_proj.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "mlp.gate_up_proj.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
}


def _ours_for(name: str, ours: dict):
    """Our tensor(s) for SGLang parameter ``name``, concatenated where SGLang fuses them."""
    import torch

    if name == "lm_head.weight":
        return ours["lm_head.weight"]
    local = name[len("model."):] if name.startswith("model.") else name
    local = local.replace("layers.0.", "midlayer.", 1).replace("fc_norm.", "layer_norms.", 1)
    for fused, parts in FUSED.items():
        if local.endswith(fused):
            prefix = local[: -len(fused)]
            return torch.cat([ours[prefix + p] for p in parts], dim=0)
    return ours.get(local)


def check_export(export_dir: str, ours_path: str) -> dict:
    import torch
    from safetensors.torch import load_file
    from sglang.srt.model_loader.utils import set_default_torch_dtype
    from sglang.srt.models.llama_eagle3 import LlamaForCausalLMEagle3
    from sglang.srt.runtime_context import get_parallel
    from sglang.srt.server_args import ServerArgs
    from sglang.test.parallel_groups import publish
    from transformers import LlamaConfig

    errors: list[str] = []
    config = LlamaConfig.from_pretrained(export_dir)
    publish(ServerArgs(model_path=export_dir, device="cpu"), role="scheduler")
    get_parallel().override_permanently(
        pp_group=SimpleNamespace(rank_in_group=0, world_size=1, is_first_rank=True, is_last_rank=True))
    dtype = getattr(config, "dtype", None) or torch.bfloat16
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with set_default_torch_dtype(dtype):
        model = LlamaForCausalLMEagle3(config)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))
    exported = load_file(f"{export_dir}/model.safetensors")
    model.load_weights(iter(exported.items()))

    ours = load_file(ours_path)
    vd = int(config.draft_vocab_size)
    checked = []
    for name, param in model.named_parameters():
        if name == "model.embed_tokens.weight":
            continue  # the target's embedding: never part of a draft export
        value = param.detach()[:vd] if name == "lm_head.weight" else param.detach()  # rows past Vd are padding
        if torch.isnan(value).any():
            errors.append(f"{name}: not written by SGLang's load_weights (still NaN)")
            continue
        expected = _ours_for(name, ours)
        if expected is None:
            errors.append(f"{name}: SGLang has this parameter, our draft has no counterpart")
            continue
        if tuple(value.shape) != tuple(expected.shape):
            errors.append(f"{name}: SGLang shape {list(value.shape)} != ours {list(expected.shape)}")
            continue
        if not torch.equal(value.float(), expected.float()):
            diff = (value.float() - expected.float()).abs().max().item()
            errors.append(f"{name}: differs from ours (max abs diff {diff:.3g})")
            continue
        checked.append(name)

    hot = model.get_hot_token_id()
    hot_ok = hot is not None and torch.equal(hot.long(), ours["d2t"].long() + torch.arange(vd))
    if not hot_ok:
        errors.append("hot_token_id != d2t + arange(draft_vocab_size)")

    rotary = model.model.layers[0].self_attn.rotary_emb
    # The stored buffer is in the model dtype; SGLang's own fp32 computation of it is what we compare.
    cache = rotary._compute_cos_sin_cache()[:8].float()
    half = cache.shape[-1] // 2
    return {
        "errors": errors,
        "checked": checked,
        "hot_token_id_ok": bool(hot_ok),
        "rope_base": float(rotary.base),
        "rope_cos": cache[:, :half].tolist(),
        "capture": list(getattr(config, "eagle_config", {}).get("eagle_aux_hidden_state_layer_ids", [])),
    }


def main(argv: list[str]) -> int:
    out_path, pairs = argv[0], argv[1:]
    start = time.perf_counter()
    warnings.filterwarnings("ignore")
    _install_torchvision_stub()
    import sglang.srt.layers.rotary_embedding.base as rotary_base

    rotary_base._is_cpu = True
    import sglang.srt.models.llama_eagle3  # noqa: F401  (the import is what takes time: measured below)

    results = {"import_seconds": time.perf_counter() - start, "exports": {}}
    for pair in pairs:
        export_dir, ours_path = pair.rsplit(":", 1)
        try:
            results["exports"][export_dir] = check_export(export_dir, ours_path)
        except Exception as exc:  # reported, not swallowed: the test fails on any entry in errors
            import traceback

            results["exports"][export_dir] = {"errors": [f"{type(exc).__name__}: {exc}"],
                                              "traceback": traceback.format_exc()}
    results["total_seconds"] = time.perf_counter() - start
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
