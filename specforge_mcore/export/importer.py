"""``specforge-mcore import-draft --from DIR --out DIR``: an EAGLE-3 draft trained elsewhere, as a training
checkpoint of ours, to fine-tune (``draft.init_from=OUT``) or to export again.

Layouts (``--format auto`` tells them apart from ``config.json`` and the tensor names):

* ``sglang``: SGLang's ``LlamaForCausalLMEagle3``, which SpecForge, the EAGLE reference code and older
  ModelOpt exports write: tensors ``midlayer.*``; capture ids in ``eagle_config.eagle_aux_hidden_state_layer_ids``,
  "output of layer i" (our convention; SGLang adds the one itself).
* ``modelopt``: NVIDIA ModelOpt's EAGLE-3 deployment export: the same config (with ModelOpt's
  ``eagle_config`` flags), tensors ``layers.0.*`` and ``d2t`` without ``t2d``; ModelOpt hooks the output of
  each captured layer, so its ids are ours.
* ``speculators``: vLLM speculators' ``Eagle3DraftModel``: tensors ``layers.0.*``, ``speculators_config`` and
  ``transformer_layer_config``; its ids name the *input* of a layer (ours + 1).

What the draft carries is kept, never rebuilt: the vocabulary mapping (``d2t``; ``t2d`` is derived from it
where a layout leaves it out, the identity where the draft vocabulary is the whole vocabulary) and the
captured-layer ids. Where a source leaves the ids out, every one of these tools uses the target's default
[1, L//2 - 1, L - 4] (in our convention), which ``--target`` supplies. Drafts our EAGLE-3 layer cannot
reproduce exactly are refused with the reason (normalised residual, a norm over the fused features, more
than one layer, biases), as are tensors left over or missing.

``OUT`` receives ``draft.safetensors`` + ``draft_arch.json`` (``draft/io.py``), ``vocab.safetensors``,
``config.yaml`` (the target and the capture ids the fine-tuning run must use), ``trainer_state.json``
(``step: 0`` and where the draft came from) and ``COMPLETE``: written to a temporary directory, fsynced,
and renamed into place, like every checkpoint of ours.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch

from specforge_mcore.draft.model import DraftArch, Eagle3Draft
from specforge_mcore.errors import UserError
from specforge_mcore.export import sglang, speculators
from specforge_mcore.fileio import COMPLETE, fsync_path, read_json, replace_dir, write_manifest

FORMATS = ("sglang", "modelopt", "speculators")
_EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")
# ModelOpt's eagle_config flags and the value our draft layer implies.
_MODELOPT_FLAGS = {"use_aux_hidden_state": True, "use_input_layernorm_in_first_layer": True,
                   "use_last_layernorm": True, "use_mtp_layernorm": False}


@dataclass
class ImportResult:
    out_dir: str
    layout: str
    arch: DraftArch
    notes: list[str]


# ---- reading the source ----------------------------------------------------------------------------


def read_source(source: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, every tensor) of a draft directory: ``model.safetensors``, sharded safetensors with an
    index, or the EAGLE reference's ``pytorch_model.bin``."""
    from safetensors.torch import load_file

    if not os.path.isdir(source):
        raise UserError(f"--from {source}: no such directory (expected an EAGLE-3 draft: config.json + weights)")
    cfg = read_json(os.path.join(source, "config.json"), f"--from {source}: no config.json")
    files = sorted(f for f in os.listdir(source) if f.endswith(".safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    if files:
        for name in files:
            tensors.update(load_file(os.path.join(source, name)))
    elif os.path.isfile(os.path.join(source, "pytorch_model.bin")):
        state = torch.load(os.path.join(source, "pytorch_model.bin"), map_location="cpu", weights_only=True)
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    else:
        raise UserError(f"--from {source}: no *.safetensors and no pytorch_model.bin")
    return cfg, tensors


def detect_layout(cfg: dict, tensors: dict[str, torch.Tensor], where: str) -> str:
    if cfg.get("speculators_model_type") is not None:
        if cfg["speculators_model_type"] != "eagle3":
            raise UserError(f"{where}: speculators_model_type={cfg['speculators_model_type']!r}; only 'eagle3' drafts "
                            "can be imported")
        return "speculators"
    if any(k.startswith("midlayer.") for k in tensors):
        return "sglang"
    if any(k.startswith("layers.") for k in tensors) and "fc.weight" in tensors:
        return "modelopt"
    raise UserError(f"{where}: not an EAGLE-3 draft this command knows: no speculators_model_type, and the tensors "
                    f"have neither midlayer.* (SGLang/EAGLE/SpecForge) nor layers.0.* + fc (ModelOpt) names "
                    f"(first ones: {sorted(tensors)[:4]}); pass --format to force one")


def default_capture_ids(target_hf: Optional[dict], where: str) -> list[int]:
    if target_hf is None:
        raise UserError(f"{where} does not record which target layers the draft reads; every EAGLE-3 trainer then "
                        "uses the target's default, which needs the target: pass --target HF_DIR")
    from specforge_mcore.target.host import default_capture_layer_ids

    return default_capture_layer_ids(int(target_hf["num_hidden_layers"]))


def _check_single_llama_layer(layer_cfg: dict, where: str) -> None:
    def refuse(what: str) -> None:
        raise UserError(f"{where}: {what}; this project's EAGLE-3 draft is one Llama decoder layer (SiLU MLP, no "
                        "biases), so the draft cannot be imported without changing what it computes")

    if int(layer_cfg.get("num_hidden_layers") or 1) != 1:
        refuse(f"num_hidden_layers={layer_cfg['num_hidden_layers']}")
    if layer_cfg.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act={layer_cfg['hidden_act']!r}")
    for key in ("attention_bias", "mlp_bias"):
        if layer_cfg.get(key):
            refuse(f"{key}=true")


def _sglang_arch(cfg: dict, target_hf: Optional[dict], where: str) -> DraftArch:
    _check_single_llama_layer(cfg, where)
    if cfg.get("norm_before_residual"):
        raise UserError(f"{where}: norm_before_residual=true (the residual is the normalised hidden state); this "
                        "project's draft keeps the raw fc output as the residual")
    eagle = dict(cfg.get("eagle_config") or {})
    if eagle.get("eagle_aux_hidden_state_layer_ids") is None:
        eagle["eagle_aux_hidden_state_layer_ids"] = default_capture_ids(target_hf, where)
    # Features are concatenated in layer order whatever order the list is written in.
    eagle["eagle_aux_hidden_state_layer_ids"] = sorted(int(i) for i in eagle["eagle_aux_hidden_state_layer_ids"])
    try:
        return sglang.arch_from_config(dict(cfg, eagle_config=eagle), where)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{where}: incomplete EAGLE-3 config: {exc!r}") from None


def _modelopt_arch(cfg: dict, target_hf: Optional[dict], where: str) -> DraftArch:
    eagle = cfg.get("eagle_config") or {}
    for flag, needed in _MODELOPT_FLAGS.items():
        if flag in eagle and eagle[flag] is not None and bool(eagle[flag]) != needed:
            raise UserError(f"{where}: eagle_config.{flag}={eagle[flag]}; this project's EAGLE-3 draft implies "
                            f"{flag}={needed}")
    if int(eagle.get("parallel_draft_step") or 1) > 1:
        raise UserError(f"{where}: eagle_config.parallel_draft_step={eagle['parallel_draft_step']} (parallel draft "
                        "heads) cannot be imported: this project's draft predicts one token per step")
    return _sglang_arch(cfg, target_hf, where)


def _speculators_arch(cfg: dict, target_hf: Optional[dict], where: str) -> DraftArch:
    layer = cfg.get("transformer_layer_config")
    if not isinstance(layer, dict):
        raise UserError(f"{where}: a speculators config without a transformer_layer_config object")
    _check_single_llama_layer(layer, where)
    # speculators' own default is true: absent means the residual is normalised.
    if cfg.get("norm_before_residual", True):
        raise UserError(f"{where}: norm_before_residual={cfg.get('norm_before_residual', 'absent (speculators: true)')}"
                        ": the draft's residual is its normalised hidden state, while this project's draft keeps "
                        "the raw fc output as the residual; it cannot be imported without changing what it computes")
    if cfg.get("norm_before_fc"):
        raise UserError(f"{where}: norm_before_fc=true (one RMSNorm over the fused features) has no counterpart in this "
                        "project's draft (per-layer norms: draft.per_layer_norm)")
    ids = cfg.get("eagle_aux_hidden_state_layer_ids")
    cfg = dict(cfg)
    if ids is None:
        cfg["eagle_aux_hidden_state_layer_ids"] = [i + 1 for i in default_capture_ids(target_hf, where)]
    else:
        cfg["eagle_aux_hidden_state_layer_ids"] = sorted(int(i) for i in ids)
    try:
        return speculators.arch_from_config(cfg, where)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{where}: incomplete speculators config: {exc!r}") from None


# ---- tensors ---------------------------------------------------------------------------------------


def draft_tensors(tensors: dict[str, torch.Tensor], arch: DraftArch, layout: str, where: str,
                  notes: list[str]) -> dict[str, torch.Tensor]:
    """The source's tensors under the draft's own (SGLang) names, with d2t and t2d both present."""
    tensors = dict(tensors)
    if "embed_tokens.weight" in tensors:  # some trainers save the target's frozen embedding with the draft
        tensors.pop("embed_tokens.weight")
        notes.append("dropped embed_tokens.weight: the draft reads the target's own embedding")
    if layout == "speculators":
        state = speculators.draft_state(tensors, arch)
    else:
        if layout == "modelopt":
            tensors = {("midlayer." + k[len("layers.0."):] if k.startswith("layers.0.") else k): v
                       for k, v in tensors.items()}
        state = sglang.draft_state(tensors, arch)
    vd, v = arch.draft_vocab_size, arch.vocab_size
    if "d2t" not in state:
        if vd != v:
            raise UserError(f"{where}: the draft vocabulary has {vd} of the target's {v} tokens but the checkpoint has "
                            "no d2t mapping")
        state["d2t"] = torch.zeros(vd, dtype=torch.int64)
        notes.append("no d2t: the draft vocabulary is the whole target vocabulary (identity mapping)")
    state["d2t"] = state["d2t"].to(torch.int64)
    if "t2d" not in state:
        target_ids = state["d2t"] + torch.arange(vd)
        if target_ids.numel() and (int(target_ids.min()) < 0 or int(target_ids.max()) >= v):
            raise UserError(f"{where}: d2t maps draft ids outside the target vocabulary [0, {v})")
        t2d = torch.zeros(v, dtype=torch.bool)
        t2d[target_ids] = True
        state["t2d"] = t2d
        notes.append("t2d derived from d2t (the source keeps only d2t)")
    state["t2d"] = state["t2d"].to(torch.bool)
    return state


def build_draft(state: dict[str, torch.Tensor], arch: DraftArch, where: str) -> Eagle3Draft:
    """An Eagle3Draft holding exactly ``state`` (weights in fp32), after the key/shape check SGLang's loader
    does not do."""
    from specforge_mcore.data.vocab import DraftVocab

    draft = Eagle3Draft(arch)
    expected = draft.trainable_state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"{where}: the tensors do not fit the draft its config describes: missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]} (names given in this project's, i.e. SGLang's, spelling)")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise UserError(f"{where}: {key} has shape {list(tensor.shape)}, the config implies {list(expected[key].shape)}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{where}: {key} holds non-finite values")
    DraftVocab(state["d2t"], state["t2d"]).validate(where)
    draft.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=False)
    return draft


