"""Bits shared by the fused kernels: the RMSNorm reference, Triton detection, path selection, and the
Triton row kernels (RMSNorm forward/backward) that the projection and the loss both use.

Triton is optional: without it the reference and chunked paths still work, ``impl="auto"`` picks the
chunked path, and only ``impl="triton"`` fails (with a message saying why).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from specforge_mcore.errors import UserError

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install without Triton
    triton = None
    tl = None

IMPLS = ("auto", "reference", "chunked", "triton")

# Triton decides at decoration time whether a @triton.jit function is compiled or interpreted, so what
# counts is the mode when the kernel modules were imported, not the environment later.
INTERPRET = bool(triton is not None and triton.knobs.runtime.interpret)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm exactly as transformers' LlamaRMSNorm computes it: statistics in fp32, the
    normalised value rounded back to the input dtype, then scaled by the weight."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm_rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``1/sqrt(mean(x^2) + eps)`` per row, in fp32 (the only statistic RMSNorm needs for backward)."""
    xf = x.float()
    return torch.rsqrt(xf.pow(2).mean(-1) + eps)


def rms_norm_backward(x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``rms_norm`` (w.r.t. x, and w.r.t. weight summed over rows, fp32) from saved ``rstd``.

    Follows autograd through ``weight * (xf * rstd).to(dtype)``: the weight gradient sees the rounded
    normalised value, the input gradient the fp32 one.
    """
    u = x.float() * rstd[:, None]
    dweight = (dy.float() * u.to(x.dtype).float()).sum(0)
    du = (dy * weight).float()
    dx = rstd[:, None] * (du - u * (du * u).mean(-1, keepdim=True))
    return dx.to(x.dtype), dweight


def accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with an fp32 accumulator; low-precision operands are multiplied in their own
    dtype (as the reference's autograd does) and only the product is widened."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc += (a @ b).to(acc.dtype)


def autocast_off(fn):
    """Run ``fn`` (an autograd Function's forward or backward, or a reference) with autocast disabled on
    every device type: the ops cast their operands themselves (the dtype policy, docs/design.md §9), so
    they compute the same whether or not the caller's code runs under autocast."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for device_type in _AUTOCAST_DEVICES:
                stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args, **kwargs)

    return wrapper


_AUTOCAST_DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def in_dtype(tensor, dtype: torch.dtype):
    """``tensor`` in the compute ``dtype`` (weights are cast to the activations' dtype); None stays None."""
    return tensor if tensor is None or tensor.dtype == dtype else tensor.to(dtype)


def check_impl(impl: str, device: torch.device, what: str) -> str:
    """The concrete path for ``impl`` on ``device``: auto = Triton on CUDA, the chunked path elsewhere."""
    if impl not in IMPLS:
        raise UserError(f"kernels.{what}: unknown implementation {impl!r}; expected one of {', '.join(IMPLS)}")
    if impl == "auto":
        # The interpreter is far slower than torch, so auto never picks it on CPU.
        return "triton" if (triton is not None and device.type == "cuda" and not INTERPRET) else "chunked"
    if impl == "triton":
        if triton is None:
            raise UserError(f"kernels.{what}=triton: Triton is not installed; use chunked or reference")
        if device.type != "cuda" and not INTERPRET:
            raise UserError(
                f"kernels.{what}=triton: tensors are on {device.type}, and Triton runs only on CUDA devices "
                "(or on CPU under TRITON_INTERPRET=1, for tests); use chunked or auto on CPU")
    return impl


if triton is not None:

    def dot_precision(dtype: torch.dtype) -> str:
        """fp32 GEMMs in the kernels follow torch's own matmul precision setting, so the fused path and the
        reference use the same arithmetic (TF32 only where torch would use it)."""
        if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
            return "ieee"
        return "tf32"

    def launch_options(device: torch.device, gpu: dict, interpreter: dict) -> dict:
        """Block sizes: large on a GPU, small under the interpreter (each program is numpy there)."""
        return dict(interpreter if INTERPRET else gpu)

    @triton.jit
    def _mul_rounded(a, b):
        """``a * b`` as torch computes it for a shared low-precision dtype (fp32 product, rounded), returned
        in fp32. Written out because the interpreter multiplies bf16 values wrongly."""
        return (a.to(tl.float32) * b.to(tl.float32)).to(a.dtype).to(tl.float32)

    @triton.jit
    def _scale_rounded(x, rstd, w):
        """RMSNorm's ``w * (x * rstd).to(x.dtype)`` in fp32, with torch's two roundings to x's dtype."""
        return _mul_rounded((x.to(tl.float32) * rstd).to(x.dtype), w)

    @triton.jit
    def _row_rstd(X, rows, row_ok, N, stride_x, eps, BT: tl.constexpr, BN: tl.constexpr):
        """1 / sqrt(mean(x^2) + eps) of each of the BT rows, in fp32, over N columns in tiles of BN."""
        sumsq = tl.zeros((BT,), tl.float32)
        for n0 in range(0, N, BN):
            cols = n0 + tl.arange(0, BN)
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :],
                        mask=row_ok[:, None] & (cols < N)[None, :], other=0.0).to(tl.float32)
            sumsq += tl.sum(x * x, axis=1)
        return 1.0 / tl.sqrt(sumsq / N + eps)

    @triton.jit
    def row_rstd_kernel(X, RSTD, T, N, stride_x, eps, BT: tl.constexpr, BN: tl.constexpr):
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        row_ok = rows < T
        tl.store(RSTD + rows, _row_rstd(X, rows, row_ok, N, stride_x, eps, BT, BN), mask=row_ok)

    @triton.jit
    def rms_norm_fwd_kernel(X, W, Y, RSTD, T, N, stride_x, stride_y, eps,
                            BT: tl.constexpr, BN: tl.constexpr):
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        row_ok = rows < T
        rstd = _row_rstd(X, rows, row_ok, N, stride_x, eps, BT, BN)
        tl.store(RSTD + rows, rstd, mask=row_ok)
        for n0 in range(0, N, BN):
            cols = n0 + tl.arange(0, BN)
            ok = row_ok[:, None] & (cols < N)[None, :]
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
            w = tl.load(W + cols, mask=cols < N, other=0.0)
            y = _scale_rounded(x, rstd[:, None], w[None, :])
            tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)

    @triton.jit
    def rms_norm_bwd_kernel(X, RSTD, W, DY, DRES, DX, DW_PARTIAL, T, N,
                            stride_x, stride_dy, stride_dres, stride_dx,
                            HAS_DRES: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr):
        """dx = dres + rstd * (du - u * mean(du * u)), u = x * rstd, du = dy * w; per-block partial dw."""
        pid = tl.program_id(0)
        rows = pid * BT + tl.arange(0, BT)
        row_ok = rows < T
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        dot = tl.zeros((BT,), tl.float32)
        for n0 in range(0, N, BN):
            cols = n0 + tl.arange(0, BN)
            ok = row_ok[:, None] & (cols < N)[None, :]
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=ok, other=0.0)
            w = tl.load(W + cols, mask=cols < N, other=0.0)
            du = _mul_rounded(dy, w[None, :])
            dot += tl.sum(du * x.to(tl.float32) * rstd[:, None], axis=1)
        dot = dot / N
        for n0 in range(0, N, BN):
            cols = n0 + tl.arange(0, BN)
            ok = row_ok[:, None] & (cols < N)[None, :]
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=ok, other=0.0)
            w = tl.load(W + cols, mask=cols < N, other=0.0)
            u = x.to(tl.float32) * rstd[:, None]
            du = _mul_rounded(dy, w[None, :])
            dx = rstd[:, None] * (du - u * dot[:, None])
            if HAS_DRES:
                dx += tl.load(DRES + rows[:, None] * stride_dres + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=ok)
            dw = tl.sum(dy.to(tl.float32) * u.to(x.dtype).to(tl.float32), axis=0)
            tl.store(DW_PARTIAL + pid * N + cols, dw, mask=cols < N)

    _ROW_BLOCKS = dict(gpu=dict(BT=16, BN=256, num_warps=4), interpreter=dict(BT=16, BN=32))

    def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(x), rstd) for a 2-D ``x`` with a unit-stride last dim."""
        T, N = x.shape
        y = torch.empty_like(x, dtype=torch.promote_types(x.dtype, weight.dtype))
        rstd = torch.empty(T, device=x.device, dtype=torch.float32)
        opts = launch_options(x.device, **_ROW_BLOCKS)
        rms_norm_fwd_kernel[(triton.cdiv(T, opts["BT"]),)](x, weight, y, rstd, T, N, x.stride(0), y.stride(0),
                                                          eps, **opts)
        return y, rstd

    def row_rstd_triton(x: torch.Tensor, eps: float) -> torch.Tensor:
        T, N = x.shape
        rstd = torch.empty(T, device=x.device, dtype=torch.float32)
        opts = launch_options(x.device, **_ROW_BLOCKS)
        row_rstd_kernel[(triton.cdiv(T, opts["BT"]),)](x, rstd, T, N, x.stride(0), eps, **opts)
        return rstd

    def rms_norm_backward_triton(x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor,
                                 dres: torch.Tensor | None = None, dx_dtype: torch.dtype | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Triton twin of ``rms_norm_backward``; ``dres`` (a residual gradient) is added to dx in the same pass."""
        T, N = x.shape
        opts = launch_options(x.device, **_ROW_BLOCKS)
        blocks = triton.cdiv(T, opts["BT"])
        dx = torch.empty(T, N, device=x.device, dtype=dx_dtype or x.dtype)
        dw_partial = torch.empty(blocks, N, device=x.device, dtype=torch.float32)
        rms_norm_bwd_kernel[(blocks,)](
            x, rstd, weight, dy, dres if dres is not None else dy, dx, dw_partial, T, N,
            x.stride(0), dy.stride(0), dres.stride(0) if dres is not None else 0, dx.stride(0),
            HAS_DRES=dres is not None, **opts)
        return dx, dw_partial.sum(0)
