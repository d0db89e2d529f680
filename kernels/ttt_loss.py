"""Fused draft head + TTT loss for one TTT step, without a ``[T, Vd]`` logits tensor kept for backward.

    z      = rms_norm(o, norm) @ lm_head.T                    draft logits (fp32 accumulation)
    p      = softmax(teacher_hidden @ teacher_weight.T)      teacher over the draft vocabulary
    loss   = weight * sum_{t: mask} -sum_v p[t, v] * log_softmax(z[t])[v]
    hits[t] = mask[t] and argmax z[t] == argmax teacher[t]     (correct = the number of hits)

The per-position loss is rewritten as ``lse(z) - sum_v p_v z_v``, so a pass over the vocabulary
needs only running values per token: the max and sum-exp of z (online logsumexp), of the teacher logits,
the p-weighted sum of z, and the two running argmaxes. Backward keeps those per-token statistics and
recomputes logits tile by tile: ``dz = coef * (softmax(z) - p)``.

The teacher is ``teacher_hidden [T, Ht]`` (the target's final hidden state) with ``teacher_weight [Vd, Ht]``
(the t2d rows of the target's output layer); its logits are formed in the same tiles as the draft's (two
GEMMs, two online softmaxes, one pass over Vd), never as a ``[T, Vd]`` tensor. The teacher gets no
gradient (the target is frozen).

Objectives (``objective``), per position inside the mask, with ``q = softmax(z)``:

* ``soft_ce``     ``-sum_v p_v log q_v`` (the default; EAGLE-3's loss);
* ``forward_kl``  ``KL(p || q) = sum_v p_v (log p_v - log q_v)``: soft_ce minus the teacher's entropy, so the
  same gradient, and a value that reads 0 at the optimum;
* ``lk_alpha``    ``-log alpha`` with ``alpha = sum_v min(p_v, q_v) = 1 - TV(p, q)``, the probability that
  speculative sampling accepts the draft's token (an LK loss, arXiv 2602.23881: it optimizes the acceptance
  rate itself). ``d(-log alpha)/dz_j = q_j (S - [q_j < p_j]) / alpha`` with ``S = sum_{v: q_v < p_v} q_v``.

The Triton path computes soft_ce; the others take the chunked path (a full ``[chunk, Vd]`` row is needed
for ``alpha``).

Paths: ``ttt_step_loss_reference`` (materialised logits: the spec), ``ttt_step_loss_chunked`` (CPU: token
chunks with torch ops, recompute in backward), ``ttt_step_loss_triton`` (CUDA: a Triton kernel for the
statistics, a Triton kernel that writes one token chunk's dz, cuBLAS for dx and dW).
"""

from __future__ import annotations

from typing import Union

import torch

from ._common import (INTERPRET, accumulate_mm, autocast_off, check_impl, in_dtype, rms_norm, rms_norm_backward,
                      rms_norm_rstd, triton)

__all__ = ["ttt_step_loss_reference", "ttt_step_loss_chunked", "ttt_step_loss_triton", "fused_ttt_step_loss",
           "OBJECTIVES"]

Weight = Union[float, torch.Tensor]
OBJECTIVES = ("soft_ce", "forward_kl", "lk_alpha")
_TINY = torch.finfo(torch.float32).tiny  # alpha's floor: -log alpha stays finite if p and q never overlap