def check_against_target(arch: DraftArch, target_hf: dict, target_dir: str) -> None:
    where = f"--target {target_dir}"
    if arch.vocab_size != int(target_hf["vocab_size"]):
        raise UserError(f"{where}: the draft maps a vocabulary of {arch.vocab_size} tokens, this target has "
                        f"vocab_size={target_hf['vocab_size']}")
    if arch.target_hidden_size != int(target_hf["hidden_size"]):
        raise UserError(f"{where}: the draft reads hidden states of size {arch.target_hidden_size}, this target's "
                        f"hidden_size is {target_hf['hidden_size']}")
    if arch.hidden_size != int(target_hf["hidden_size"]):
        raise UserError(f"{where}: the draft's hidden size {arch.hidden_size} differs from the target's "
                        f"{target_hf['hidden_size']}; this project's draft embeds tokens with the target's embedding")
    layers = int(target_hf["num_hidden_layers"])
    if any(not 0 <= i < layers for i in arch.capture_layer_ids):
        raise UserError(f"{where}: the draft reads target layers {arch.capture_layer_ids}, the target has layers "
                        f"0..{layers - 1}")


# ---- the command -------------------------------------------------------------------------------------


def import_draft(source: str, out_dir: str, layout: str = "auto", target: Optional[str] = None,
                 overwrite: bool = False) -> ImportResult:
    """Read the draft in ``source`` and write it as a checkpoint directory at ``out_dir``."""
    from specforge_mcore.config import config_from_dict, save_config
    from specforge_mcore.data.vocab import DraftVocab
    from specforge_mcore.draft.io import save_draft
    from specforge_mcore.target.build import read_hf_config

    if layout != "auto" and layout not in FORMATS:
        raise UserError(f"--format {layout!r}: expected auto or one of {', '.join(FORMATS)}")
    cfg, tensors = read_source(source)
    where = os.path.join(source, "config.json")
    layout = detect_layout(cfg, tensors, where) if layout == "auto" else layout
    target_hf = read_hf_config(target) if target else None
    arch = {"sglang": _sglang_arch, "modelopt": _modelopt_arch, "speculators": _speculators_arch}[layout](cfg, target_hf, where)
    notes: list[str] = []
    draft = build_draft(draft_tensors(tensors, arch, layout, where, notes), arch, f"--from {source}")
    if target_hf is not None:
        check_against_target(arch, target_hf, target)

    out_dir = os.path.abspath(out_dir)
    _check_destination(out_dir, overwrite)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        save_draft(draft, tmp)
        DraftVocab(draft.d2t.clone(), draft.t2d.clone()).save(os.path.join(tmp, "vocab.safetensors"))
        run = {"name": f"imported-{os.path.basename(os.path.abspath(source))}",
               "target": {"hf_dir": os.path.abspath(target) if target else None,
                          "capture_layer_ids": list(arch.capture_layer_ids)},
               "draft": {"draft_vocab_size": arch.draft_vocab_size, "per_layer_norm": arch.per_layer_norm,
                         "init_from": out_dir}}
        save_config(config_from_dict(run, where), os.path.join(tmp, "config.yaml"))
        state = {"step": 0, "imported_from": os.path.abspath(source), "format": layout,
                 "source_architectures": cfg.get("architectures"), "capture_layer_ids": list(arch.capture_layer_ids),
                 "notes": notes}
        if target_hf is not None:
            state["target"] = {"hf_dir": os.path.abspath(target), "architectures": target_hf.get("architectures"),
                               "hidden_size": target_hf["hidden_size"], "vocab_size": target_hf["vocab_size"],
                               "num_hidden_layers": target_hf["num_hidden_layers"]}
        with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as fh:
            json.dump(state, fh, indent=2)
        for name in os.listdir(tmp):
            fsync_path(os.path.join(tmp, name))
        write_manifest(tmp)
        with open(os.path.join(tmp, COMPLETE), "w") as fh:  # written last: a checkpoint only once whole
            fh.write("0\n")
            fh.flush()
            os.fsync(fh.fileno())
        fsync_path(tmp)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ImportResult(out_dir, layout, arch, notes)


