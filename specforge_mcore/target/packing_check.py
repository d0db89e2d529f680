"""Start-up check: packed documents never see each other inside the target.

The trainer packs several documents into one row and the host (``target/host.py``) gives the target a
document mask. Whether the attention actually honours it depends on the layer spec Megatron built:

* the local spec (no Transformer Engine, or native FP8): Megatron's ``DotProductAttention`` applies the
  host's dense ``[b, 1, s, s]`` mask in its unfused softmax (``masked_softmax_fusion`` is off), and the
  sliding-window layers add their window to it (``build.target_dot_product_attention``);
* Transformer Engine: ``TEDotProductAttention`` with ``attn_mask_type=causal`` ignores a dense mask
  (Megatron-LM issue #2357). Packed rows need THD packing there (``PackedSeqParams`` with ``cu_seqlens``
  and ``qkv_format="thd"``), which the host does not implement yet, so that path is refused outright.

``check_document_isolation(host)`` runs a tiny batch through ``host.forward`` (Megatron's schedule, the
trainer's path, so it holds under TP/PP/EP/SP): two documents of 5 and 7 tokens packed into one row,
and each of them alone in its own row. Each document's logits must agree within a tolerance relative to
their magnitude (norm of the difference over norm of the logits; fp32 1e-4, bf16/fp16 3e-2, FP8 weights
5e-2). Otherwise it raises a
UserError naming the attention path, on every rank (the verdict is reduced over the world).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from specforge_mcore.errors import UserError
from specforge_mcore.target.host import MicroBatch, TargetHost

log = logging.getLogger(__name__)

DOCUMENT_LENGTHS = (5, 7)
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}
FP8_TOLERANCE = 5e-2  # FP8 GEMMs quantise activations per token: a rounding flip moves a logit by ~1e-2
TE_ISSUE = "Megatron-LM issue #2357"


@dataclass
class PackingCheck:
    """What the check measured (identical on every rank)."""

    attention_path: str
    worst: list[float]  # per document: max |packed - alone| / max |alone| over its positions' logits
    tolerance: float
    seq_len: int

    @property
    def ok(self) -> bool:
        return all(w <= self.tolerance for w in self.worst)

    def differences(self) -> str:
        diffs = ", ".join(f"document {i} ({n} tokens) {w:.1e}" for i, (n, w) in enumerate(zip(DOCUMENT_LENGTHS, self.worst)))
        return f"relative difference of the logits (norm ratio), packed vs one by one: {diffs} (tolerance {self.tolerance:.0e})"

    def summary(self) -> str:
        return f"packed-document check passed: {self.attention_path}; {self.differences()}"


# ---- the attention path ----------------------------------------------------------------------------


def core_attention_of(host: TargetHost) -> Optional[torch.nn.Module]:
    """The core attention module of this stage's first decoder layer (None if the stage has none)."""
    for layer in host.model.decoder.layers:
        attention = getattr(getattr(layer, "self_attention", None), "core_attention", None)
        if attention is not None:
            return attention
    return None


def is_transformer_engine(core_attention: Any) -> bool:
    cls = type(core_attention)
    return cls.__module__.startswith(("megatron.core.extensions.transformer_engine", "transformer_engine")) \
        or cls.__name__.startswith("TE")


def describe_attention_path(core_attention: Any) -> str:
    """Words for the attention implementation in use and how the document mask reaches it."""
    if core_attention is None:
        return "unknown attention (this stage has no decoder layer)"
    cls = type(core_attention)
    mask_type = getattr(core_attention, "attn_mask_type", None)
    mask_type = getattr(mask_type, "name", mask_type)
    if is_transformer_engine(core_attention):
        return (f"Transformer Engine's {cls.__name__} with attn_mask_type={mask_type}, given the host's dense "
                f"[b, 1, s, s] document mask, which a causal mask type ignores ({TE_ISSUE})")
    extra = ", sliding window merged into the mask" if getattr(core_attention, "window", None) is not None else ""
    return (f"local spec with a dense document mask: Megatron's {cls.__name__} (attn_mask_type={mask_type}, "
            f"unfused masked softmax{extra}) given the host's [b, 1, s, s] mask")


# ---- the batch -------------------------------------------------------------------------------------