@autocast_off
def ttt_step_loss_reference(o: torch.Tensor, norm_weight: torch.Tensor, lm_head_weight: torch.Tensor, eps: float,
                            position_mask: torch.Tensor, weight: Weight, *, teacher_hidden: torch.Tensor,
                            teacher_weight: torch.Tensor, objective: str = "soft_ce") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum, hits) with the full ``[T, Vd]`` logits: the spec the fused paths are tested against.
    Computes in ``o``'s dtype (the head's weights cast to it; the teacher's GEMM in teacher_hidden's), with
    or without autocast around it."""
    norm_weight, lm_head_weight = in_dtype(norm_weight, o.dtype), in_dtype(lm_head_weight, o.dtype)
    logits = (rms_norm(o, norm_weight, eps) @ lm_head_weight.t()).float()
    teacher_logits = (teacher_hidden @ in_dtype(teacher_weight, teacher_hidden.dtype).t()).float()
    probs = torch.softmax(teacher_logits, -1)
    teacher_choice = teacher_logits.argmax(-1)
    log_q = torch.log_softmax(logits, -1)
    if objective == "soft_ce":
        per_position = -(probs * log_q).sum(-1)
    elif objective == "forward_kl":
        per_position = (probs * (torch.log_softmax(teacher_logits, -1) - log_q)).sum(-1)
    else:
        per_position = -torch.minimum(probs, log_q.exp()).sum(-1).clamp_min(_TINY).log()
    mask = position_mask.bool()
    loss_sum = weight * torch.where(mask, per_position, 0.0).sum()
    hits = (logits.argmax(-1) == teacher_choice) & mask
    return loss_sum, hits


def _check(o, norm_weight, lm_head_weight, position_mask, teacher_hidden, teacher_weight) -> None:
    H = o.shape[-1]
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != H:
        raise ValueError(f"ttt loss: lm_head.weight has shape {tuple(lm_head_weight.shape)}, expected [Vd, {H}]")
    vocab = lm_head_weight.shape[0]
    if norm_weight.shape != (H,):
        raise ValueError(f"ttt loss: norm.weight has shape {tuple(norm_weight.shape)}, expected [{H}]")
    if position_mask.shape != o.shape[:-1]:
        raise ValueError(f"ttt loss: position_mask has shape {tuple(position_mask.shape)}, "
                         f"expected {tuple(o.shape[:-1])}")
    if teacher_weight is None or teacher_weight.dim() != 2 or teacher_weight.shape[0] != vocab:
        raise ValueError(f"ttt loss: teacher_weight must be [{vocab}, Ht] "
                         "(the t2d rows of the target's output layer)")
    if teacher_hidden is None or teacher_hidden.shape != (*o.shape[:-1], teacher_weight.shape[1]):
        got = tuple(teacher_hidden.shape) if teacher_hidden is not None else None
        raise ValueError(f"ttt loss: teacher_hidden has shape {got}, "
                         f"expected {(*o.shape[:-1], teacher_weight.shape[1])}")
    if teacher_hidden.requires_grad or teacher_weight.requires_grad:
        raise ValueError("ttt loss: the teacher comes from the frozen target and must not require grad")


def _compute_dtype(ctx, o, norm_weight, lm_head_weight, teacher_hidden, teacher_weight):
    """The dtype policy: the head's weights (fp32 masters) cast to ``o``'s dtype, the teacher's rows to the
    teacher hidden's; the parameters' own dtypes are kept on ``ctx`` for the gradients backward returns."""
    ctx.weight_dtypes = (norm_weight.dtype, lm_head_weight.dtype)
    return (in_dtype(norm_weight, o.dtype), in_dtype(lm_head_weight, o.dtype),
            in_dtype(teacher_weight, teacher_hidden.dtype))


def _coefficients(grad_loss: torch.Tensor, weight: Weight, position_mask: torch.Tensor) -> torch.Tensor:
    """d loss_sum / d per_position[t]: the upstream gradient times the step weight, zero off the mask."""
    return grad_loss.float() * weight * position_mask.float()


# ----------------------------------------------------------------------------------------------
# CPU path
# ----------------------------------------------------------------------------------------------


def _chunk_teacher(rows: torch.Tensor, teacher_hidden, teacher_weight) -> torch.Tensor:
    """The teacher's logits at ``rows`` as a fresh fp32 tensor."""
    return (teacher_hidden.index_select(0, rows) @ teacher_weight.t()).float()


def _logsumexp_(x: torch.Tensor) -> torch.Tensor:
    """Row logsumexp of ``x``, overwriting ``x`` (torch.logsumexp would allocate another [rows, Vd])."""
    top = x.amax(-1)
    return top + x.sub_(top[:, None]).exp_().sum(-1).log_()


def _softmax_(x: torch.Tensor) -> torch.Tensor:
    """Turn logits ``x`` into probabilities in place; return their logsumexp."""
    top = x.amax(-1)
    total = x.sub_(top[:, None]).exp_().sum(-1)
    x.div_(total[:, None])
    return top + total.log()


