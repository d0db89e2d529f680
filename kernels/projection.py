"""Fused hidden-state projection: three captured target layers -> the draft's hidden input.

    x_k = rms_norm(h_k, w_k)            (EAGLE-3.1 only; otherwise x_k = h_k)
    g   = cat(x_0, x_1, x_2) @ fc.T     [T, H]   the residual
    g_n = rms_norm(g, hidden_norm)      [T, H]   the attention input

Since ``cat(x) @ fc.T == sum_k x_k @ fc[:, k*Ht:(k+1)*Ht].T``, no path but the reference builds the
``[T, 3*Ht]`` concatenation: the GEMM walks the three inputs one after another. Backward saves only the
inputs, ``g`` (an output the caller keeps anyway) and per-row fp32 statistics.

Paths: ``projection_reference`` (plain ops, the spec), ``projection_chunked`` (CPU: token chunks,
recompute in backward) and ``projection_triton`` (CUDA: one Triton GEMM with the per-layer norm in its
prologue, a Triton row norm; backward = Triton norm-backward kernels + one cuBLAS GEMM per layer slice).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._common import (INTERPRET, accumulate_mm, autocast_off, check_impl, in_dtype, rms_norm, rms_norm_backward,
                      rms_norm_rstd, triton)

__all__ = ["projection_reference", "projection_chunked", "projection_triton", "fused_projection"]


@autocast_off
def projection_reference(hiddens: Sequence[torch.Tensor], fc_weight: torch.Tensor, hidden_norm_weight: torch.Tensor,
                         eps: float, layer_norm_weights: Optional[Sequence[torch.Tensor]] = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, hidden_norm(g)) with plain ops: the spec the fused paths are tested against. Computes in the
    captured layers' dtype (weights cast to it), whether or not autocast is on."""
    dtype = hiddens[0].dtype
    fc_weight, hidden_norm_weight = in_dtype(fc_weight, dtype), in_dtype(hidden_norm_weight, dtype)
    if layer_norm_weights is not None:
        layer_norm_weights = [in_dtype(w, dtype) for w in layer_norm_weights]
        hiddens = [rms_norm(h, w, eps) for h, w in zip(hiddens, layer_norm_weights)]
    g = torch.cat(list(hiddens), dim=-1) @ fc_weight.t()
    return g, rms_norm(g, hidden_norm_weight, eps)


def _check(hiddens, fc_weight, hidden_norm_weight, layer_norm_weights) -> None:
    if len(hiddens) != 3:
        raise ValueError(f"projection: expected the three captured layers (low, mid, high), got {len(hiddens)}")
    shape = hiddens[0].shape
    for h in hiddens:
        if h.shape != shape or h.dtype != hiddens[0].dtype or h.device != hiddens[0].device:
            raise ValueError(f"projection: captured layers differ: {[(tuple(x.shape), x.dtype) for x in hiddens]}")
    hidden_t = shape[-1]
    if fc_weight.dim() != 2 or fc_weight.shape[1] != 3 * hidden_t:
        raise ValueError(f"projection: fc.weight has shape {tuple(fc_weight.shape)}, expected [H, {3 * hidden_t}]")
    if hidden_norm_weight.shape != (fc_weight.shape[0],):
        raise ValueError(f"projection: hidden_norm.weight has shape {tuple(hidden_norm_weight.shape)}, "
                         f"expected [{fc_weight.shape[0]}]")
    if layer_norm_weights is not None:
        if len(layer_norm_weights) != 3 or any(w.shape != (hidden_t,) for w in layer_norm_weights):
            raise ValueError(f"projection: expected three per-layer norm weights of shape [{hidden_t}]")


# ----------------------------------------------------------------------------------------------
# CPU path
# ----------------------------------------------------------------------------------------------


def _weights_in_compute_dtype(ctx, dtype, fc_weight, hidden_norm_weight, lws):
    """The dtype policy: weights (fp32 masters) cast to the captured layers' dtype; their own dtypes are kept
    on ``ctx`` so backward returns each gradient (accumulated in fp32) in its parameter's dtype."""
    ctx.weight_dtypes = (fc_weight.dtype, hidden_norm_weight.dtype, *(w.dtype if w is not None else None for w in lws))
    return in_dtype(fc_weight, dtype), in_dtype(hidden_norm_weight, dtype), tuple(in_dtype(w, dtype) for w in lws)


