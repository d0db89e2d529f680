"""On-the-fly FP8 for a full-precision target (``target.quantize=fp8``), through NVIDIA ModelOpt.

For a target without an FP8 release: after the bf16/fp32 weights are loaded into this rank's Megatron
stage, ModelOpt's quantization API (``modelopt.torch.quantization``, whose Megatron plugin knows the
column/row-parallel linears) quantizes every linear weight to FP8 e4m3 in 128x128 blocks, the layout of
the official FP8 releases, and ``mtq.compress`` replaces the weights by their packed FP8 form. Routers,
norms, the embedding and the output layer stay in full precision (ModelOpt's default exclusions, which
also keep the teacher's output rows exact). The quantization is weight-only: the frozen target needs no
calibration data, and each rank quantizes its own shard, so any layout works.

nvidia-modelopt is optional (imported only here, only when asked for); it installs on CPU without a CUDA
torch and its FP8 path runs on CPU too (compressed linears dequantize for their GEMM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specforge_mcore.errors import UserError
from specforge_mcore.target.fp8 import module_bytes


@dataclass
class QuantizeReport:
    before_bytes: int  # this rank's parameters and buffers before
    after_bytes: int
    quantized_linears: int

    @property
    def saved_bytes(self) -> int:
        return self.before_bytes - self.after_bytes

    def __str__(self) -> str:
        mib = 2 ** 20
        return (f"ModelOpt FP8 (128x128 blocks, weight-only): {self.quantized_linears} linear weights; this rank's "
                f"target {self.before_bytes / mib:.1f} MiB -> {self.after_bytes / mib:.1f} MiB "
                f"(saved {self.saved_bytes / mib:.1f} MiB, {self.saved_bytes / max(1, self.before_bytes):.0%})")


def import_quantization():
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise UserError(f"target.quantize=fp8 needs NVIDIA ModelOpt, which is not importable here ({exc}); install it "
                        "with `pip install nvidia-modelopt==0.47.0` (no CUDA torch needed), or use an FP8 checkpoint "
                        "(target.fp8)") from None
    return mtq


def quantize_fp8(model: torch.nn.Module) -> QuantizeReport:
    """Quantize ``model``'s linear weights to block FP8 in place and compress them; report the bytes."""
    mtq = import_quantization()
    before = module_bytes(model)
    # Weight-only: the amax of each block comes from the weights themselves, so no forward loop is needed.
    mtq.quantize(model, mtq.FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG, forward_loop=None)
    mtq.compress(model)
    quantized = sum(1 for p in model.parameters() if p.dtype == torch.float8_e4m3fn)
    if quantized == 0:
        raise RuntimeError("ModelOpt quantized no linear weight of the target (its Megatron plugin did not "
                           "recognise the layers?)")
    return QuantizeReport(before, module_bytes(model), quantized)