class _TTTLossChunked(torch.autograd.Function):
    """Only positions inside the mask are computed at all: they are gathered chunk by chunk (masked
    positions add nothing to the loss or the gradients, and the reference pays for them in full)."""

    @staticmethod
    @autocast_off
    def forward(ctx, eps, chunk, weight, objective, o, norm_weight, lm_head_weight, position_mask,
                teacher_hidden, teacher_weight):
        norm_weight, lm_head_weight, teacher_weight = _compute_dtype(ctx, o, norm_weight, lm_head_weight,
                                                                     teacher_hidden, teacher_weight)
        valid = torch.nonzero(position_mask).squeeze(1)
        lse = torch.empty(len(valid), dtype=torch.float32, device=o.device)
        teacher_lse = torch.empty_like(lse)
        alpha = torch.empty_like(lse) if objective == "lk_alpha" else lse[:0]
        total = torch.zeros((), dtype=torch.float32, device=o.device)
        hits = torch.zeros(o.shape[0], dtype=torch.bool, device=o.device)
        for c0 in range(0, len(valid), chunk):
            rows, span = valid[c0:c0 + chunk], slice(c0, c0 + chunk)
            # Two [chunk, Vd] fp32 buffers, the draft's and the teacher's, transformed in place.
            logits = (rms_norm(o.index_select(0, rows), norm_weight, eps) @ lm_head_weight.t()).float()
            teacher = _chunk_teacher(rows, teacher_hidden, teacher_weight)
            hits[rows] = logits.argmax(-1) == teacher.argmax(-1)
            teacher_lse[span] = _softmax_(teacher)
            if objective == "lk_alpha":
                lse[span] = _softmax_(logits)
                alpha[span] = torch.minimum(teacher, logits).sum(-1).clamp_min_(_TINY)
                total -= alpha[span].log().sum()
            else:
                entropy = torch.special.entr(teacher).sum(-1) if objective == "forward_kl" else 0.0
                # sum_v p log_softmax(z)_v = lse(z) - sum_v p_v z_v  (sum_v p_v = 1)
                cross = teacher.mul_(logits).sum(-1)
                lse[span] = _logsumexp_(logits)
                total += (lse[span] - cross - entropy).sum()
            del logits, teacher  # before the next chunk's are allocated, not after
        ctx.eps, ctx.chunk, ctx.weight, ctx.objective = eps, chunk, weight, objective
        ctx.save_for_backward(o, norm_weight, lm_head_weight, valid, lse, teacher_lse, alpha, teacher_hidden,
                              teacher_weight)
        ctx.mark_non_differentiable(hits)
        return weight * total, hits

    @staticmethod
    @autocast_off
    def backward(ctx, grad_loss, _grad_hits):
        o, norm_weight, lm_head_weight, valid, lse, teacher_lse, alpha, teacher_hidden, teacher_weight = ctx.saved_tensors
        need_o, need_norm, need_head = ctx.needs_input_grad[4:7]
        coef = grad_loss.float() * ctx.weight  # the same for every position inside the mask
        H = o.shape[1]
        d_o = torch.zeros_like(o) if need_o else None
        d_norm = torch.zeros(H, dtype=torch.float32, device=o.device)
        d_head = torch.zeros(lm_head_weight.shape, dtype=torch.float32, device=o.device) if need_head else None
        for c0 in range(0, len(valid), ctx.chunk):
            rows, span = valid[c0:c0 + ctx.chunk], slice(c0, c0 + ctx.chunk)
            o_c = o.index_select(0, rows)
            rstd = rms_norm_rstd(o_c, ctx.eps)
            normed = (o_c.float() * rstd[:, None]).to(o.dtype) * norm_weight
            q = (normed @ lm_head_weight.t()).float().sub_(lse[span, None]).exp_()
            teacher_c = _chunk_teacher(rows, teacher_hidden, teacher_weight).sub_(teacher_lse[span, None]).exp_()
            if ctx.objective == "lk_alpha":
                # dz = coef * q * (S - [q < p]) / alpha, S = sum of q where q < p
                below = q < teacher_c
                del teacher_c
                mass = torch.where(below, q, 0.0).sum(-1)
                d_logits = q.mul_(mass[:, None] - below.float()).mul_((coef / alpha[span])[:, None]).to(o.dtype)
            else:
                # dz = coef * (softmax(z) - p), built in place in the recomputed logits buffer.
                d_logits = q.sub_(teacher_c).mul_(coef).to(o.dtype)
                del teacher_c
            if need_head:
                accumulate_mm(d_head, d_logits.t(), normed)
            if need_o or need_norm:
                d_o_c, d_norm_c = rms_norm_backward(o_c, rstd, norm_weight, d_logits @ lm_head_weight)
                d_norm += d_norm_c
                if need_o:
                    d_o.index_copy_(0, rows, d_o_c)
            del d_logits  # before the next chunk's is allocated, not after
        return (None, None, None, None, d_o, d_norm.to(ctx.weight_dtypes[0]) if need_norm else None,
                d_head.to(ctx.weight_dtypes[1]) if need_head else None, None, None, None)


