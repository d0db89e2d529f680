"""The dtype policy, in one place (docs/design.md §9).

* **Target**: weights and activations in ``target.dtype`` (bf16 in every GPU recipe). The target is
  frozen and never sees autocast.
* **Draft master state**: parameters and AdamW moments in fp32, always.
* **Draft compute**: ``draft.dtype`` (``auto``: bf16 on CUDA, fp32 on CPU). The draft's plain torch
  layers run under ``autocast(compute)``; the custom ops (projection, TTT loss, TTT attention) compute
  in the dtype of the activations they are handed, cast their weights to it themselves, accumulate in
  fp32 and return gradients in each weight's own dtype, with or without autocast around them.
* **The boundary**: what the target hands the draft (the three captured layers, the final hidden
  state, the teacher's output-layer rows and the token embedding) is cast to the compute dtype once,
  here, where it crosses (``DtypePolicy.to_draft``) - never again inside the draft.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from specforge_mcore.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_named(name: str, where: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"{where}={name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class DtypePolicy:
    target: torch.dtype
    draft_compute: torch.dtype
    master: torch.dtype = torch.float32

    @classmethod
    def resolve(cls, target_dtype: str, draft_dtype: Optional[str], device: torch.device) -> "DtypePolicy":
        """``draft_dtype`` None or "auto": bf16 on CUDA, fp32 elsewhere (CPU bf16 GEMMs are slow and the
        CPU runs are tests and demos; ask for bf16 explicitly to test the GPU policy on a CPU)."""
        target = dtype_named(target_dtype, "target.dtype")
        if draft_dtype in (None, "auto"):
            compute = torch.bfloat16 if device.type == "cuda" else torch.float32
        else:
            compute = dtype_named(draft_dtype, "draft.dtype")
        return cls(target=target, draft_compute=compute)

    def to_draft(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor the target hands to the draft, in the draft's compute dtype (the one cast)."""
        return tensor.to(self.draft_compute) if tensor.is_floating_point() else tensor

    def draft_autocast(self, device: torch.device):
        """The context the draft's forward runs in: autocast to the compute dtype, or none for fp32."""
        if self.draft_compute == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.draft_compute)

    def describe(self) -> str:
        name = {v: k for k, v in DTYPES.items()}
        return (f"dtype policy: target {name[self.target]}, draft compute {name[self.draft_compute]}, "
                f"draft master weights and AdamW state {name[self.master]}")
