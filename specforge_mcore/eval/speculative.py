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
reference, and the evaluation compares the two token for token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

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

    def _hook(self, layer_id: int):
        def capture(module, inputs, output):
            self._captured[layer_id] = output[0] if isinstance(output, tuple) else output
        return capture

    @property
    def embedding(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)

    @property
    def cached(self) -> int:
        return self.cache.get_seq_length()

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Tokens [q] at positions [q] after the cache -> logits [q, V] (fp32) and captured layers (three [q, H_t])."""
        self._captured.clear()
        out = self.model(input_ids=token_ids[None], position_ids=positions[None], attention_mask=attention_mask,
                         past_key_values=self.cache, use_cache=True)
        aux = [self._captured[i][0] for i in self.capture_layer_ids]
        return out.logits[0].float(), aux

    def keep(self, indices: torch.Tensor) -> None:
        """Keep only these cache entries (in this order): the committed prefix and the accepted path."""
        from transformers.cache_utils import DynamicLayer

        for layer in self.cache.layers:
            if not isinstance(layer, DynamicLayer):
                raise UserError(f"speculative decoding needs a dynamic KV cache, the target uses {type(layer).__name__}")
            layer.keys = layer.keys[:, :, indices]
            layer.values = layer.values[:, :, indices]


def load_target(target_dir: str, dtype: torch.dtype = torch.float32):
    """The HF model in ``target_dir`` (eval mode, SDPA attention)."""
    import os

    from transformers import AutoModelForCausalLM

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
class DraftRunner:
    """The draft at inference: a committed KV cache (one step-0 entry per position whose features are
    known) and, while a tree is drafted, temporary entries of the nodes run so far."""

    def __init__(self, draft: Eagle3Draft):
        self.draft = draft
        arch = draft.arch
        self.kv_heads, self.head_dim = arch.num_key_value_heads, arch.head_dim
        self.groups = arch.num_attention_heads // arch.num_key_value_heads
        self.reset()

    def reset(self) -> None:
        dtype = self.draft.fc.weight.dtype
        self.keys = torch.zeros(0, self.kv_heads, self.head_dim, dtype=dtype)
        self.values = torch.zeros(0, self.kv_heads, self.head_dim, dtype=dtype)
        self.temp_keys: list[torch.Tensor] = []
        self.temp_values: list[torch.Tensor] = []

    @property
    def committed(self) -> int:
        return self.keys.shape[0]

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """q [N, Hq, D] over keys/values [S, Hkv, D] where visible [N, S]; fp32 softmax, as in training."""
        n = q.shape[0]
        qf = q.float().reshape(n, self.kv_heads, self.groups, self.head_dim) * self.head_dim ** -0.5
        scores = torch.einsum("nkgd,skd->kgns", qf, keys.float()).masked_fill(~visible, float("-inf"))
        out = torch.einsum("kgns,skd->nkgd", torch.softmax(scores, dim=-1), values.float())
        return out.reshape(n, self.kv_heads * self.groups, self.head_dim).to(q.dtype)

    def _layer(self, hidden: torch.Tensor, hidden_normed: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor):
        draft, layer = self.draft, self.draft.midlayer
        cos, sin = draft.rope.cos_sin(positions)
        return layer.self_attn.qkv(layer.attention_input(draft.embed(tokens), hidden_normed), cos, sin)

    def extend(self, aux: list[torch.Tensor], next_tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Positions with known features: ``fc(aux)`` + embedding of the following token. Commits their keys
        (dropping any temporary ones) and returns the layer outputs [n, H]."""
        draft = self.draft
        dtype = draft.fc.weight.dtype
        hidden, hidden_normed = draft.project([a.to(dtype) for a in aux], impl="reference")
        q, k, v = self._layer(hidden, hidden_normed, next_tokens, positions)
        n, past = q.shape[0], self.committed
        keys, values = torch.cat([self.keys, k]), torch.cat([self.values, v])
        visible = torch.ones(n, past + n, dtype=torch.bool)
        visible[:, past:] = torch.ones(n, n, dtype=torch.bool).tril()
        out = draft.midlayer.finish(hidden, self._attend(q, keys, values, visible))
        self.keys, self.values = keys, values
        self.temp_keys, self.temp_values = [], []
        return out

    def step(self, hidden: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
             ancestor_slots: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
        """Run N tree nodes (their token, their parent's output as hidden input) attending to the committed
        cache, the temporary entries of their ancestors and themselves; returns outputs [N, H] and the
        temporary slots their own keys got."""
        q, k, v = self._layer(hidden, self.draft.midlayer.hidden_norm(hidden), tokens, positions)
        n, past, first = q.shape[0], self.committed, len(self.temp_keys)
        slots = list(range(first, first + n))
        self.temp_keys.extend(k.unbind(0))
        self.temp_values.extend(v.unbind(0))
        keys = torch.cat([self.keys, torch.stack(self.temp_keys)])
        values = torch.cat([self.values, torch.stack(self.temp_values)])
        visible = torch.zeros(n, keys.shape[0], dtype=torch.bool)
        visible[:, :past] = True
        for row, (own, ancestors) in enumerate(zip(slots, ancestor_slots)):
            visible[row, [past + s for s in ancestors + [own]]] = True
        return self.draft.midlayer.finish(hidden, self._attend(q, keys, values, visible)), slots


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
    prefill_seconds: float = 0.0


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
    target.reset()
    logits, _ = target.forward(prompt, torch.arange(prompt.numel()))
    tokens: list[int] = []
    next_token = int(logits[-1].argmax())
    while not _stop(tokens, [next_token], max_new_tokens, eos_ids):
        position = torch.tensor([target.cached])
        logits, _ = target.forward(torch.tensor([next_token]), position)
        next_token = int(logits[-1].argmax())
    return Generation(tokens, time.perf_counter() - start)


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

    def _propose(self, output: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (probabilities, target token ids) of each row: [N, k] each."""
        probs = torch.softmax(self.draft_logits(output, positions), dim=-1)
        top_p, top_i = probs.topk(self.config.topk, dim=-1)
        return top_p, top_i + self.draft.d2t[top_i]

    def draft_tree(self, root_output: torch.Tensor, root_position: int) -> list[Node]:
        """Nodes of the tree to verify, parents before children (module doc, step 3)."""
        cfg = self.config
        top_p, top_ids = self._propose(root_output[None], torch.tensor([root_position]))
        nodes = [Node(int(t), -1, 0, float(p), root_output) for p, t in zip(top_p[0], top_ids[0])]
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
                    nodes.append(Node(int(t), i, level, nodes[i].score * float(p), outputs[row]))
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
        """Additive [1, 1, 1 + len(tree), committed + 1 + len(tree)] mask: the root row sees the cache and
        itself, a node row also its ancestors and itself."""
        q = 1 + len(tree)
        visible = torch.zeros(q, committed + q, dtype=torch.bool)
        visible[:, : committed + 1] = True
        for row, node in enumerate(tree, start=1):
            visible[row, committed + row] = True
            parent = node.parent
            while parent >= 0:
                visible[row, committed + 1 + parent] = True
                parent = tree[parent].parent
        mask = torch.zeros(q, committed + q, dtype=self.target.model.dtype)
        return mask.masked_fill(~visible, torch.finfo(mask.dtype).min)[None, None]

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> Generation:
        target, runner = self.target, self.runner
        start = time.perf_counter()
        target.reset()
        runner.reset()
        n = prompt.numel()
        logits, aux = target.forward(prompt, torch.arange(n))
        tokens: list[int] = []
        root = int(logits[-1].argmax())
        prefill = time.perf_counter() - start
        accept_lengths: list[int] = []
        if _stop(tokens, [root], max_new_tokens, self.eos_ids):
            return Generation(tokens, time.perf_counter() - start, accept_lengths, prefill)
        next_tokens = torch.cat([prompt[1:], torch.tensor([root])])
        output = runner.extend(aux, next_tokens, torch.arange(n))[-1]
        while True:
            committed = target.cached  # positions 0..committed-1 are in both caches; the root sits at `committed`
            tree = self.draft_tree(output, committed - 1)
            verify_tokens = torch.tensor([root] + [node.token for node in tree])
            positions = torch.tensor([committed] + [committed + 1 + node.depth for node in tree])
            logits, aux = target.forward(verify_tokens, positions, self._verify_mask(tree, committed))
            path, bonus = self._accept(tree, logits)
            accept_lengths.append(len(path) + 1)  # accepted drafts + the bonus: tokens this verification emits
            rows = torch.tensor([0] + [1 + i for i in path])
            target.keep(torch.cat([torch.arange(committed), committed + rows]))
            emitted = [tree[i].token for i in path] + [bonus]
            if _stop(tokens, emitted, max_new_tokens, self.eos_ids):
                break
            output = runner.extend([a[rows] for a in aux], torch.tensor(emitted), committed + torch.arange(rows.numel()))[-1]
            root = bonus
        return Generation(tokens, time.perf_counter() - start, accept_lengths, prefill)

    @staticmethod
    def _accept(tree: list[Node], logits: torch.Tensor) -> tuple[list[int], int]:
        """Greedy acceptance from the root: the accepted node indices and the bonus token."""
        children: dict[int, dict[int, int]] = {}
        for i, node in enumerate(tree):
            children.setdefault(node.parent, {})[node.token] = i
        path, current, row = [], -1, 0
        while True:
            best = int(logits[row].argmax())
            child = children.get(current, {}).get(best)
            if child is None:
                return path, best
            path.append(child)
            current, row = child, 1 + child


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
