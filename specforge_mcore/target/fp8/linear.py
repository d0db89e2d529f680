"""FP8 weights on the rank: GEMMs in FP8 where the GPU has them, a dequantising GEMM elsewhere.

``target.fp8=native`` keeps each rank's decoder linear weights as the checkpoint stores them (1 byte per
weight plus one fp32 scale per block, half of bf16) and runs ``x @ W.T`` through ``fp8_linear``: on a GPU
of compute capability >= 9.0 with a torch whose ``scaled_mm`` takes block scales, an FP8 x FP8 GEMM with
1x128 activation blocks quantised on the fly (the checkpoints' ``activation_scheme: dynamic``) and the
checkpoint's 128x128 weight blocks; elsewhere the weight is dequantised for that one GEMM.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from specforge_mcore.target.fp8.format import E4M3_MAX, FP8_DTYPE, dequantize_blocks, quantize_blocks


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``x @ dequant(weight).T`` for an FP8 weight [N, K] with block scales: an FP8 GEMM when the device can
    (``fp8_gemm_available``), else the weight is dequantised to x's dtype for this one GEMM."""
    n, k = weight.shape
    if x.is_cuda and block == (128, 128) and k % 128 == 0 and n % 128 == 0 and fp8_gemm_available(x.device)[0]:
        out = _blockwise_fp8_gemm(x.reshape(-1, k), weight, scale_inv, x.dtype)
        return out.view(*x.shape[:-1], n)
    return torch.matmul(x, dequantize_blocks(weight, scale_inv, block).to(x.dtype).t())


def _blockwise_fp8_gemm(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """FP8 x FP8 on tensor cores: activations quantised per token and 128 channels (the checkpoints'
    ``activation_scheme: dynamic``), weights with their 128x128 scales."""
    m, k = x.shape
    pad = -m % 16  # the CUTLASS kernels want the row count aligned
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    groups = x.float().view(-1, k // 128, 128)
    scale_a = (groups.abs().amax(-1) / E4M3_MAX).clamp(min=1e-12)
    xq = (groups / scale_a[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE).view(-1, k)
    out = F.scaled_mm(xq, weight.t(), scale_a.t().contiguous().t(), F.ScalingType.BlockWise1x128,
                      scale_inv.float().t(), F.ScalingType.BlockWise128x128, output_dtype=out_dtype)
    return out[:m]


@functools.lru_cache(maxsize=None)
def fp8_gemm_available(device: torch.device) -> tuple[bool, str]:
    """(usable, why) for the block-scaled FP8 GEMM on ``device``: needs CUDA compute capability >= 9.0 and a
    torch whose ``scaled_mm`` takes 1x128 / 128x128 block scales; checked once against the dequantised
    GEMM on a small product, so a kernel that is missing or wrong here is never used."""
    if device.type != "cuda":
        return False, f"no FP8 GEMM on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (9, 0) or not hasattr(F, "scaled_mm"):
        return False, f"compute capability {major}.{minor} / torch {torch.__version__} has no block-scaled FP8 GEMM"
    gen = torch.Generator(device="cpu").manual_seed(0)
    w = torch.randn(256, 512, generator=gen)
    x = torch.randn(48, 512, generator=gen).to(device, torch.bfloat16)
    q, s = quantize_blocks(w, (128, 128))
    q, s = q.to(device), s.to(device)
    try:
        out = _blockwise_fp8_gemm(x, q, s, torch.bfloat16).float()
    except RuntimeError as exc:  # the kernel is not built for this device / torch: report, use the fallback
        return False, f"scaled_mm refused block scales here ({str(exc).splitlines()[0]})"
    ref = x.float() @ dequantize_blocks(q, s, (128, 128)).t()
    error = float((out - ref).norm() / ref.norm())
    if not error < 0.05:  # activation quantisation alone costs ~1%
        return False, f"scaled_mm with block scales disagrees with the dequantised GEMM (relative error {error:.3f})"
    return True, f"FP8 GEMMs (torch scaled_mm, 1x128 activation / 128x128 weight blocks), checked to {error:.4f}"


def describe_native(device: torch.device) -> str:
    usable, why = fp8_gemm_available(device)
    return why if usable else f"weights kept in FP8, each GEMM dequantizes its weight ({why})"


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (FP8 weights and scales included)."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