class _ProjectionChunked(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, eps, chunk, fc_weight, hidden_norm_weight, h0, h1, h2, lw0, lw1, lw2):
        hiddens = (h0, h1, h2)
        fc_weight, hidden_norm_weight, lws = _weights_in_compute_dtype(ctx, h0.dtype, fc_weight, hidden_norm_weight,
                                                                       (lw0, lw1, lw2))
        T, hidden_t = h0.shape
        H = fc_weight.shape[0]
        with_ln = lw0 is not None
        slices = [fc_weight[:, k * hidden_t:(k + 1) * hidden_t] for k in range(3)]
        g = torch.empty(T, H, dtype=h0.dtype, device=h0.device)
        g_norm = torch.empty(T, H, dtype=h0.dtype, device=h0.device)
        for t0 in range(0, T, chunk):
            rows = slice(t0, t0 + chunk)
            xs = [rms_norm(h[rows], w, eps) if with_ln else h[rows] for h, w in zip(hiddens, lws)]
            acc = torch.mm(xs[0], slices[0].t())
            acc.addmm_(xs[1], slices[1].t()).addmm_(xs[2], slices[2].t())
            g[rows] = acc
            g_norm[rows] = rms_norm(acc, hidden_norm_weight, eps)
            del acc, xs
        ctx.eps, ctx.chunk, ctx.with_ln = eps, chunk, with_ln
        ctx.save_for_backward(fc_weight, hidden_norm_weight, g, h0, h1, h2, *(lws if with_ln else ()))
        return g, g_norm

    @staticmethod
    @autocast_off
    def backward(ctx, dg, dg_norm):
        fc_weight, hidden_norm_weight, g, *rest = ctx.saved_tensors
        hiddens, lws = rest[:3], (rest[3:] if ctx.with_ln else (None, None, None))
        eps, chunk = ctx.eps, ctx.chunk
        T, hidden_t = hiddens[0].shape
        need_h = ctx.needs_input_grad[4:7]
        need_lw = ctx.needs_input_grad[7:10]
        slices = [fc_weight[:, k * hidden_t:(k + 1) * hidden_t] for k in range(3)]
        d_fc = torch.zeros(fc_weight.shape, dtype=torch.float32, device=g.device)
        d_norm = torch.zeros(hidden_norm_weight.shape, dtype=torch.float32, device=g.device)
        d_lw = [torch.zeros(hidden_t, dtype=torch.float32, device=g.device) if ctx.with_ln else None for _ in range(3)]
        d_h = [torch.empty_like(h) if need else None for h, need in zip(hiddens, need_h)]
        for t0 in range(0, T, chunk):
            rows = slice(t0, t0 + chunk)
            g_c = g[rows]
            d_g, d_w = rms_norm_backward(g_c, rms_norm_rstd(g_c, eps), hidden_norm_weight,
                                         _or_zeros(dg_norm, g_c, rows))
            d_norm += d_w
            if dg is not None:
                d_g = d_g + dg[rows]
            for k in range(3):
                h = hiddens[k][rows]
                if ctx.with_ln:
                    rstd = rms_norm_rstd(h, eps)
                    x = (h.float() * rstd[:, None]).to(h.dtype) * lws[k]
                else:
                    x = h
                accumulate_mm(d_fc[:, k * hidden_t:(k + 1) * hidden_t], d_g.t(), x)
                if need_h[k] or (ctx.with_ln and need_lw[k]):
                    d_x = d_g @ slices[k]
                    if ctx.with_ln:
                        d_x, d_wk = rms_norm_backward(h, rstd, lws[k], d_x)
                        d_lw[k] += d_wk
                    if need_h[k]:
                        d_h[k][rows] = d_x
        fc_dtype, norm_dtype, *lw_dtypes = ctx.weight_dtypes
        d_lw = [(d.to(dt) if d is not None else None) for d, dt in zip(d_lw, lw_dtypes)]
        return (None, None, d_fc.to(fc_dtype), d_norm.to(norm_dtype), *d_h, *d_lw)


def _or_zeros(grad: Optional[torch.Tensor], like: torch.Tensor, rows: slice) -> torch.Tensor:
    return grad[rows] if grad is not None else torch.zeros_like(like)


