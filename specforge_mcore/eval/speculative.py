"""Speculative decoding with an exported EAGLE-3 draft, step for step as an EAGLE-3 server runs it.

The target is the HF transformers model (CPU, KV cache); forward hooks on the captured decoder layers
give the draft's features (outputs of layers ``capture_layer_ids``, the training convention). One
generation:

1. **Prefill.** The target reads the prompt x_0..x_{n-1} and emits x_n (greedy).
2. **Draft extend.** Position t of every token whose features are known gets ``fc(features_t)`` and the
   embedding of token t+1 (the next *known* token: for the last one, the token the target just emitted)
   at RoPE position t. Their keys/values become the draft's committed cache (as at TTT step 0); the
   output at the last position starts the draft.
3. **Draft.** ``steps`` levels. Level 0: the ``topk`` best draft tokens of that output. Level i > 0:
   each of the ``topk`` best nodes of level i-1 (by cumulative draft probability) is run through the
   draft (its token, the output that produced it as hidden input, RoPE position m-1+i, attending to the
   committed cache and the keys of its own ancestors: the TTT step-i pattern) and proposes ``topk``
   children. The tree keeps the best ``num_draft_tokens - 1`` nodes over all levels (a child never
   outranks its parent, ties go to the shallower node, so the tree is closed under ancestors). With
   ``topk = 1`` this is a chain of ``steps`` tokens.
4. **Verify.** One target forward over the root (the last emitted token, position m) and all tree
   nodes (a node at level l sits at position m+1+l) with a 4D tree attention mask (transformers 5.x
   passes a 4D mask to the attention unchanged): every node sees the committed cache, the root, its
   ancestors and itself.
5. **Accept (greedy).** From the root, follow the child whose token equals the target's argmax; the
   target's argmax at the last accepted node is the bonus token. Emitted: accepted tokens + bonus
   (the acceptance length of this round). The target's KV cache keeps the root and the accepted path;
   their captured features feed the next draft extend (step 2) with the tokens that follow each.

A round's output is what greedy decoding of the target alone would produce; ``greedy_generate`` is that
reference, and the evaluation compares the two token for token. ``greedy_generate_batch`` computes the
same reference for many prompts at once (left padding, a 2D attention mask and position ids counted from
each prompt's first token), which is what makes an evaluation of many prompts affordable on a CPU.

Speed: both KV caches are preallocated and written in place (the target's layers are ``BufferLayer``s,
so a forward does not copy the whole cache, and keeping the accepted path moves only the accepted rows).
The prefill computes the logits of the last position only, and a verification only those of the rows
acceptance reads, the root and the accepted nodes (when the target's logits are a plain ``lm_head`` of
its last hidden state, checked once). The draft's committed extend runs its attention and MLP for the
last position only (the others only need their keys and values). The tree, acceptance and masks work on
Python lists read from each tensor once.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import DynamicLayer

from specforge_mcore.draft.model import Eagle3Draft
from specforge_mcore.errors import UserError


# ---- configuration ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpecConfig:
    """SGLang's (--speculative-num-steps, --speculative-eagle-topk, --speculative-num-draft-tokens)."""

    steps: int
    topk: int
    num_draft_tokens: int

    @classmethod
    def parse(cls, text: str) -> "SpecConfig":
        try:
            steps, topk, tokens = (int(part) for part in text.split(","))
        except ValueError:
            raise UserError(f"speculative config {text!r}: expected STEPS,TOPK,NUM_DRAFT_TOKENS, e.g. 3,1,4") from None
        config = cls(steps, topk, tokens)
        config.check()
        return config

    @property
    def label(self) -> str:
        return f"{self.steps},{self.topk},{self.num_draft_tokens}"

    @property
    def max_candidates(self) -> int:
        return self.topk + (self.steps - 1) * self.topk * self.topk

    def check(self) -> None:
        if self.steps < 1 or self.topk < 1 or self.num_draft_tokens < 2:
            raise UserError(f"speculative config {self.label}: needs steps >= 1, topk >= 1, num_draft_tokens >= 2")
        if self.topk == 1 and self.num_draft_tokens != self.steps + 1:
            raise UserError(f"speculative config {self.label}: a chain (topk 1) verifies steps + 1 tokens; "
                            f"use {self.steps},1,{self.steps + 1}")
        if self.num_draft_tokens - 1 > self.max_candidates:
            raise UserError(f"speculative config {self.label}: only {self.max_candidates} candidate nodes exist "
                            f"for steps={self.steps}, topk={self.topk}; num_draft_tokens must be at most "
                            f"{self.max_candidates + 1}")


