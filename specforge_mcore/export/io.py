"""Writing a serving directory from a training checkpoint, and reading one back into a draft.

Writing: the draft's tensors are renamed to the layout, cast to the serving dtype and checked against
the contract *before* anything is written; then ``config.json``, ``model.safetensors`` and ``README.md``
go into a temporary directory next to the destination, are fsynced, read back and checked again, and
the directory is renamed into place. An interrupted export leaves either nothing or the previous
directory (``--overwrite`` replaces only a directory that is empty or is itself an export).

Reading (``load_export``): the layout is recognised from ``config.json``, the architecture rebuilt from
it, the tensors checked against the same contract and loaded into an ``Eagle3Draft`` (fp32 parameters
holding exactly the exported values). Evaluation uses this, so what is measured is what is served.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from types import ModuleType
from typing import Optional

import torch
from safetensors.torch import load_file

from specforge_mcore.draft.io import load_draft
from specforge_mcore.draft.model import Eagle3Draft
from specforge_mcore.errors import UserError
from specforge_mcore.export import contract, sglang, speculators
from specforge_mcore.fileio import fsync_path, read_json, replace_dir, save_safetensors

FORMATS: dict[str, ModuleType] = {contract.SGLANG: sglang, contract.SPECULATORS: speculators}
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
README = "README.md"
TARGET_PLACEHOLDER = "<path-to-target-model>"


def serving_tensors(draft: Eagle3Draft, layout: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The draft's tensors under ``layout``'s names, weights cast to ``dtype`` (d2t/t2d keep theirs)."""
    state = {k: v.detach().to("cpu") for k, v in draft.trainable_state_dict().items()}
    renamed = FORMATS[layout].tensors(state, draft.arch)
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in renamed.items()}


def target_info(checkpoint_dir: str) -> tuple[str, list[str]]:
    """The target's HF directory (from the checkpoint's ``config.yaml``) and its architectures, or a placeholder."""
    import yaml

    path = os.path.join(checkpoint_dir, "config.yaml")
    hf_dir = None
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            run = yaml.safe_load(fh) or {}
        hf_dir = ((run.get("target") or {}).get("hf_dir")) if isinstance(run, dict) else None
    if not hf_dir:
        return TARGET_PLACEHOLDER, []
    architectures: list[str] = []
    hf_config = os.path.join(hf_dir, CONFIG)
    if os.path.isfile(hf_config):
        with open(hf_config, encoding="utf-8") as fh:
            architectures = list(json.load(fh).get("architectures") or [])
    return hf_dir, architectures