def packed_and_alone(vocab_size: int, seq_len: int, seed: int = 2357) -> MicroBatch:
    """One micro-batch of three rows: [doc A | doc B | pad], [doc A | pad], [doc B | pad]. Positions
    restart per document; padding is a document of its own, as the trainer's packing makes it."""
    gen = torch.Generator().manual_seed(seed)
    docs = [torch.randint(1, vocab_size, (n,), generator=gen) for n in DOCUMENT_LENGTHS]
    rows = [docs, docs[:1], docs[1:]]
    ids = torch.zeros(len(rows), seq_len, dtype=torch.int64)
    pos = torch.zeros(len(rows), seq_len, dtype=torch.int64)
    doc_ids = torch.zeros(len(rows), seq_len, dtype=torch.int32)
    for r, row in enumerate(rows):
        start = 0
        for d, tokens in enumerate(row + [None]):
            n = len(tokens) if tokens is not None else seq_len - start
            if tokens is not None:
                ids[r, start:start + n] = tokens
            pos[r, start:start + n] = torch.arange(n)
            doc_ids[r, start:start + n] = d
            start += n
    return MicroBatch(ids, pos, doc_ids)


def _relative_differences(logits: torch.Tensor) -> list[float]:
    """Per document: ||packed - alone|| / ||alone|| over all its positions and logits (inf when anything is
    not finite). A norm ratio, not the largest single difference: in bf16 one logit of 49K may round a
    step away (a max-based ratio of 3.2e-2 was measured on SmolLM2 with AMX bf16 GEMMs), while a
    document that sees another one changes all of its logits (ratios of 0.1 and more)."""
    worst, start = [], 0
    for d, n in enumerate(DOCUMENT_LENGTHS):
        packed = logits[0, start:start + n].float()
        alone = logits[1 + d, :n].float()
        start += n
        if not (torch.isfinite(packed).all() and torch.isfinite(alone).all()):
            worst.append(math.inf)
            continue
        scale = alone.norm().clamp(min=torch.finfo(torch.float32).tiny)
        worst.append(((packed - alone).norm() / scale).item())
    return worst


def _world_max(values: list[float]) -> list[float]:
    """Collective (every rank): elementwise max over the world."""
    from specforge_mcore import collectives
    from specforge_mcore.platform import device

    return collectives.all_reduce(torch.tensor(values, dtype=torch.float64, device=device()), op="max").tolist()


def tolerance_for(host: TargetHost) -> float:
    """By the target's dtype; FP8 GEMMs (native FP8 checkpoint, or quantised at load, which is the only
    other case with a weights note and no FP8 checkpoint mode) get FP8_TOLERANCE."""
    tolerance = TOLERANCES.get(host.dtype, 3e-2)
    fp8_gemms = host.fp8_mode == "native" or (host.fp8_mode is None and host.weights_note is not None)
    return max(tolerance, FP8_TOLERANCE) if fp8_gemms else tolerance


# ---- the check -------------------------------------------------------------------------------------


def check_document_isolation(host: TargetHost, tolerance: Optional[float] = None) -> PackingCheck:
    """Collective (every rank of the job, once, after building the host): refuse to train when packed
    documents can see each other in the target. Returns the measurement; raises UserError otherwise."""
    path = describe_attention_path(core_attention_of(host))
    if is_transformer_engine(core_attention_of(host)):
        # Every rank built the same spec, so every rank refuses here without talking to the others.
        raise UserError(
            f"the target runs {path}: packed documents would attend to each other. Packing under Transformer "
            "Engine needs THD packing (PackedSeqParams with cu_seqlens, qkv_format='thd'), which "
            "specforge_mcore/target/host.py does not implement yet; run the target with Megatron's local spec "
            "(an environment without Transformer Engine) until it does")
    if tolerance is None:
        tolerance = tolerance_for(host)
    tp = host.layout.tp
    seq_len = -(-sum(DOCUMENT_LENGTHS) // tp) * tp  # sequence parallelism splits the sequence over TP
    batch = packed_and_alone(host.stage.vocab_size, seq_len)
    (capture,) = host.forward([batch], want_logits=True)
    mine = _relative_differences(capture.logits) if capture.logits is not None else [0.0] * len(DOCUMENT_LENGTHS)
    result = PackingCheck(path, _world_max(mine), tolerance, seq_len)
    if not result.ok:
        raise UserError(
            f"packed documents mix inside the target, which runs {path}: a document packed after another one "
            f"does not get the logits it gets alone ({result.differences()}). Training on these features would "
            "teach the draft the wrong distribution; refusing to train")
    log.info("%s", result.summary())
    return result