def projection_chunked(hiddens: Sequence[torch.Tensor], fc_weight: torch.Tensor, hidden_norm_weight: torch.Tensor,
                       eps: float, layer_norm_weights: Optional[Sequence[torch.Tensor]] = None,
                       chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU path: three GEMMs per token chunk, recomputation in backward. Inputs are ``[T, Ht]``."""
    lws = tuple(layer_norm_weights) if layer_norm_weights is not None else (None, None, None)
    return _ProjectionChunked.apply(eps, chunk_tokens, fc_weight, hidden_norm_weight, *hiddens, *lws)


# ----------------------------------------------------------------------------------------------
# Triton path
# ----------------------------------------------------------------------------------------------

if triton is not None:
    import triton.language as tl

    from ._common import (_scale_rounded, dot_precision, launch_options, rms_norm_backward_triton, rms_norm_triton,
                          row_rstd_triton)

    @triton.jit
    def _layer_gemm(acc, X, LW, RSTD, W, col0, rows, row_ok, outs, out_ok, HT, stride_x, stride_w,
                    WITH_LN: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, BK: tl.constexpr):
        """acc += x_k[rows] @ fc[outs, col0:col0+HT].T, with x_k = rms_norm(h_k) formed on the fly."""
        if WITH_LN:
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        for k0 in range(0, HT, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < HT
            x = tl.load(X + rows.to(tl.int64)[:, None] * stride_x + ks[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if WITH_LN:
                lw = tl.load(LW + ks, mask=k_ok, other=0.0)
                x = _scale_rounded(x, rstd[:, None], lw[None, :]).to(x.dtype)
            w = tl.load(W + outs.to(tl.int64)[:, None] * stride_w + (col0 + ks)[None, :],
                        mask=out_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:  # the interpreter's tl.dot is wrong on bf16 (docs/design.md §3)
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PREC)
        return acc

    @triton.jit
    def _projection_fwd_kernel(H0, H1, H2, LW0, LW1, LW2, RSTD, W, G, T, HT, HD, stride_x, stride_w, stride_g,
                               WITH_LN: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                               BT: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr):
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        outs = tl.program_id(1) * BH + tl.arange(0, BH)
        row_ok = rows < T
        out_ok = outs < HD
        acc = tl.zeros((BT, BH), tl.float32)
        acc = _layer_gemm(acc, H0, LW0, RSTD, W, 0, rows, row_ok, outs, out_ok, HT, stride_x, stride_w,
                          WITH_LN, UPCAST, PREC, BK)
        acc = _layer_gemm(acc, H1, LW1, RSTD + T, W, HT, rows, row_ok, outs, out_ok, HT, stride_x, stride_w,
                          WITH_LN, UPCAST, PREC, BK)
        acc = _layer_gemm(acc, H2, LW2, RSTD + 2 * T, W, 2 * HT, rows, row_ok, outs, out_ok, HT, stride_x, stride_w,
                          WITH_LN, UPCAST, PREC, BK)
        tl.store(G + rows.to(tl.int64)[:, None] * stride_g + outs[None, :], acc.to(G.dtype.element_ty),
                 mask=row_ok[:, None] & out_ok[None, :])

    _FWD_BLOCKS = dict(gpu=dict(BT=64, BH=128, BK=64, num_warps=8, num_stages=3),
                       interpreter=dict(BT=16, BH=16, BK=16))

    class _ProjectionTriton(torch.autograd.Function):
        @staticmethod
        @autocast_off
        def forward(ctx, eps, fc_weight, hidden_norm_weight, h0, h1, h2, lw0, lw1, lw2):
            hiddens = (h0, h1, h2)
            fc_weight, hidden_norm_weight, lws = _weights_in_compute_dtype(ctx, h0.dtype, fc_weight,
                                                                           hidden_norm_weight, (lw0, lw1, lw2))
            fc_weight, hidden_norm_weight = fc_weight.contiguous(), hidden_norm_weight.contiguous()
            lws = tuple(w.contiguous() if w is not None else None for w in lws)
            T, hidden_t = h0.shape
            H = fc_weight.shape[0]
            with_ln = lw0 is not None
            layer_rstd = torch.empty(3, T, device=h0.device, dtype=torch.float32)
            if with_ln:
                for k in range(3):
                    layer_rstd[k] = row_rstd_triton(hiddens[k], eps)
            g = torch.empty(T, H, device=h0.device, dtype=h0.dtype)
            opts = launch_options(h0.device, **_FWD_BLOCKS)
            grid = (triton.cdiv(T, opts["BT"]), triton.cdiv(H, opts["BH"]))
            _projection_fwd_kernel[grid](
                h0, h1, h2, *(lws if with_ln else (h0, h0, h0)), layer_rstd,
                fc_weight, g, T, hidden_t, H, h0.stride(0), fc_weight.stride(0), g.stride(0),
                WITH_LN=with_ln, UPCAST=INTERPRET, PREC=dot_precision(h0.dtype), **opts)
            g_norm, g_rstd = rms_norm_triton(g, hidden_norm_weight, eps)
            ctx.with_ln, ctx.eps = with_ln, eps
            ctx.save_for_backward(fc_weight, hidden_norm_weight, g, g_rstd, layer_rstd, h0, h1, h2,
                                  *(lws if with_ln else ()))
            return g, g_norm

        @staticmethod
        @autocast_off
        def backward(ctx, dg, dg_norm):
            fc_weight, hidden_norm_weight, g, g_rstd, layer_rstd, *rest = ctx.saved_tensors
            hiddens, lws = rest[:3], (rest[3:] if ctx.with_ln else (None, None, None))
            hidden_t = hiddens[0].shape[1]
            need_h = ctx.needs_input_grad[3:6]
            need_lw = ctx.needs_input_grad[6:9]
            if dg_norm is None:
                dg_norm = torch.zeros_like(g)
            d_g, d_norm = rms_norm_backward_triton(g, g_rstd, hidden_norm_weight, dg_norm.contiguous(),
                                                   dres=dg.contiguous() if dg is not None else None)
            d_fc = torch.empty_like(fc_weight)
            d_h, d_lw = [None] * 3, [None] * 3
            for k in range(3):
                cols = slice(k * hidden_t, (k + 1) * hidden_t)
                h = hiddens[k]
                # Only one layer's normalised input exists at a time, never the concatenation.
                x = rms_norm_triton(h, lws[k], ctx.eps)[0] if ctx.with_ln else h
                d_fc[:, cols] = d_g.t() @ x
                del x
                if need_h[k] or (ctx.with_ln and need_lw[k]):
                    d_x = d_g @ fc_weight[:, cols]
                    if ctx.with_ln:
                        d_x, d_wk = rms_norm_backward_triton(h, layer_rstd[k], lws[k], d_x)
                        d_lw[k] = d_wk.to(ctx.weight_dtypes[2 + k])
                    d_h[k] = d_x if need_h[k] else None
            return None, d_fc.to(ctx.weight_dtypes[0]), d_norm.to(ctx.weight_dtypes[1]), *d_h, *d_lw


def projection_triton(hiddens: Sequence[torch.Tensor], fc_weight: torch.Tensor, hidden_norm_weight: torch.Tensor,
                      eps: float, layer_norm_weights: Optional[Sequence[torch.Tensor]] = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The CUDA path (or CPU under TRITON_INTERPRET=1). Inputs are ``[T, Ht]`` with unit-stride rows."""
    check_impl("triton", hiddens[0].device, "projection")
    hiddens = [h.contiguous() for h in hiddens]
    if len({hiddens[0].stride(0), *(h.stride(0) for h in hiddens)}) != 1:
        raise ValueError("projection: captured layers must share a row stride")
    lws = tuple(layer_norm_weights) if layer_norm_weights is not None else (None, None, None)
    return _ProjectionTriton.apply(eps, fc_weight, hidden_norm_weight, *hiddens, *lws)


def fused_projection(hiddens: Sequence[torch.Tensor], fc_weight: torch.Tensor, hidden_norm_weight: torch.Tensor,
                     eps: float, layer_norm_weights: Optional[Sequence[torch.Tensor]] = None, impl: str = "auto",
                     chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, hidden_norm(g)) from the three captured layers ``[..., Ht]``; outputs are ``[..., H]``.

    ``impl``: reference | chunked | triton | auto (Triton on CUDA, chunked elsewhere).
    """
    _check(hiddens, fc_weight, hidden_norm_weight, layer_norm_weights)
    path = check_impl(impl, hiddens[0].device, "projection")
    if path == "reference":
        return projection_reference(hiddens, fc_weight, hidden_norm_weight, eps, layer_norm_weights)
    lead = hiddens[0].shape[:-1]
    flat = [h.reshape(-1, h.shape[-1]) for h in hiddens]
    if path == "triton":
        g, g_norm = projection_triton(flat, fc_weight, hidden_norm_weight, eps, layer_norm_weights)
    else:
        if chunk_tokens < 1:
            raise ValueError(f"projection: chunk_tokens must be positive, got {chunk_tokens}")
        g, g_norm = projection_chunked(flat, fc_weight, hidden_norm_weight, eps, layer_norm_weights, chunk_tokens)
    return g.reshape(*lead, -1), g_norm.reshape(*lead, -1)
