"""Speculative decoding of many prompts at once, for chain configs (``topk`` 1).

A chain's accepted drafts are always a prefix of what was verified, so every row of a batch can share
one slot layout: each verification appends ``1 + chain`` slots to every row's target and draft caches,
and a row whose verification accepted ``a`` drafts marks slots ``a + 1 ..`` of that block invalid
(``valid`` masks, per row) instead of moving anything. Positions are per row, so RoPE sees each
sequence as if decoded alone; the attention masks skip the invalid slots and the left padding.

One target forward then verifies every row, and one draft forward per level drafts every row: on a CPU
the weights are read once per forward instead of once per prompt. What each row gets (tokens, accept
lengths) is what ``SpeculativeDecoder.generate`` gets for its prompt alone (tested, token for token).
Finished rows (end of sequence or the length limit) leave the batch at the end of their verification.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from specforge_mcore.draft.model import Eagle3Draft
from specforge_mcore.errors import UserError
from specforge_mcore.eval.speculative import (Generation, SpecConfig, Target, _stop, cached_attention,
                                              in_length_batches, left_pad)


class BatchDraftCache:
    """The draft's KV cache for a batch: keys/values [B, slots, Hkv, D] and a validity mask [B, slots],
    sized for the whole generation (``ChainBatchDecoder.generate`` knows the most slots it can use)."""

    def __init__(self, draft: Eagle3Draft, rows: int, capacity: int):
        arch = draft.arch
        dtype = draft.fc.weight.dtype
        self.keys = torch.empty(rows, capacity, arch.num_key_value_heads, arch.head_dim, dtype=dtype)
        self.values = torch.empty_like(self.keys)
        self.valid = torch.zeros(rows, capacity, dtype=torch.bool)
        self.length = 0  # slots in use (the same for every row)

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> None:
        """Store k/v [B, n, Hkv, D] at slots ``start..start+n-1``."""
        end = start + k.shape[1]
        self.keys[:, start:end] = k
        self.values[:, start:end] = v
        self.valid[:, start:end] = valid

    def attend(self, q: torch.Tensor, end: int, visible: torch.Tensor) -> torch.Tensor:
        """q [B, n, Hq, D] over slots ``0..end-1`` where visible [B, n, end]."""
        return cached_attention(q, self.keys[:, :end], self.values[:, :end], visible)

    def keep(self, rows: torch.Tensor) -> None:
        self.keys, self.values, self.valid = self.keys[rows], self.values[rows], self.valid[rows]


class ChainBatchDecoder:
    """``SpeculativeDecoder`` for ``topk`` 1, over a batch of prompts (module doc)."""

    def __init__(self, target: Target, draft: Eagle3Draft, config: SpecConfig, eos_ids: set[int]):
        config.check()
        if config.topk != 1:
            raise UserError(f"speculative config {config.label}: batched decoding drafts chains (topk 1); "
                            "a tree config decodes one prompt at a time")
        if list(draft.arch.capture_layer_ids) != target.capture_layer_ids:
            raise UserError(f"the target captures layers {target.capture_layer_ids}, the draft was trained on "
                            f"{draft.arch.capture_layer_ids}")
        self.target, self.draft, self.config, self.eos_ids = target, draft, config, eos_ids
        self.chain = config.steps  # the drafts each verification checks (a chain verifies steps + 1 tokens)

    def draft_logits(self, output: torch.Tensor, positions: torch.Tensor, prompts: torch.Tensor,
                     level: int) -> torch.Tensor:
        """Draft-vocabulary logits [N, Vd] of layer outputs at RoPE ``positions`` (the output at position q
        proposes the token at q + 2) for the prompts with indices ``prompts``. Tests override this."""
        return self.draft.logits(output).float()

    def _propose(self, output, positions, prompts, level) -> torch.Tensor:
        index = self.draft_logits(output, positions, prompts, level).argmax(-1)
        return index + self.draft.d2t[index]

    # ---- the draft layer over [B, n] ------------------------------------------------------------------
    def _draft_layer(self, cache: BatchDraftCache, hidden: torch.Tensor, hidden_normed: torch.Tensor,
                     tokens: torch.Tensor, positions: torch.Tensor, start: int, valid: torch.Tensor,
                     visible: torch.Tensor) -> torch.Tensor:
        """Run the draft layer on [B, n] inputs whose keys go to slots ``start..``; returns outputs [B, n, H]."""
        draft, layer = self.draft, self.draft.midlayer
        b, n = tokens.shape
        cos, sin = draft.rope.cos_sin(positions.reshape(-1))
        q, k, v = layer.self_attn.qkv(layer.attention_input(draft.embed(tokens.reshape(-1)),
                                                            hidden_normed.reshape(b * n, -1)), cos, sin)
        cache.write(start, k.view(b, n, *k.shape[1:]), v.view(b, n, *v.shape[1:]), valid)
        attention = cache.attend(q.view(b, n, *q.shape[1:]), start + n, visible)
        return layer.finish(hidden, attention)

    def _extend(self, cache: BatchDraftCache, aux: list[torch.Tensor], tokens: torch.Tensor,
                positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Commit a block of known features aux [B, n, H_t] with the tokens that follow them at slots
        ``cache.length..`` (overwriting any drafting entries); returns the outputs [B, n, H]."""
        b, n = tokens.shape
        dtype = self.draft.fc.weight.dtype
        hidden, hidden_normed = self.draft.project([a.reshape(b * n, -1).to(dtype) for a in aux], impl="reference")
        start = cache.length
        end = start + n
        visible = torch.zeros(b, n, end, dtype=torch.bool)
        visible[:, :, :start] = cache.valid[:, None, :start]
        # A query sees the valid entries before it and itself (so a padding row's softmax is never empty).
        visible[:, :, start:] = torch.ones(n, n, dtype=torch.bool).tril_() & (valid[:, None, :] | torch.eye(n, dtype=torch.bool))
        out = self._draft_layer(cache, hidden.view(b, n, -1), hidden_normed, tokens, positions, start, valid, visible)
        cache.length = end
        return out

    def _draft_chain(self, cache: BatchDraftCache, output: torch.Tensor, root_positions: torch.Tensor,
                     prompts: torch.Tensor) -> torch.Tensor:
        """The chain [B, chain] of target tokens drafted from the committed outputs [B, H] (draft
        position ``root_positions``; the root token sits one after it)."""
        tokens = [self._propose(output, root_positions, prompts, 0)]
        b = output.shape[0]
        start = cache.length
        for level in range(1, self.chain):
            positions = root_positions + level
            end = start + level
            visible = torch.zeros(b, 1, end, dtype=torch.bool)
            visible[:, 0, :start] = cache.valid[:, :start]
            visible[:, 0, start:] = True  # the chain's earlier entries and this one
            hidden = output[:, None]
            output = self._draft_layer(cache, hidden, self.draft.midlayer.hidden_norm(hidden), tokens[-1][:, None],
                                       positions[:, None], end - 1, torch.ones(b, 1, dtype=torch.bool), visible)[:, 0]
            tokens.append(self._propose(output, positions, prompts, level))
        return torch.stack(tokens, dim=1)

    # ---- the loop --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: Sequence[torch.Tensor], max_new_tokens: int) -> list[Generation]:
        """Decode every prompt; results in the order of ``prompts``. Each one's ``seconds`` (and time split)
        is the batch's divided by the number of prompts, so they add up to the wall time."""
        if not self.target.plain_head:
            raise UserError("batched speculative decoding needs a target whose logits are lm_head(final hidden "
                            "state); decode one prompt at a time (--spec-batch-size 1)")
        target, draft, chain, clock = self.target, self.draft, self.chain, time.perf_counter
        start = clock()
        ids, real, positions = left_pad(prompts)
        rows, width = ids.shape
        # At most max_new_tokens verifications of 1 + chain slots each (drafting reuses the next block's).
        capacity = width + max_new_tokens * (1 + chain) + 1
        target.reset(capacity)
        mask = torch.zeros(rows, capacity, dtype=torch.long)  # the target's valid slots
        mask[:, :width] = real
        hidden, aux = target.forward_rows(ids, positions, mask[:, :width])
        root = target.head(hidden[:, -1]).argmax(-1)
        results = [Generation([], 0.0, []) for _ in prompts]
        prefill = clock() - start
        draft_seconds = verify_seconds = 0.0

        alive = torch.arange(rows)  # the prompt of each live row
        done = torch.tensor([_stop(results[i].tokens, [int(root[i])], max_new_tokens, self.eos_ids)
                             for i in range(rows)])
        t0 = clock()
        cache = BatchDraftCache(draft, rows, capacity)
        next_tokens = torch.cat([ids[:, 1:], root[:, None]], dim=1)
        output = self._extend(cache, aux, next_tokens, positions, real)[:, -1]
        draft_seconds += clock() - t0
        slots = width  # target slots in use
        position = positions[:, -1] + 1  # each row's root position
        while True:
            if bool(done.any()):  # finished rows leave the batch
                keep = (~done).nonzero().flatten()
                if keep.numel() == 0:
                    break
                alive, root, output, position, mask = alive[keep], root[keep], output[keep], position[keep], mask[keep]
                cache.keep(keep)
                target.keep_batch_rows(keep)
            b = alive.numel()
            t0 = clock()
            drafted = self._draft_chain(cache, output, position - 1, alive)  # [b, chain]
            t1 = clock()
            tokens = torch.cat([root[:, None], drafted], dim=1)
            verify_positions = position[:, None] + torch.arange(1 + chain)
            mask[:, slots:slots + 1 + chain] = 1
            hidden, aux = target.forward_rows(tokens, verify_positions, mask[:, :slots + 1 + chain])
            # Greedy acceptance level by level, the head only for the rows still accepting.
            accepted = torch.zeros(b, dtype=torch.long)
            bonus = torch.empty(b, dtype=torch.long)
            going = torch.ones(b, dtype=torch.bool)
            for level in range(chain + 1):
                live = going.nonzero().flatten()
                if live.numel() == 0:
                    break
                best = target.head(hidden[live, level]).argmax(-1)
                right = best == drafted[live, level] if level < chain else torch.zeros_like(best, dtype=torch.bool)
                bonus[live[~right]] = best[~right]
                accepted[live[right]] += 1
                going[live[~right]] = False
            verify_seconds += clock() - t1
            block = torch.arange(1 + chain)
            keep_slots = block[None] <= accepted[:, None]  # the root and the accepted drafts
            mask[:, slots:slots + 1 + chain] = keep_slots
            slots += 1 + chain
            emitted = torch.where(block[None] < accepted[:, None], torch.cat([drafted, drafted[:, -1:]], dim=1),
                                  bonus[:, None])
            done = torch.zeros(b, dtype=torch.bool)
            for row in range(b):
                result = results[int(alive[row])]
                a = int(accepted[row])
                result.accept_lengths.append(a + 1)
                done[row] = _stop(result.tokens, emitted[row, :a + 1].tolist(), max_new_tokens, self.eos_ids)
            if bool(done.all()):
                break
            t0 = clock()
            out = self._extend(cache, aux, emitted, verify_positions, keep_slots)
            output = out[torch.arange(b), accepted]
            draft_seconds += clock() - t0
            position = position + accepted + 1
            root = bonus
        seconds = clock() - start
        for result in results:
            result.seconds, result.prefill_seconds = seconds / rows, prefill / rows
            result.draft_seconds, result.verify_seconds = draft_seconds / rows, verify_seconds / rows
        return results


def generate_batched(decoder: ChainBatchDecoder, prompts: Sequence[torch.Tensor], max_new_tokens: int,
                     batch_size: int, progress=None) -> list[Generation]:
    """``decoder.generate`` over ``batch_size`` prompts at a time (prompts of similar length together);
    results in the order of ``prompts``. ``progress(n)`` is called after each batch of n prompts."""
    return in_length_batches(prompts, batch_size, lambda chunk: decoder.generate(chunk, max_new_tokens), progress,
                             "--spec-batch-size")