# ---- the target ----------------------------------------------------------------------------------------------
class BufferLayer(DynamicLayer):
    """A transformers ``DynamicLayer`` whose keys/values live in a preallocated buffer (grown by doubling):
    a forward writes its new entries in place instead of concatenating the whole cache, and ``keys`` /
    ``values`` are views of the first ``length`` entries."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = max(int(capacity), 1)
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, _ = key_states.shape
        self._keys = key_states.new_empty(batch, heads, self.capacity, key_states.shape[-1])
        self._values = value_states.new_empty(batch, heads, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def _set_length(self, length: int) -> None:
        self.length = length
        self.keys = self._keys[:, :, :length]
        self.values = self._values[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            size = max(end, 2 * self._keys.shape[-2])
            for name in ("_keys", "_values"):
                old = getattr(self, name)
                new = old.new_empty(old.shape[0], old.shape[1], size, old.shape[3])
                new[:, :, :start] = old[:, :, :start]
                setattr(self, name, new)
        self._keys[:, :, start:end] = key_states
        self._values[:, :, start:end] = value_states
        self._set_length(end)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0 and self.is_initialized:
            self._set_length(max(self.length + tokens_to_remove, 0))

    def keep_rows(self, committed: int, rows: list[int]) -> None:
        """Keep entries ``0..committed-1`` followed by entries ``committed + r`` for ``r`` in ``rows``
        (increasing): a prefix path needs no copy, another path moves only its rows."""
        if rows != list(range(len(rows))):
            index = torch.tensor(rows) + committed
            self._keys[:, :, committed:committed + len(rows)] = self._keys[:, :, index]
            self._values[:, :, committed:committed + len(rows)] = self._values[:, :, index]
        self._set_length(committed + len(rows))


class Target:
    """An HF causal LM with a KV cache whose forward also returns the captured layers' outputs."""

    def __init__(self, model, capture_layer_ids: Sequence[int]):
        self.model = model
        layers = model.model.layers
        for i in capture_layer_ids:
            if not 0 <= i < len(layers):
                raise UserError(f"capture layer {i} does not exist: the target has {len(layers)} layers")
        self.capture_layer_ids = list(capture_layer_ids)
        self._captured: dict[int, torch.Tensor] = {}
        for i in self.capture_layer_ids:
            layers[i].register_forward_hook(self._hook(i))
        self.cache = None
        self.plain_head = self._has_plain_head()

    def _hook(self, layer_id: int):
        def capture(module, inputs, output):
            self._captured[layer_id] = output[0] if isinstance(output, tuple) else output
        return capture

    @property
    def embedding(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    def reset(self, capacity: int = 256) -> None:
        """A new, empty cache; plain full-attention layers get a ``BufferLayer`` of ``capacity`` entries
        (other kinds, e.g. sliding-window layers, keep transformers' own)."""
        self.cache = DynamicCache(config=self.model.config)
        self.cache.layers = [BufferLayer(capacity) if type(layer) is DynamicLayer else layer
                             for layer in self.cache.layers]

    @property
    def cached(self) -> int:
        return self.cache.get_seq_length()

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                last_only: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Tokens [q] at positions [q] after the cache -> logits [q, V] (fp32; [1, V] of the last position
        with ``last_only``) and captured layers (three [q, H_t])."""
        self._captured.clear()
        out = self.model(input_ids=token_ids[None], position_ids=positions[None], attention_mask=attention_mask,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1 if last_only else 0)
        aux = [self._captured[i][0] for i in self.capture_layer_ids]
        return out.logits[0].float(), aux

    def _has_plain_head(self) -> bool:
        """Whether the logits are exactly ``lm_head(final hidden state)`` (no soft-capping or scaling), checked
        on three tokens: then the verification can compute the logits of only the rows it reads."""
        model = self.model
        if not isinstance(getattr(model, "model", None), torch.nn.Module) or \
                not isinstance(getattr(model, "lm_head", None), torch.nn.Module):
            return False
        tokens = torch.tensor([[1, 2, 3]])
        with torch.inference_mode():
            try:
                logits = model(input_ids=tokens, use_cache=False).logits
                hidden = model.model(input_ids=tokens, use_cache=False).last_hidden_state
                return bool(torch.equal(model.lm_head(hidden), logits))
            except Exception:  # a model that cannot be split this way keeps the full forward
                return False
            finally:
                self._captured.clear()

    def forward_hidden(self, token_ids: torch.Tensor, positions: torch.Tensor,
                       attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``forward`` without the output head: final hidden states [q, H] (``head`` gives a row's logits)."""
        self._captured.clear()
        out = self.model.model(input_ids=token_ids[None], position_ids=positions[None], attention_mask=attention_mask,
                               past_key_values=self.cache, use_cache=True)
        aux = [self._captured[i][0] for i in self.capture_layer_ids]
        return out.last_hidden_state[0], aux

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (fp32) of final hidden states (only with ``plain_head``)."""
        return self.model.lm_head(hidden).float()

    def forward_batch(self, token_ids: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor
                      ) -> torch.Tensor:
        """Rows of tokens [B, q] at positions [B, q], a 2D padding mask [B, cached + q] -> the last
        position's logits [B, V] (fp32)."""
        out = self.model(input_ids=token_ids, position_ids=positions, attention_mask=attention_mask,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self._captured.clear()
        return out.logits[:, -1].float()

    def forward_rows(self, token_ids: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Rows of tokens [B, q] at positions [B, q], a 2D mask [B, cached + q] over the cache slots ->
        final hidden states [B, q, H] and the captured layers (three [B, q, H_t]); ``head`` gives logits."""
        self._captured.clear()
        out = self.model.model(input_ids=token_ids, position_ids=positions, attention_mask=attention_mask,
                               past_key_values=self.cache, use_cache=True)
        aux = [self._captured[i] for i in self.capture_layer_ids]
        self._captured.clear()
        return out.last_hidden_state, aux

    def keep_batch_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` of the cache (finished sequences leave a batch)."""
        for layer in self.cache.layers:
            if not isinstance(layer, BufferLayer):
                raise UserError(f"batched speculative decoding needs a dynamic KV cache, the target uses "
                                f"{type(layer).__name__}")
            if layer.is_initialized:
                layer._keys, layer._values = layer._keys[rows], layer._values[rows]
                layer._set_length(layer.length)

    def keep_rows(self, committed: int, rows: list[int]) -> None:
        """Keep the committed prefix and, after it, the entries ``committed + r`` (the root and the
        accepted path), in this order."""
        for layer in self.cache.layers:
            if not isinstance(layer, BufferLayer):
                raise UserError(f"speculative decoding needs a dynamic KV cache, the target uses {type(layer).__name__}")
            layer.keep_rows(committed, rows)


def load_target(target_dir: str, dtype: torch.dtype = torch.float32):
    """The HF model in ``target_dir`` (eval mode, SDPA attention)."""
    if not os.path.isfile(os.path.join(target_dir, "config.json")):
        raise UserError(f"--target {target_dir}: no config.json (expected an HF model directory)")
    return AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype, attn_implementation="sdpa").eval()


def check_pair(model, draft: Eagle3Draft, target_dir: str, draft_dir: str) -> None:
    """The draft must have been trained for this target: same vocabulary, hidden size and enough layers."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    arch = draft.arch
    if int(cfg.vocab_size) != arch.vocab_size:
        raise UserError(f"--draft {draft_dir} was built for a target vocabulary of {arch.vocab_size} tokens, "
                        f"--target {target_dir} has {cfg.vocab_size}")
    if int(cfg.hidden_size) != arch.target_hidden_size:
        raise UserError(f"--draft {draft_dir} reads target features of width {arch.target_hidden_size}, "
                        f"--target {target_dir} has hidden_size {cfg.hidden_size}")
    if max(arch.capture_layer_ids) >= int(cfg.num_hidden_layers):
        raise UserError(f"--draft {draft_dir} captures layers {arch.capture_layer_ids}, --target {target_dir} has "
                        f"only {cfg.num_hidden_layers} layers")


# ---- the draft -----------------------------------------------------------------------------------------------
def cached_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """The draft's attention over its KV cache: q [..., N, Hq, D] over keys/values [..., S, Hkv, D] where
    visible [..., N, S] (grouped-query heads; fp32 softmax, as in training); the leading dims are a batch."""
    *lead, n, heads, dim = q.shape
    kv_heads = keys.shape[-2]
    qf = q.float().reshape(*lead, n, kv_heads, heads // kv_heads, dim) * dim ** -0.5
    scores = torch.einsum("...nkgd,...skd->...kgns", qf, keys.float())
    scores = scores.masked_fill(~visible[..., None, None, :, :], float("-inf"))
    out = torch.einsum("...kgns,...skd->...nkgd", torch.softmax(scores, dim=-1), values.float())
    return out.reshape(*lead, n, heads, dim).to(q.dtype)


def left_pad(prompts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts as one left-padded batch: token ids [B, W] (pad id 0, never attended to), which entries are
    real [B, W] and each row's positions [B, W], counted from its own first token."""
    rows, width = len(prompts), max(p.numel() for p in prompts)
    ids = torch.zeros(rows, width, dtype=torch.long)
    real = torch.zeros(rows, width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - prompt.numel():] = prompt
        real[row, width - prompt.numel():] = True
    return ids, real, (real.long().cumsum(1) - 1).clamp_(min=0)


class DraftRunner:
    """The draft at inference: a committed KV cache (one step-0 entry per position whose features are
    known) and, while a tree is drafted, temporary entries of the nodes run so far. Both live in one
    preallocated buffer: committed entries first, the temporary ones after them."""

    def __init__(self, draft: Eagle3Draft):
        self.draft = draft
        arch = draft.arch
        self.kv_heads, self.head_dim = arch.num_key_value_heads, arch.head_dim
        self.reset()

    def reset(self, capacity: int = 256) -> None:
        dtype = self.draft.fc.weight.dtype
        self._keys = torch.empty(max(capacity, 1), self.kv_heads, self.head_dim, dtype=dtype)
        self._values = torch.empty_like(self._keys)
        self._committed = 0
        self._temps = 0

    @property
    def committed(self) -> int:
        return self._committed

    def _write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [n, Hkv, D] at ``start`` (growing the buffer if needed); the keys/values up to them."""
        end = start + k.shape[0]
        if end > self._keys.shape[0]:
            size = max(end, 2 * self._keys.shape[0])
            for name in ("_keys", "_values"):
                old = getattr(self, name)
                new = old.new_empty(size, *old.shape[1:])
                new[:start] = old[:start]
                setattr(self, name, new)
        self._keys[start:end] = k
        self._values[start:end] = v
        return self._keys[:end], self._values[:end]

    def _layer(self, hidden: torch.Tensor, hidden_normed: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor):
        draft, layer = self.draft, self.draft.midlayer
        cos, sin = draft.rope.cos_sin(positions)
        return layer.self_attn.qkv(layer.attention_input(draft.embed(tokens), hidden_normed), cos, sin)

    def extend(self, aux: list[torch.Tensor], next_tokens: torch.Tensor, positions: torch.Tensor,
               last_only: bool = False) -> torch.Tensor:
        """Positions with known features: ``fc(aux)`` + embedding of the following token. Commits their keys
        (dropping any temporary ones) and returns the layer outputs [n, H] ([1, H] of the last position
        with ``last_only``: the others are needed only for their keys and values)."""
        draft = self.draft
        dtype = draft.fc.weight.dtype
        hidden, hidden_normed = draft.project([a.to(dtype) for a in aux], impl="reference")
        q, k, v = self._layer(hidden, hidden_normed, next_tokens, positions)
        n, past = q.shape[0], self._committed
        keys, values = self._write(past, k, v)
        visible = torch.ones(n, past + n, dtype=torch.bool).tril_(diagonal=past)
        if last_only:
            hidden, q, visible = hidden[-1:], q[-1:], visible[-1:]
        out = draft.midlayer.finish(hidden, cached_attention(q, keys, values, visible))
        self._committed, self._temps = past + n, 0
        return out

    def step(self, hidden: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
             ancestor_slots: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
        """Run N tree nodes (their token, their parent's output as hidden input) attending to the committed
        cache, the temporary entries of their ancestors and themselves; returns outputs [N, H] and the
        temporary slots their own keys got."""
        q, k, v = self._layer(hidden, self.draft.midlayer.hidden_norm(hidden), tokens, positions)
        n, past, first = q.shape[0], self._committed, self._temps
        slots = list(range(first, first + n))
        keys, values = self._write(past + first, k, v)
        self._temps = first + n
        visible = torch.zeros(n, keys.shape[0], dtype=torch.bool)
        visible[:, :past] = True
        rows, cols = [], []
        for row, (own, ancestors) in enumerate(zip(slots, ancestor_slots)):
            for slot in ancestors + [own]:
                rows.append(row)
                cols.append(past + slot)
        visible[rows, cols] = True
        return self.draft.midlayer.finish(hidden, cached_attention(q, keys, values, visible)), slots


# ---- the decoder ---------------------------------------------------------------------------------------------
@dataclass
class Node:
    """A drafted token: ``token`` in the target vocabulary, ``parent`` (-1 = the root, i.e. the last
    emitted token) an index into the same list, ``depth`` 0 for the root's children."""

    token: int
    parent: int
    depth: int
    score: float
    hidden: torch.Tensor  # the draft output this node's token was proposed from (its hidden input)
    slot: int = -1  # temporary draft KV slot, once the node has been run


@dataclass
class Generation:
    tokens: list[int]  # generated tokens (the prompt excluded)
    seconds: float
    accept_lengths: list[int] = field(default_factory=list)  # per verification: accepted drafts + bonus
    prefill_seconds: float = 0.0  # the target's prefill forward
    draft_seconds: float = 0.0  # the draft: committed extends and tree drafting
    verify_seconds: float = 0.0  # the target's verification forwards and the logits acceptance reads

    @property
    def other_seconds(self) -> float:
        """Everything else: masks, KV bookkeeping, the Python loop."""
        return self.seconds - self.prefill_seconds - self.draft_seconds - self.verify_seconds


def _stop(tokens: list[int], new: list[int], max_new_tokens: int, eos_ids: set[int]) -> bool:
    """Append ``new`` to ``tokens`` up to the first end-of-sequence token or the length limit; True when done."""
    for token in new:
        tokens.append(token)
        if token in eos_ids or len(tokens) >= max_new_tokens:
            return True
    return False


@torch.inference_mode()
def greedy_generate(target: Target, prompt: torch.Tensor, max_new_tokens: int, eos_ids: set[int]) -> Generation:
    """Target-only greedy decoding: the reference a speculative run must reproduce token for token."""
    start = time.perf_counter()
    target.reset(prompt.numel() + max_new_tokens)
    logits, _ = target.forward(prompt, torch.arange(prompt.numel()), last_only=True)
    tokens: list[int] = []
    next_token = int(logits[-1].argmax())
    while not _stop(tokens, [next_token], max_new_tokens, eos_ids):
        position = torch.tensor([target.cached])
        logits, _ = target.forward(torch.tensor([next_token]), position)
        next_token = int(logits[-1].argmax())
    return Generation(tokens, time.perf_counter() - start)


@torch.inference_mode()
def greedy_generate_batch(target: Target, prompts: Sequence[torch.Tensor], max_new_tokens: int, eos_ids: set[int],
                          batch_size: int = 16, progress=None) -> list[Generation]:
    """``greedy_generate`` for each prompt, ``batch_size`` prompts per forward (prompts of similar length
    together, left-padded; each row's positions count from its own first token). Results are in the
    order of ``prompts``; each one's ``seconds`` is its batch's time divided by the batch size, so they
    add up to the wall time. ``progress(n)`` is called after each batch of n prompts."""
    return in_length_batches(prompts, batch_size, lambda chunk: _greedy_batch(target, chunk, max_new_tokens, eos_ids),
                             progress, "--batch-size")


def in_length_batches(prompts: Sequence[torch.Tensor], batch_size: int,
                      run: Callable[[list[torch.Tensor]], list[Generation]], progress=None,
                      option: str = "--batch-size") -> list[Generation]:
    """``run`` over ``batch_size`` prompts at a time, prompts of similar length together (less padding);
    results in the order of ``prompts``. ``progress(n)`` is called after each batch of n prompts."""
    if batch_size < 1:
        raise UserError(f"{option} {batch_size}: expected a positive integer")
    order = sorted(range(len(prompts)), key=lambda i: (prompts[i].numel(), i))
    results: list[Optional[Generation]] = [None] * len(prompts)
    for first in range(0, len(order), batch_size):
        chunk = order[first:first + batch_size]
        for i, generation in zip(chunk, run([prompts[i] for i in chunk])):
            results[i] = generation
        if progress is not None:
            progress(len(chunk))
    return results  # type: ignore[return-value]


def _greedy_batch(target: Target, prompts: list[torch.Tensor], max_new_tokens: int, eos_ids: set[int]
                  ) -> list[Generation]:
    start = time.perf_counter()
    ids, real, positions = left_pad(prompts)
    rows, width = ids.shape
    mask = torch.zeros(rows, width + max_new_tokens, dtype=torch.long)
    mask[:, :width] = real
    target.reset(width + max_new_tokens)
    logits = target.forward_batch(ids, positions, mask[:, :width])
    position = positions[:, -1:] + 1
    out = torch.empty(rows, max_new_tokens, dtype=torch.long)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long)
    done = torch.zeros(rows, dtype=torch.bool)
    steps = max_new_tokens
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
        out[:, step] = token
        done |= torch.isin(token, eos)
        if step + 1 == max_new_tokens or bool(done.all()):
            steps = step + 1
            break
        mask[:, width + step] = 1
        logits = target.forward_batch(token[:, None], position, mask[:, :width + step + 1])
        position += 1
    seconds = (time.perf_counter() - start) / rows
    generations = []
    for row in out[:, :steps].tolist():
        tokens: list[int] = []
        _stop(tokens, row, max_new_tokens, eos_ids)
        generations.append(Generation(tokens, seconds))
    return generations


class SpeculativeDecoder:
    def __init__(self, target: Target, draft: Eagle3Draft, config: SpecConfig, eos_ids: set[int]):
        config.check()
        if list(draft.arch.capture_layer_ids) != target.capture_layer_ids:
            raise UserError(f"the target captures layers {target.capture_layer_ids}, the draft was trained on "
                            f"{draft.arch.capture_layer_ids}")
        self.target, self.draft, self.config, self.eos_ids = target, draft, config, eos_ids
        self.runner = DraftRunner(draft)

    def draft_logits(self, output: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits [N, Vd] of layer outputs computed at RoPE ``positions`` (the output at
        position q proposes the token at index q + 2). Tests override this to force proposals."""
        return self.draft.logits(output).float()

    def _propose(self, output: torch.Tensor, positions: torch.Tensor) -> tuple[list[list[float]], list[list[int]]]:
        """Top-k (probabilities, target token ids) of each row: [N][k] each."""
        probs = torch.softmax(self.draft_logits(output, positions), dim=-1)
        top_p, top_i = probs.topk(self.config.topk, dim=-1)
        return top_p.tolist(), (top_i + self.draft.d2t[top_i]).tolist()

    def draft_tree(self, root_output: torch.Tensor, root_position: int) -> list[Node]:
        """Nodes of the tree to verify, parents before children (module doc, step 3)."""
        cfg = self.config
        top_p, top_ids = self._propose(root_output[None], torch.tensor([root_position]))
        nodes = [Node(t, -1, 0, p, root_output) for p, t in zip(top_p[0], top_ids[0])]
        frontier = list(range(len(nodes)))
        for level in range(1, cfg.steps):
            hidden = torch.stack([nodes[i].hidden for i in frontier])
            tokens = torch.tensor([nodes[i].token for i in frontier])
            positions = torch.full((len(frontier),), root_position + level)
            outputs, slots = self.runner.step(hidden, tokens, positions, [self._ancestor_slots(nodes, i) for i in frontier])
            top_p, top_ids = self._propose(outputs, positions)
            children = []
            for row, i in enumerate(frontier):
                nodes[i].slot = slots[row]
                for p, t in zip(top_p[row], top_ids[row]):
                    children.append(len(nodes))
                    nodes.append(Node(t, i, level, nodes[i].score * p, outputs[row]))
            frontier = sorted(children, key=lambda j: (-nodes[j].score, j))[:cfg.topk]
        return self._select(nodes)

    @staticmethod
    def _ancestor_slots(nodes: list[Node], index: int) -> list[int]:
        slots, parent = [], nodes[index].parent
        while parent >= 0:
            slots.append(nodes[parent].slot)
            parent = nodes[parent].parent
        return slots[::-1]

    def _select(self, nodes: list[Node]) -> list[Node]:
        """The best ``num_draft_tokens - 1`` nodes by cumulative probability, closed under ancestors,
        re-indexed with parents first."""
        picked: set[int] = set()
        for i in sorted(range(len(nodes)), key=lambda j: (-nodes[j].score, nodes[j].depth, j)):
            if len(picked) == self.config.num_draft_tokens - 1:
                break
            if nodes[i].parent < 0 or nodes[i].parent in picked:
                picked.add(i)
        order = sorted(picked, key=lambda j: (nodes[j].depth, j))
        new_index = {old: new for new, old in enumerate(order)}
        return [Node(nodes[old].token, new_index.get(nodes[old].parent, -1), nodes[old].depth, nodes[old].score,
                     nodes[old].hidden) for old in order]

    def _verify_mask(self, tree: list[Node], committed: int) -> torch.Tensor:
        """Boolean [1, 1, 1 + len(tree), committed + 1 + len(tree)] mask (True = attend): the root row sees
        the cache and itself, a node row also its ancestors and itself."""
        q = 1 + len(tree)
        visible = torch.ones(q, committed + q, dtype=torch.bool)
        block = visible[:, committed:]
        block.zero_()
        block[:, 0] = True
        rows, cols = [], []
        for row, node in enumerate(tree, start=1):
            rows.append(row)
            cols.append(row)
            parent = node.parent
            while parent >= 0:
                rows.append(row)
                cols.append(1 + parent)
                parent = tree[parent].parent
        block[rows, cols] = True
        return visible[None, None]

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> Generation:
        target, runner, cfg = self.target, self.runner, self.config
        clock = time.perf_counter
        start = clock()
        n = prompt.numel()
        capacity = n + max_new_tokens + cfg.num_draft_tokens + cfg.max_candidates
        target.reset(capacity)
        runner.reset(capacity)
        logits, aux = target.forward(prompt, torch.arange(n), last_only=True)
        tokens: list[int] = []
        root = int(logits[-1].argmax())
        result = Generation(tokens, 0.0, [], prefill_seconds=clock() - start)
        accept_lengths = result.accept_lengths
        if _stop(tokens, [root], max_new_tokens, self.eos_ids):
            result.seconds = clock() - start
            return result
        t0 = clock()
        next_tokens = torch.cat([prompt[1:], torch.tensor([root])])
        output = runner.extend(aux, next_tokens, torch.arange(n), last_only=True)[-1]
        while True:
            committed = target.cached  # positions 0..committed-1 are in both caches; the root sits at `committed`
            tree = self.draft_tree(output, committed - 1)
            t1 = clock()
            verify_tokens = torch.tensor([root] + [node.token for node in tree])
            positions = torch.tensor([committed] + [committed + 1 + node.depth for node in tree])
            mask = self._verify_mask(tree, committed)
            t2 = clock()
            if target.plain_head:  # the head only for the rows acceptance reads (about accept length of them)
                hidden, aux = target.forward_hidden(verify_tokens, positions, mask)
                path, bonus = self._accept(tree, lambda row: int(target.head(hidden[row]).argmax()))
            else:
                logits, aux = target.forward(verify_tokens, positions, mask)
                path, bonus = self._accept(tree, logits.argmax(-1).tolist().__getitem__)
            t3 = clock()
            result.draft_seconds += t1 - t0
            result.verify_seconds += t3 - t2
            accept_lengths.append(len(path) + 1)  # accepted drafts + the bonus: tokens this verification emits
            rows = [0] + [1 + i for i in path]
            target.keep_rows(committed, rows)
            emitted = [tree[i].token for i in path] + [bonus]
            if _stop(tokens, emitted, max_new_tokens, self.eos_ids):
                break
            index = torch.tensor(rows)
            t0 = clock()
            output = runner.extend([a[index] for a in aux], torch.tensor(emitted), committed + torch.arange(len(rows)),
                                   last_only=True)[-1]
            root = bonus
        result.seconds = clock() - start
        return result

    @staticmethod
    def _accept(tree: list[Node], argmax: Callable[[int], int]) -> tuple[list[int], int]:
        """Greedy acceptance from the root: the accepted node indices and the bonus token. ``argmax(row)`` is
        the target's greedy token at verification row ``row`` (0 = the root, 1 + i = node i); it is asked
        only for the root and the accepted nodes."""
        children: dict[int, dict[int, int]] = {}
        for i, node in enumerate(tree):
            children.setdefault(node.parent, {})[node.token] = i
        path, current, row = [], -1, 0
        while True:
            best = argmax(row)
            child = children.get(current, {}).get(best)
            if child is None:
                return path, best
            path.append(child)
            current, row = child, 1 + child


def default_threads() -> int:
    """Threads for the CPU forwards: the cores this process may use, less the load other processes put on
    them (at least 1). On a shared machine an OpenMP team larger than the idle cores spins against the
    other jobs: a SmolLM2 decode step measured 2.7 s with 2 threads and 0.18 s with 1 on 2 busy cores."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def eos_token_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids from the generation config and the tokenizer."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def first_mismatch(reference: list[int], candidate: list[int]) -> Optional[int]:
    """Index of the first differing token (or of the length difference); None when equal."""
    for i, (a, b) in enumerate(zip(reference, candidate)):
        if a != b:
            return i
    return None if len(reference) == len(candidate) else min(len(reference), len(candidate))
