"""Training-time test (TTT): the draft unrolled for S steps over a packed batch, with the EAGLE-3 loss.

Everything is flat over the T = n·s packed tokens of this rank's shard (rows concatenated). At step i,
position t:

* the hidden input is g_t = fc(features_t) at step 0, else the layer output of step i-1 at t;
* the token input is token t+1+i (the embedding of the token the draft has "just produced");
* the query (RoPE position p_t + i) sees the step-0 keys at positions <= t of its document and the
  keys of steps 1..i at t;
* the teacher is the target's distribution at t+1+i (which predicts token t+2+i), restricted to the
  draft vocabulary and renormalised;
* the position counts when token t+2+i is in t's document, is an assistant token (the mask refers to
  the predicted token: what the draft faces when serving), and the target's full-vocabulary argmax
  at t+1+i lies in the draft vocabulary.

Loss: Σ_i decay^i · L_i with L_i the soft cross-entropy summed over valid positions and divided by the
number of valid positions of step i over the whole world (``step_weights``): every rank's gradient is
then a plain sum, and padding never dilutes the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from specforge_mcore.draft.model import Eagle3Draft


@dataclass
class DraftBatch:
    """This rank's shard: n packed rows of s tokens, plus what the target computed for them."""

    input_ids: torch.Tensor  # [n, s]
    position_ids: torch.Tensor  # [n, s], restarting per document
    document_ids: torch.Tensor  # [n, s], per row
    assistant_mask: torch.Tensor  # [n, s] bool: token is an assistant token
    aux_hidden: list[torch.Tensor]  # three [n, s, H_t]
    final_hidden: torch.Tensor  # [n, s, H_t]
    target_argmax: torch.Tensor  # [n, s] int64, full vocabulary

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def flat_document_keys(document_ids: torch.Tensor) -> torch.Tensor:
    """A key per token, equal exactly for tokens of the same document of the same row."""
    n, s = document_ids.shape
    row = torch.arange(n, device=document_ids.device)[:, None]
    return (row * (s + 1) + document_ids.long()).reshape(-1)


def cu_seqlens_from(document_ids: torch.Tensor) -> torch.Tensor:
    keys = flat_document_keys(document_ids)
    starts = torch.nonzero(keys[1:] != keys[:-1]).flatten() + 1
    zero = torch.zeros(1, dtype=starts.dtype, device=keys.device)
    end = torch.tensor([keys.numel()], dtype=starts.dtype, device=keys.device)
    return torch.cat([zero, starts, end]).to(torch.int32)


def shift(flat: torch.Tensor, k: int, fill=0) -> torch.Tensor:
    """out[t] = flat[t + k] (first dim), filled past the end."""
    if k == 0:
        return flat
    pad = flat.new_full((k,) + tuple(flat.shape[1:]), fill)
    return torch.cat([flat[k:], pad], dim=0)