def write_export(draft: Eagle3Draft, out_dir: str, layout: str = contract.SGLANG, dtype: str = "bf16",
                 overwrite: bool = False, target_path: str = TARGET_PLACEHOLDER,
                 target_architectures: Optional[list[str]] = None, source: str = "a draft") -> str:
    """Write ``draft`` as a ``layout`` serving directory at ``out_dir`` (atomically); return its path."""
    if layout not in FORMATS:
        raise UserError(f"--format {layout!r}: expected one of {', '.join(FORMATS)}")
    if dtype not in contract.DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(contract.DTYPES)}")
    torch_dtype = contract.DTYPES[dtype]
    fmt = FORMATS[layout]
    out_dir = os.path.abspath(out_dir)
    _check_destination(out_dir, overwrite)

    tensors = serving_tensors(draft, layout, torch_dtype)
    cfg = fmt.config(draft.arch, torch_dtype, target_path, target_architectures)
    contract.validate(tensors, cfg, draft.arch, layout, torch_dtype, where=f"export to {out_dir}")

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        save_safetensors(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        _write_text(os.path.join(tmp, CONFIG), json.dumps(cfg, indent=2) + "\n")
        _write_text(os.path.join(tmp, README), fmt.readme(draft.arch, torch_dtype, target_path, out_dir, source))
        for name in (WEIGHTS, CONFIG, README):
            fsync_path(os.path.join(tmp, name))
        # What was written, read back, must pass the same check (a short write or a bad cast shows here).
        read_config, read_tensors = _read(tmp)
        contract.validate(read_tensors, read_config, draft.arch, layout, torch_dtype, where=f"export to {out_dir}")
        replace_dir(tmp, out_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"; the existing {out_dir} is untouched" if os.path.isdir(out_dir) else ""
        raise UserError(f"writing the export to {out_dir} failed: {exc.strerror or exc} "
                        f"({exc.filename or parent}){kept}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def export_checkpoint(checkpoint_dir: str, out_dir: str, layout: str = contract.SGLANG, dtype: str = "bf16",
                      overwrite: bool = False) -> str:
    """``specforge-mcore export``: a training checkpoint (``OUT/checkpoints/step_N``) -> a serving directory.

    The draft is replicated over ranks, so the checkpoint holds it once, unsharded, whatever world size
    or optimizer sharding the run used; only ``draft.safetensors`` and ``draft_arch.json`` are read.
    """
    if not os.path.isdir(checkpoint_dir):
        raise UserError(f"--checkpoint {checkpoint_dir}: no such directory (expected OUT/checkpoints/step_N)")
    draft = load_draft(checkpoint_dir)
    target_path, architectures = target_info(checkpoint_dir)
    return write_export(draft, out_dir, layout, dtype, overwrite, target_path, architectures,
                        source=os.path.abspath(checkpoint_dir))


def detect_format(export_dir: str) -> str:
    cfg = _read_config(export_dir)
    if cfg.get("speculators_model_type") is not None:
        return contract.SPECULATORS
    if contract.SGLANG_ARCHITECTURE in (cfg.get("architectures") or []):
        return contract.SGLANG
    raise UserError(f"{os.path.join(export_dir, CONFIG)}: neither an SGLang EAGLE-3 config (architectures "
                    f"[{contract.SGLANG_ARCHITECTURE!r}]) nor a speculators one (speculators_model_type)")


def load_export(export_dir: str, map_location: str | torch.device = "cpu") -> Eagle3Draft:
    """The draft stored in a serving directory of either layout (its embedding must be set from the target)."""
    layout = detect_format(export_dir)
    fmt = FORMATS[layout]
    cfg, tensors = _read(export_dir)
    where = os.path.join(export_dir, WEIGHTS)
    try:
        arch = fmt.arch_from_config(cfg, where=os.path.join(export_dir, CONFIG))
    except (KeyError, TypeError, ValueError) as exc:
        raise contract.ContractError(f"{os.path.join(export_dir, CONFIG)}: incomplete {layout} config: {exc!r}") from None
    by_name = {name: dtype for dtype, name in contract.DTYPE_NAMES.items()}
    dtype = by_name.get(str(cfg.get("torch_dtype") or cfg.get("dtype")))
    if dtype is None:
        raise contract.ContractError(f"{os.path.join(export_dir, CONFIG)}: torch_dtype={cfg.get('torch_dtype')!r}, "
                                     f"expected one of {sorted(by_name)}")
    contract.validate(tensors, cfg, arch, layout, dtype, where=where)
    draft = Eagle3Draft(arch)
    state = fmt.draft_state(tensors, arch)
    expected = draft.trainable_state_dict()
    draft.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=False)
    return draft.to(map_location)


# ---- files -------------------------------------------------------------------------------------------
def _read_config(export_dir: str) -> dict:
    path = os.path.join(export_dir, CONFIG)
    cfg = read_json(path, f"{export_dir}: no {CONFIG} (expected a directory written by specforge-mcore export)")
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object")
    return cfg


def _read(export_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    path = os.path.join(export_dir, WEIGHTS)
    if not os.path.isfile(path):
        raise UserError(f"{export_dir}: no {WEIGHTS}")
    return _read_config(export_dir), load_file(path)


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def _is_export_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG)) and os.path.isfile(os.path.join(path, WEIGHTS))


def _check_destination(out_dir: str, overwrite: bool) -> None:
    if not os.path.lexists(out_dir):
        return
    if not overwrite:
        raise UserError(f"--out {out_dir} already exists; pass --overwrite to replace it")
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
        raise UserError(f"--out {out_dir} exists and is not a directory; refusing to replace it")
    if os.listdir(out_dir) and not _is_export_dir(out_dir):
        raise UserError(f"--out {out_dir} is a non-empty directory that is not an export ({CONFIG} + {WEIGHTS}); "
                        "refusing to replace it even with --overwrite")