def _check_destination(out_dir: str, overwrite: bool) -> None:
    if not os.path.lexists(out_dir):
        return
    if not overwrite:
        raise UserError(f"--out {out_dir} already exists; pass --overwrite to replace it")
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
        raise UserError(f"--out {out_dir} exists and is not a directory; refusing to replace it")
    if os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, COMPLETE)):
        raise UserError(f"--out {out_dir} is a non-empty directory that is not a checkpoint (no COMPLETE marker); "
                        "refusing to replace it even with --overwrite")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", required=True,
                        help="the draft to import: an SGLang/EAGLE/SpecForge, ModelOpt or speculators EAGLE-3 directory")
    parser.add_argument("--out", required=True, help="the checkpoint directory to write (then draft.init_from=OUT)")
    parser.add_argument("--format", choices=("auto",) + FORMATS, default="auto",
                        help="the source's layout (default: recognised from config.json and the tensor names)")
    parser.add_argument("--target", default=None,
                        help="the target's HF directory: checks the draft fits it, and gives the default capture "
                             "layers when the source does not record them")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it is a checkpoint")


def main(args: argparse.Namespace) -> int:
    result = import_draft(args.source, args.out, args.format, args.target, args.overwrite)
    arch = result.arch
    print(f"[import-draft] {args.source} ({result.layout} layout) -> {result.out_dir}")
    print(f"[import-draft] hidden {arch.hidden_size}, target hidden {arch.target_hidden_size}, vocab {arch.vocab_size} -> "
          f"draft vocab {arch.draft_vocab_size}, capture layers {arch.capture_layer_ids} (output of layer i)")
    for note in result.notes:
        print(f"[import-draft] note: {note}")
    print(f"[import-draft] fine-tune with: specforge-mcore train --config RUN.yaml draft.init_from={result.out_dir} "
          f"'target.capture_layer_ids={arch.capture_layer_ids}' draft.draft_vocab_size={arch.draft_vocab_size}")
    return 0