def position_masks(batch: DraftBatch, t2d: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Per step, [T] bool: which positions are supervised (see module doc)."""
    keys = flat_document_keys(batch.document_ids)
    assistant = batch.assistant_mask.reshape(-1)
    in_draft = t2d[batch.target_argmax.reshape(-1)]
    masks = []
    for i in range(steps):
        same_doc = shift(keys, 2 + i, fill=-1) == keys
        masks.append(same_doc & shift(assistant, 2 + i, fill=False) & shift(in_draft, 1 + i, fill=False))
    return masks


def step_weights(valid_counts: torch.Tensor, decay: float) -> list[float]:
    """decay^i / (valid positions of step i over the world); 0 for a step with none."""
    return [decay ** i / float(c) if c > 0 else 0.0 for i, c in enumerate(valid_counts.tolist())]


@dataclass
class TTTOutput:
    loss: torch.Tensor  # differentiable: Σ_i weight_i · Σ_t CE (this rank's part of the global loss)
    weighted_step_losses: torch.Tensor  # [S], detached: weight_i · Σ_t CE
    correct: torch.Tensor  # [S] int64: argmax agreements on valid positions
    valid: torch.Tensor  # [S] int64: valid positions on this rank
    # With chain_stats: [2, S] int64, per step i, the positions whose draft chain reached step i (valid at i,
    # steps < i all right) and those where step i was right as well: their ratio is the conditional
    # acceptance a_i of the chained acceptance-length estimate (docs/design.md §10).
    chain: Optional[torch.Tensor] = None
    # With chain_stats: [2] int64, the greedy decoding walked over the rows (``decoding_walk``): tokens
    # emitted and verifications; their ratio is the simulated acceptance length.
    walk: Optional[torch.Tensor] = None


def ttt_unroll(draft: Eagle3Draft, batch: DraftBatch, masks: list[torch.Tensor], weights: list[float],
               attention: Callable, teacher_weight: torch.Tensor, loss_impl: str = "auto",
               projection_impl: str = "auto", loss_chunk_tokens: int = 1024, chain_stats: bool = False,
               objective: str = "soft_ce") -> TTTOutput:
    """Unroll the draft for ``len(masks)`` steps and return the weighted EAGLE-3 loss (module doc).
    ``chain_stats``: also count, per step, the draft chains (rooted at each position) that reach it and pass it.
    ``objective``: the per-position loss against the teacher, soft_ce | forward_kl | lk_alpha
    (``kernels/ttt_loss.py``)."""
    from specforge_mcore.kernels.ttt_loss import fused_ttt_step_loss

    arch = draft.arch
    layer = draft.midlayer
    tokens = batch.num_tokens
    ids = batch.input_ids.reshape(-1)
    positions = batch.position_ids.reshape(-1)
    cu_seqlens = cu_seqlens_from(batch.document_ids)
    final_hidden = batch.final_hidden.reshape(tokens, -1)
    aux = [h.reshape(tokens, -1) for h in batch.aux_hidden]

    hidden, hidden_normed = draft.project(aux, impl=projection_impl)
    k_steps, v_steps = [], []
    k0 = v0 = None
    losses, corrects = [], []
    reached, accepted, all_right = [], [], None  # all_right[t]: steps so far all right at position t
    rights = []  # all_right after each step
    for i, (mask, weight) in enumerate(zip(masks, weights)):
        if i > 0:
            hidden_normed = layer.hidden_norm(hidden)
        embedding = draft.embed(shift(ids, 1 + i))
        cos, sin = draft.rope.cos_sin(positions + i)
        q, k, v = layer.self_attn.qkv(layer.attention_input(embedding, hidden_normed), cos, sin)
        if i == 0:
            k0, v0 = k, v
            kd = k.new_zeros((0,) + tuple(k.shape))
            vd = v.new_zeros((0,) + tuple(v.shape))
        else:
            k_steps.append(k)
            v_steps.append(v)
            kd, vd = torch.stack(k_steps), torch.stack(v_steps)
        out = attention(q, k0, v0, kd, vd, cu_seqlens, arch.head_dim ** -0.5)
        hidden = layer.finish(hidden, out)
        loss, correct = fused_ttt_step_loss(
            hidden, draft.norm.weight, draft.lm_head.weight, arch.rms_norm_eps, mask, weight,
            teacher_hidden=shift(final_hidden, 1 + i), teacher_weight=teacher_weight,
            impl=loss_impl, chunk_tokens=loss_chunk_tokens, return_hits=chain_stats, objective=objective)
        if chain_stats:
            hits = correct  # [T] bool, inside the mask
            reached.append((mask if all_right is None else mask & all_right).sum())
            all_right = hits if all_right is None else hits & all_right
            accepted.append(all_right.sum())
            rights.append(all_right)
            correct = hits.sum()
        losses.append(loss)
        corrects.append(correct)
    total = torch.stack(losses).sum()
    walk = None
    if chain_stats:
        # chain length at each root: the steps right before the first wrong one (all_right is cumulative)
        lengths = torch.stack([r.long() for r in rights]).sum(0)
        walk = decoding_walk(lengths, walk_roots(batch), batch.input_ids.shape[1], len(masks))
    return TTTOutput(
        loss=total,
        weighted_step_losses=torch.stack([l.detach().float() for l in losses]),
        correct=torch.stack([c.reshape(()).long() for c in corrects]),
        valid=torch.stack([m.sum() for m in masks]).long(),
        chain=torch.stack([torch.stack(reached), torch.stack(accepted)]).long() if chain_stats else None,
        walk=walk,
    )


def walk_roots(batch: DraftBatch) -> torch.Tensor:
    """[T] bool: the positions t where serving drafts: tokens t+1 and t+2 are assistant tokens of t's
    document (t+1 is then the target's own token, t+2 the first the draft proposes)."""
    keys = flat_document_keys(batch.document_ids)
    assistant = batch.assistant_mask.reshape(-1)
    return (shift(keys, 2, fill=-1) == keys) & shift(assistant, 1, fill=False) & shift(assistant, 2, fill=False)


def walk_accept_lengths(lengths: torch.Tensor, roots: torch.Tensor, row_length: int, steps: int) -> list[list[int]]:
    """Greedy speculative decoding replayed on teacher-forced chains: per row, the accept length of each
    verification.

    ``lengths[t]`` is how many of the chain's ``steps`` drafts rooted at t the target accepts (its argmax
    at each step); ``roots[t]`` whether serving drafts at t. A verification at root t emits
    ``lengths[t] + 1`` tokens (the accepted drafts and the target's own) and the next one is rooted at
    ``t + lengths[t] + 1``; a position that is no root (a user turn, padding, the end of a document) is
    passed over. Rows of ``row_length`` positions are walked separately. Where the data is the target's
    own greedy output, this is what serving the same prompts does, verification by verification; the
    independent-steps product ``1 + Σ_j Π_{i≤j} a_i`` is not, because easy and hard positions come in runs
    (a run of easy positions takes few verifications)."""
    length, root = lengths.tolist(), roots.tolist()
    rows = []
    for start in range(0, len(root), row_length):
        accepts, t, end = [], start, start + row_length
        while t < end:
            if root[t]:
                accepted = min(int(length[t]), steps)
                accepts.append(accepted + 1)
                t += accepted + 1
            else:
                t += 1
        rows.append(accepts)
    return rows


def decoding_walk(lengths: torch.Tensor, roots: torch.Tensor, row_length: int, steps: int) -> torch.Tensor:
    """``walk_accept_lengths`` summed: [tokens emitted, verifications] (int64); their ratio is the
    simulated acceptance length."""
    accepts = [a for row in walk_accept_lengths(lengths, roots, row_length, steps) for a in row]
    return torch.tensor([sum(accepts), len(accepts)], dtype=torch.long)


def chained_acceptance_length(reached: list[float], accepted: list[float]) -> tuple[list[float], float]:
    """Per-step conditional acceptance ``a_i = accepted_i / reached_i`` and the chain estimate of the
    acceptance length at draft length S: ``1 + sum_j prod_{i<=j} a_i`` (a step no chain reached ends it)."""
    rates = [a / r if r > 0 else 0.0 for r, a in zip(reached, accepted)]
    length, running = 1.0, 1.0
    for rate in rates:
        running *= rate
        length += running
    return rates, length
