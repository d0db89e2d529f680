"""Fused vocab-parallel teacher: the target's full-vocabulary argmax (for the position mask), from the
final hidden states and this TP rank's rows of the output layer, without ``[T, V/TP]`` logits.

    logits = hidden @ weight_shard.T                (rounded to the input dtype, as the target computes it)
    target_argmax[t] = global id of max_v logits    (over the FULL vocabulary, reduced over the TP group;
                                                     ties go to the smallest id, as torch.argmax does)

The fused paths walk (token chunk x vocab chunk) tiles and keep a running (max, argmax) per token, so
memory is O(T + tile), flat in V. The reduction over the group is two all-reduces of ``[T]``: MAX of the
values, then MIN of the ids of the ranks that hold it. No gradients: the target is frozen. (The teacher's
draft-vocabulary distribution is not formed here: the fused loss, kernels/ttt_loss.py, builds it tile by
tile from the same final hidden state and the t2d rows of the output layer.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from specforge_mcore import collectives

from ._common import INTERPRET, check_impl, triton

__all__ = ["teacher_reference", "teacher_chunked", "teacher_triton", "fused_teacher"]


def teacher_reference(hidden: torch.Tensor, weight_shard: torch.Tensor, vocab_start: int, group=None
                      ) -> torch.Tensor:
    """What the common reference does: every rank gathers the full-vocabulary logits ``[T, V]``."""
    with torch.no_grad():
        logits = (hidden @ weight_shard.t()).float()
        if group is not None and dist.get_world_size(group) > 1:
            world = dist.get_world_size(group)
            spans = collectives.all_gather(torch.tensor([vocab_start, logits.shape[1]]), group=group)
            widest = max(int(span[1]) for span in spans)
            padded = torch.full((logits.shape[0], widest), float("-inf"), device=logits.device)
            padded[:, :logits.shape[1]] = logits
            pieces = collectives.all_gather(padded, group=group)
            order = sorted(range(world), key=lambda r: int(spans[r][0]))
            vocab_start = int(spans[order[0]][0])
            logits = torch.cat([pieces[r][:, :int(spans[r][1])] for r in order], dim=1)
        return logits.argmax(-1) + vocab_start


def _check(hidden, weight_shard, vocab_start) -> None:
    if hidden.shape[-1] != weight_shard.shape[-1] or weight_shard.dim() != 2:
        raise ValueError(f"teacher: hidden [..., {hidden.shape[-1]}] does not fit the output-layer shard "
                         f"{tuple(weight_shard.shape)}")
    if vocab_start < 0:
        raise ValueError(f"teacher: vocab_start must be >= 0, got {vocab_start}")


def _reduce_over_group(best: torch.Tensor, best_id: torch.Tensor, group) -> torch.Tensor:
    """Global argmax from per-shard (max, id): the largest value wins, then the smallest id among equals."""
    if group is None or dist.get_world_size(group) == 1:
        return best_id
    top = collectives.all_reduce(best.clone(), op="max", group=group)
    return collectives.all_reduce(torch.where(best == top, best_id, torch.iinfo(torch.int64).max), op="min",
                                  group=group)


# ----------------------------------------------------------------------------------------------
# CPU path
# ----------------------------------------------------------------------------------------------


def teacher_chunked(hidden: torch.Tensor, weight_shard: torch.Tensor, vocab_start: int, group=None,
                    chunk_tokens: int = 1024, chunk_vocab: int = 8192) -> torch.Tensor:
    """The CPU path: ``[chunk_tokens, chunk_vocab]`` logits tiles with torch ops. ``hidden`` is ``[T, Ht]``."""
    T = hidden.shape[0]
    rows_in_shard = weight_shard.shape[0]
    best = torch.full((T,), float("-inf"), device=hidden.device)
    best_id = torch.zeros(T, dtype=torch.int64, device=hidden.device)
    with torch.no_grad():
        for t0 in range(0, T, chunk_tokens):
            rows = slice(t0, t0 + chunk_tokens)
            h = hidden[rows]
            for v0 in range(0, rows_in_shard, chunk_vocab):
                logits = (h @ weight_shard[v0:v0 + chunk_vocab].t()).float()
                tile_best, tile_arg = logits.max(-1)
                # Strict '>' keeps the earlier chunk on ties: the smallest id, as torch.argmax.
                better = tile_best > best[rows]
                best_id[rows] = torch.where(better, tile_arg + (vocab_start + v0), best_id[rows])
                best[rows] = torch.where(better, tile_best, best[rows])
                del logits  # before the next tile is allocated, not after
        return _reduce_over_group(best, best_id, group)


# ----------------------------------------------------------------------------------------------
# Triton path
# ----------------------------------------------------------------------------------------------

if triton is not None:
    import triton.language as tl

    from ._common import dot_precision

    @triton.jit
    def _teacher_kernel(HID, W, BEST, BEST_ID, T, HT, VS, v_per_split, stride_h, stride_w,
                        UPCAST: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                        BK: tl.constexpr):
        """One (token block, vocab split): running max/argmax over the split's rows of the shard."""
        split = tl.program_id(1)
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        row_ok = rows < T
        v_begin = split * v_per_split
        v_end = tl.minimum(v_begin + v_per_split, VS)
        best = tl.full((BT,), float("-inf"), tl.float32)
        best_id = tl.zeros((BT,), tl.int32)
        for v0 in range(v_begin, v_end, BV):
            cols = v0 + tl.arange(0, BV)
            col_ok = cols < v_end
            acc = tl.zeros((BT, BV), tl.float32)
            for k0 in range(0, HT, BK):
                ks = k0 + tl.arange(0, BK)
                k_ok = ks < HT
                h = tl.load(HID + rows.to(tl.int64)[:, None] * stride_h + ks[None, :],
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(W + cols.to(tl.int64)[:, None] * stride_w + ks[None, :],
                            mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                if UPCAST:  # the interpreter's tl.dot is wrong on bf16 (docs/design.md §3)
                    h = h.to(tl.float32)
                    w = w.to(tl.float32)
                acc = tl.dot(h, tl.trans(w), acc, input_precision=PREC)
            z = acc.to(HID.dtype.element_ty).to(tl.float32)  # the target's logits are in its dtype
            z_valid = tl.where(col_ok[None, :], z, float("-inf"))
            tile_best, tile_arg = tl.max(z_valid, axis=1, return_indices=True, return_indices_tie_break_left=True)
            best_id = tl.where(tile_best > best, v0 + tile_arg, best_id)
            best = tl.maximum(best, tile_best)
        tl.store(BEST + split * T + rows, best, mask=row_ok)
        tl.store(BEST_ID + split * T + rows, best_id, mask=row_ok)

    _TEACHER_BLOCKS = dict(gpu=dict(BT=64, BV=128, BK=64, num_warps=8, num_stages=3),
                           interpreter=dict(BT=16, BV=16, BK=16))


def teacher_triton(hidden: torch.Tensor, weight_shard: torch.Tensor, vocab_start: int, group=None
                   ) -> torch.Tensor:
    """The CUDA path (or CPU under TRITON_INTERPRET=1). ``hidden`` is ``[T, Ht]``."""
    check_impl("triton", hidden.device, "teacher")
    if hidden.dtype != weight_shard.dtype:
        raise ValueError(f"teacher (triton): hidden ({hidden.dtype}) and weight_shard ({weight_shard.dtype}) "
                         "must share one dtype")
    hidden, weight_shard = hidden.contiguous(), weight_shard.contiguous()
    T, hidden_t = hidden.shape
    rows_in_shard = weight_shard.shape[0]
    opts = dict(_TEACHER_BLOCKS["interpreter" if INTERPRET else "gpu"])
    token_blocks = triton.cdiv(T, opts["BT"])
    if INTERPRET:
        n_splits = min(2, triton.cdiv(rows_in_shard, opts["BV"]))  # two, so the tests cover the merge
    else:
        sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count
        n_splits = max(1, min(triton.cdiv(rows_in_shard, opts["BV"]), triton.cdiv(2 * sms, token_blocks)))
    v_per_split = triton.cdiv(triton.cdiv(rows_in_shard, n_splits), opts["BV"]) * opts["BV"]
    n_splits = triton.cdiv(rows_in_shard, v_per_split)
    best = torch.empty(n_splits, T, device=hidden.device, dtype=torch.float32)
    best_id = torch.empty(n_splits, T, device=hidden.device, dtype=torch.int32)
    _teacher_kernel[(token_blocks, n_splits)](
        hidden, weight_shard, best, best_id, T, hidden_t, rows_in_shard, v_per_split,
        hidden.stride(0), weight_shard.stride(0),
        UPCAST=INTERPRET, PREC=dot_precision(hidden.dtype), **opts)
    # The split holding the best value wins; argmax takes the first on ties, i.e. the lower ids.
    winner = best.argmax(0, keepdim=True)
    shard_best = best.gather(0, winner)[0]
    shard_id = best_id.gather(0, winner)[0].to(torch.int64) + vocab_start
    return _reduce_over_group(shard_best, shard_id, group)


def fused_teacher(hidden: torch.Tensor, weight_shard: torch.Tensor, vocab_start: int, group=None,
                  impl: str = "auto", chunk_tokens: int = 1024, chunk_vocab: int = 8192
                  ) -> torch.Tensor:
    """The target's argmax, int64 ``[...]`` global ids.

    ``hidden`` is ``[..., Ht]`` (after the target's final norm); ``weight_shard`` holds the output-layer rows
    ``vocab_start .. vocab_start + V_shard`` of this rank; ``group`` is the TP group (None: one shard).
    ``impl``: reference | chunked | triton | auto (Triton on CUDA, chunked elsewhere).
    """
    _check(hidden, weight_shard, vocab_start)
    path = check_impl(impl, hidden.device, "teacher")
    lead = hidden.shape[:-1]
    flat = hidden.reshape(-1, hidden.shape[-1])
    if path == "reference":
        argmax = teacher_reference(flat, weight_shard, vocab_start, group)
    elif path == "triton":
        argmax = teacher_triton(flat, weight_shard, vocab_start, group)
    else:
        if chunk_tokens < 1 or chunk_vocab < 1:
            raise ValueError(f"teacher: chunk sizes must be positive, got {chunk_tokens}, {chunk_vocab}")
        argmax = teacher_chunked(flat, weight_shard, vocab_start, group, chunk_tokens, chunk_vocab)
    return argmax.reshape(lead)