def ttt_step_loss_chunked(o, norm_weight, lm_head_weight, eps, position_mask, weight, *, teacher_hidden,
                          teacher_weight, chunk_tokens: int = 1024, objective: str = "soft_ce"):
    """The CPU path (and every objective but soft_ce on CUDA): chunks of ``chunk_tokens`` positions inside the
    mask, per-position statistics saved, logits recomputed in backward."""
    return _TTTLossChunked.apply(eps, chunk_tokens, weight, objective, o, norm_weight, lm_head_weight,
                                 position_mask.bool(), teacher_hidden, teacher_weight)


# ----------------------------------------------------------------------------------------------
# Triton path
# ----------------------------------------------------------------------------------------------

if triton is not None:
    import triton.language as tl

    from ._common import _scale_rounded, dot_precision, launch_options, rms_norm_backward_triton, rms_norm_triton, \
        row_rstd_triton

    @triton.jit
    def _logits_tile(X, stride_x, rows, row_ok, rstd, NW, W, stride_w, cols, col_ok, K,
                     NORM: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                     BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
        """fp32 ``[BT, BV]`` tile of (rms_norm(x) if NORM else x) @ W[cols].T, rounded to x's dtype like the
        reference's GEMM output."""
        acc = tl.zeros((BT, BV), tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < K
            x = tl.load(X + rows.to(tl.int64)[:, None] * stride_x + ks[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if NORM:
                nw = tl.load(NW + ks, mask=k_ok, other=0.0)
                x = _scale_rounded(x, rstd[:, None], nw[None, :]).to(x.dtype)
            w = tl.load(W + cols.to(tl.int64)[:, None] * stride_w + ks[None, :],
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:  # the interpreter's tl.dot is wrong on bf16 (docs/design.md §3)
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PREC)
        return acc.to(X.dtype.element_ty).to(tl.float32)

    @triton.jit
    def _ttt_loss_fwd_kernel(O, RSTD, NW, WL, TH, TW, STATS, CHOICE, T, H, HT, VD, v_per_split,
                             stride_o, stride_wl, stride_th, stride_tw,
                             UPCAST: tl.constexpr, PREC: tl.constexpr,
                             TPREC: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
        """Per (token block, vocab split): online statistics of draft and teacher over the split's columns.

        STATS[:, split, t] = (max z, sum exp(z - max), teacher max, teacher sum-exp, teacher-weighted sum of
        z (relative to the teacher max), best teacher logit), CHOICE[:, split, t] = (argmax z, argmax teacher).
        """
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        row_ok = rows < T
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        v_begin = split * v_per_split
        v_end = tl.minimum(v_begin + v_per_split, VD)
        m = tl.full((BT,), float("-inf"), tl.float32)
        s = tl.zeros((BT,), tl.float32)
        best_idx = tl.zeros((BT,), tl.int32)
        t_m = tl.full((BT,), float("-inf"), tl.float32)
        t_s = tl.zeros((BT,), tl.float32)
        t_best = tl.full((BT,), float("-inf"), tl.float32)
        t_idx = tl.zeros((BT,), tl.int32)
        cross = tl.zeros((BT,), tl.float32)
        for v0 in range(v_begin, v_end, BV):
            cols = v0 + tl.arange(0, BV)
            col_ok = cols < v_end
            z = _logits_tile(O, stride_o, rows, row_ok, rstd, NW, WL, stride_wl, cols, col_ok, H,
                             True, UPCAST, PREC, BT, BV, BK)
            z = tl.where(col_ok[None, :], z, float("-inf"))
            tile_max, tile_arg = tl.max(z, axis=1, return_indices=True, return_indices_tie_break_left=True)
            # m doubles as the running best value: strict '>' keeps the earliest column on ties.
            best_idx = tl.where(tile_max > m, v0 + tile_arg, best_idx)
            m_new = tl.maximum(m, tile_max)
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
            m = m_new
            z0 = tl.where(col_ok[None, :], z, 0.0)
            tz = _logits_tile(TH, stride_th, rows, row_ok, rstd, NW, TW, stride_tw, cols, col_ok, HT,
                              False, UPCAST, TPREC, BT, BV, BK)
            tz = tl.where(col_ok[None, :], tz, float("-inf"))
            t_max, t_arg = tl.max(tz, axis=1, return_indices=True, return_indices_tie_break_left=True)
            t_idx = tl.where(t_max > t_best, v0 + t_arg, t_idx)
            t_best = tl.maximum(t_best, t_max)
            t_new = tl.maximum(t_m, t_max)
            scale = tl.exp(t_m - t_new)
            e = tl.exp(tz - t_new[:, None])
            t_s = t_s * scale + tl.sum(e, axis=1)
            cross = cross * scale + tl.sum(e * z0, axis=1)
            t_m = t_new
        base = split * T + rows
        plane = n_splits * T
        tl.store(STATS + base, m, mask=row_ok)
        tl.store(STATS + plane + base, s, mask=row_ok)
        tl.store(STATS + 2 * plane + base, t_m, mask=row_ok)
        tl.store(STATS + 3 * plane + base, t_s, mask=row_ok)
        tl.store(STATS + 4 * plane + base, cross, mask=row_ok)
        tl.store(STATS + 5 * plane + base, t_best, mask=row_ok)
        tl.store(CHOICE + base, best_idx, mask=row_ok)
        tl.store(CHOICE + plane + base, t_idx, mask=row_ok)

    @triton.jit
    def _ttt_loss_dlogits_kernel(O, RSTD, NW, WL, TH, TW, LSE, TLSE, COEF, DZ, T, H, HT, VD,
                                 stride_o, stride_wl, stride_th, stride_tw, stride_dz,
                                 UPCAST: tl.constexpr, PREC: tl.constexpr,
                                 TPREC: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
        """dz = coef * (softmax(z) - p) for one tile, logits recomputed from o and the teacher."""
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        cols = tl.program_id(1) * BV + tl.arange(0, BV)
        row_ok = rows < T
        col_ok = cols < VD
        ok = row_ok[:, None] & col_ok[None, :]
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        coef = tl.load(COEF + rows, mask=row_ok, other=0.0)
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        t_lse = tl.load(TLSE + rows, mask=row_ok, other=0.0)
        z = _logits_tile(O, stride_o, rows, row_ok, rstd, NW, WL, stride_wl, cols, col_ok, H,
                         True, UPCAST, PREC, BT, BV, BK)
        q = tl.exp(z - lse[:, None])
        tz = _logits_tile(TH, stride_th, rows, row_ok, rstd, NW, TW, stride_tw, cols, col_ok, HT,
                          False, UPCAST, TPREC, BT, BV, BK)
        dz = q - tl.exp(tz - t_lse[:, None])
        dz = dz * coef[:, None]
        tl.store(DZ + rows.to(tl.int64)[:, None] * stride_dz + cols[None, :], dz.to(DZ.dtype.element_ty), mask=ok)

    _LOSS_BLOCKS = dict(gpu=dict(BT=64, BV=128, BK=64, num_warps=8, num_stages=3),
                        interpreter=dict(BT=16, BV=16, BK=16))

    def _splits(device: torch.device, token_blocks: int, vocab: int, bv: int) -> int:
        """Vocabulary splits so that short sequences still fill the GPU (flash-decoding style)."""
        if INTERPRET:
            return min(2, triton.cdiv(vocab, bv))  # two, so the tests cover the merge
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(triton.cdiv(vocab, bv), triton.cdiv(2 * sms, token_blocks)))

    class _TTTLossTriton(torch.autograd.Function):
        @staticmethod
        @autocast_off
        def forward(ctx, eps, chunk, weight, o, norm_weight, lm_head_weight, position_mask,
                    teacher_hidden, teacher_weight):
            norm_weight, lm_head_weight, teacher_weight = _compute_dtype(ctx, o, norm_weight, lm_head_weight,
                                                                         teacher_hidden, teacher_weight)
            norm_weight, lm_head_weight = norm_weight.contiguous(), lm_head_weight.contiguous()
            th, tw = teacher_hidden, teacher_weight.contiguous()
            T, H = o.shape
            vocab = lm_head_weight.shape[0]
            rstd = row_rstd_triton(o, eps)
            opts = launch_options(o.device, **_LOSS_BLOCKS)
            token_blocks = triton.cdiv(T, opts["BT"])
            n_splits = _splits(o.device, token_blocks, vocab, opts["BV"])
            v_per_split = triton.cdiv(triton.cdiv(vocab, n_splits), opts["BV"]) * opts["BV"]
            n_splits = triton.cdiv(vocab, v_per_split)  # no empty split
            stats = torch.empty(6, n_splits, T, device=o.device, dtype=torch.float32)
            choice = torch.empty(2, n_splits, T, device=o.device, dtype=torch.int32)
            _ttt_loss_fwd_kernel[(token_blocks, n_splits)](
                o, rstd, norm_weight, lm_head_weight, th, tw, stats, choice, T, H, th.shape[1], vocab,
                v_per_split, o.stride(0), lm_head_weight.stride(0), th.stride(0), tw.stride(0),
                UPCAST=INTERPRET, PREC=dot_precision(o.dtype), TPREC=dot_precision(th.dtype), **opts)
            m, s, t_m, t_s, cross, t_best = stats.unbind(0)
            top = m.max(0).values
            lse = top + torch.log((s * torch.exp(m - top)).sum(0))
            t_top = t_m.max(0).values
            rescale = torch.exp(t_m - t_top)
            t_sum = (t_s * rescale).sum(0)
            teacher_lse = t_top + torch.log(t_sum)
            per_position = lse - (cross * rescale).sum(0) / t_sum
            # The split holding the best value wins; argmax takes the first split on ties, i.e. the lower id.
            draft_choice = choice[0].gather(0, m.argmax(0, keepdim=True))[0]
            teacher_choice = choice[1].gather(0, t_best.argmax(0, keepdim=True))[0]
            mask = position_mask.bool()
            loss_sum = weight * torch.where(mask, per_position, 0.0).sum()
            hits = (draft_choice == teacher_choice) & mask
            ctx.eps, ctx.chunk, ctx.weight = eps, chunk, weight
            ctx.save_for_backward(o, norm_weight, lm_head_weight, mask, rstd, lse, teacher_lse, th, tw)
            ctx.mark_non_differentiable(hits)
            return loss_sum, hits

        @staticmethod
        @autocast_off
        def backward(ctx, grad_loss, _grad_hits):
            o, norm_weight, lm_head_weight, mask, rstd, lse, teacher_lse, th, tw = ctx.saved_tensors
            need_o, need_norm, need_head = ctx.needs_input_grad[3:6]
            coef = _coefficients(grad_loss, ctx.weight, mask).contiguous()
            T, H = o.shape
            vocab = lm_head_weight.shape[0]
            opts = launch_options(o.device, **_LOSS_BLOCKS)
            d_o = torch.empty_like(o) if need_o else None
            d_norm = torch.zeros(H, dtype=torch.float32, device=o.device)
            d_head = torch.zeros(lm_head_weight.shape, dtype=torch.float32, device=o.device) if need_head else None
            for t0 in range(0, T, ctx.chunk):
                rows = slice(t0, t0 + ctx.chunk)
                o_c = o[rows]
                n = o_c.shape[0]
                d_logits = torch.empty(n, vocab, device=o.device, dtype=o.dtype)
                _ttt_loss_dlogits_kernel[(triton.cdiv(n, opts["BT"]), triton.cdiv(vocab, opts["BV"]))](
                    o_c, rstd[rows], norm_weight, lm_head_weight, th[rows], tw, lse[rows], teacher_lse[rows],
                    coef[rows], d_logits, n, H, th.shape[1], vocab, o.stride(0), lm_head_weight.stride(0),
                    th.stride(0), tw.stride(0), d_logits.stride(0),
                    UPCAST=INTERPRET, PREC=dot_precision(o.dtype), TPREC=dot_precision(th.dtype), **opts)
                if need_head:
                    accumulate_mm(d_head, d_logits.t(), rms_norm_triton(o_c, norm_weight, ctx.eps)[0])
                if need_o or need_norm:
                    d_o_c, d_norm_c = rms_norm_backward_triton(o_c, rstd[rows], norm_weight,
                                                               d_logits @ lm_head_weight)
                    d_norm += d_norm_c
                    if need_o:
                        d_o[rows] = d_o_c
            return (None, None, None, d_o, d_norm.to(ctx.weight_dtypes[0]) if need_norm else None,
                    d_head.to(ctx.weight_dtypes[1]) if need_head else None, None, None, None)


def ttt_step_loss_triton(o, norm_weight, lm_head_weight, eps, position_mask, weight, *, teacher_hidden,
                         teacher_weight, chunk_tokens: int = 1024):
    """The CUDA path (or CPU under TRITON_INTERPRET=1); ``chunk_tokens`` bounds backward's dz buffer."""
    check_impl("triton", o.device, "loss")
    return _TTTLossTriton.apply(eps, chunk_tokens, weight, o.contiguous(), norm_weight, lm_head_weight,
                                position_mask.bool(), teacher_hidden.contiguous(), teacher_weight)


def fused_ttt_step_loss(o: torch.Tensor, norm_weight: torch.Tensor, lm_head_weight: torch.Tensor, eps: float,
                        position_mask: torch.Tensor, weight: Weight, *, teacher_hidden: torch.Tensor,
                        teacher_weight: torch.Tensor, impl: str = "auto", chunk_tokens: int = 1024,
                        return_hits: bool = False, objective: str = "soft_ce") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum fp32 scalar, correct int64 scalar) of one TTT step; ``o`` is ``[..., H]``, the mask ``[...]``,
    the teacher the target's final hidden state ``[..., Ht]`` and the t2d rows of its output layer ``[Vd, Ht]``.
    ``return_hits``: instead of the count, the bool ``[...]`` of positions inside the mask where the draft's
    argmax equals the teacher's (per-position acceptance, for the chained acceptance estimate).

    ``weight`` scales the masked sum (the caller passes ``decay**i / valid_count_i``).
    ``impl``: reference | chunked | triton | auto (Triton on CUDA, chunked elsewhere; chunked for every
    ``objective`` but soft_ce). ``objective``: soft_ce | forward_kl | lk_alpha (see the module docstring).
    """
    _check(o, norm_weight, lm_head_weight, position_mask, teacher_hidden, teacher_weight)
    if objective not in OBJECTIVES:
        raise ValueError(f"ttt loss: objective={objective!r}, expected one of {', '.join(OBJECTIVES)}")
    path = check_impl(impl, o.device, "loss")
    if path == "triton" and objective != "soft_ce":
        if impl == "triton":
            raise ValueError(f"ttt loss: objective={objective} runs on the chunked path; the Triton kernel computes "
                             "soft_ce only (use kernels.loss=auto or chunked)")
        path = "chunked"
    teacher = dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, objective=objective)
    if path == "reference":
        loss, hits = ttt_step_loss_reference(o, norm_weight, lm_head_weight, eps, position_mask, weight, **teacher)
        return loss, (hits if return_hits else hits.sum())
    if chunk_tokens < 1:
        raise ValueError(f"ttt loss: chunk_tokens must be positive, got {chunk_tokens}")
    H = o.shape[-1]
    lead = position_mask.shape
    o = o.reshape(-1, H)
    position_mask = position_mask.reshape(-1)
    teacher["teacher_hidden"] = teacher_hidden.reshape(o.shape[0], -1)
    if path == "triton":
        del teacher["objective"]  # soft_ce
        loss, hits = ttt_step_loss_triton(o, norm_weight, lm_head_weight, eps, position_mask, weight,
                                          chunk_tokens=chunk_tokens, **teacher)
    else:
        loss, hits = ttt_step_loss_chunked(o, norm_weight, lm_head_weight, eps, position_mask, weight,
                                           chunk_tokens=chunk_tokens, **teacher)
    return loss, (hits.reshape(lead) if return_hits else hits.sum())
