"""The draft's attention during the TTT unroll: three interchangeable backends.

Each backend is called as ``attn(q, k0, v0, kd, vd, cu_seqlens, scale)`` with the packed layout of
``specforge_mcore.ops.ttt_attention`` (step i: q ``[T, Hq, D]``, step-0 k0/v0 ``[T, Hkv, D]``, diagonal
kd/vd ``[i, T, Hkv, D]``) and returns ``[T, Hq, D]``:

* ``reference``: the straightforward form, explicit ``[T, T + i]`` scores per head (fp32), any device.
  Memory O(H T^2) per step; it is the spec the others are tested against.
* ``flex``: FlexAttention (compiled) with a block mask built from cu_seqlens, over the step-0 keys
  (same document and causal) followed by the diagonal keys of every step (the query's own position).
  CUDA only (FlexAttention has no backward on CPU).
* ``csrc``: the flash-style extension op (``csrc/``), O(T * D) extra memory; CPU and, when built so, CUDA.

Every backend takes fp32 or bf16 q/k/v and returns the dtype of q.

``select_attention_backend("auto", device)`` follows ``choose_backend``:

* CUDA: ``flex``. The csrc CUDA op is taken only when asked for (``draft.attention_backend=csrc``): it is
  a scalar-FMA kernel with no tensor cores that has never been benchmarked on a GPU; until a GPU
  benchmark in BENCHMARKS.md shows it ahead of FlexAttention, auto does not pick it.
* CPU: ``csrc`` when the extension is built with CPU kernels and passes a start-up parity check against
  the reference (once per process and device), else ``reference``.
* any other device: ``reference``.

The choice and its reason are logged (INFO; WARNING when auto falls back to the reference).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from specforge_mcore.errors import UserError
from specforge_mcore.ops import ttt_attention as ttt_op

log = logging.getLogger(__name__)

AttentionFn = Callable[..., torch.Tensor]
BACKENDS = ("auto", "reference", "flex", "csrc")


def document_ids(cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    """Document index of each of the T packed tokens (no host sync)."""
    positions = torch.arange(tokens, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)


def reference_attention(q: torch.Tensor, k0: torch.Tensor, v0: torch.Tensor, kd: torch.Tensor, vd: torch.Tensor,
                        cu_seqlens: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    tokens, q_heads, dim = q.shape
    kv_heads = k0.shape[1]
    if scale is None:
        scale = dim ** -0.5
    # [T, Hkv, G, D]: query heads grouped under the kv head they read.
    qf = q.float().reshape(tokens, kv_heads, q_heads // kv_heads, dim) * scale
    doc = document_ids(cu_seqlens, tokens)
    pos = torch.arange(tokens, device=q.device)
    visible = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])  # [query, key]
    causal = torch.einsum("tkgd,skd->kgts", qf, k0.float()).masked_fill(~visible, float("-inf"))
    diagonal = torch.einsum("tkgd,jtkd->kgtj", qf, kd.float())
    probs = torch.softmax(torch.cat([causal, diagonal], dim=-1), dim=-1)  # [Hkv, G, T, T + i]
    out = torch.einsum("kgts,skd->tkgd", probs[..., :tokens], v0.float())
    out = out + torch.einsum("kgtj,jtkd->tkgd", probs[..., tokens:], vd.float())
    return out.reshape(tokens, q_heads, dim).to(q.dtype)


_compiled_flex = None
_compiled_block_mask = None


def flex_attention_ttt(q: torch.Tensor, k0: torch.Tensor, v0: torch.Tensor, kd: torch.Tensor, vd: torch.Tensor,
                       cu_seqlens: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    if q.device.type != "cuda":
        raise UserError(f"attention backend 'flex' needs a CUDA device, got {q.device}: FlexAttention has no "
                        "backward on CPU; use draft.attention_backend=csrc or reference")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _compiled_flex, _compiled_block_mask
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
        # Uncompiled, create_block_mask materialises the whole [T, (1 + i) T] mask first.
        _compiled_block_mask = torch.compile(create_block_mask)
    tokens, q_heads, dim = q.shape
    kv_heads, steps = k0.shape[1], kd.shape[0]
    doc = document_ids(cu_seqlens, tokens)

    # Key index kv = j * T + s: step-0 key s for j = 0, the diagonal key of step j at position s after.
    def mask_mod(batch, head, q_idx, kv_idx):
        step, s = kv_idx // tokens, kv_idx % tokens
        causal = (step == 0) & (doc[s] == doc[q_idx]) & (s <= q_idx)
        return causal | ((step > 0) & (s == q_idx))

    block_mask = _compiled_block_mask(mask_mod, None, None, tokens, (1 + steps) * tokens, device=q.device)
    keys = torch.cat([k0.unsqueeze(0), kd]).flatten(0, 1).transpose(0, 1).unsqueeze(0)  # [1, Hkv, (1+i)T, D]
    values = torch.cat([v0.unsqueeze(0), vd]).flatten(0, 1).transpose(0, 1).unsqueeze(0)
    out = _compiled_flex(q.transpose(0, 1).unsqueeze(0), keys, values, block_mask=block_mask, scale=scale,
                         enable_gqa=q_heads != kv_heads)
    return out[0].transpose(0, 1)


def csrc_attention(q: torch.Tensor, k0: torch.Tensor, v0: torch.Tensor, kd: torch.Tensor, vd: torch.Tensor,
                   cu_seqlens: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    return ttt_op.ttt_attention(q, k0, v0, kd, vd, cu_seqlens, scale)


_IMPLEMENTATIONS: dict[str, AttentionFn] = {
    "reference": reference_attention,
    "flex": flex_attention_ttt,
    "csrc": csrc_attention,
}

_parity_results: dict[str, tuple[bool, str]] = {}


def _parity_inputs(device: torch.device):
    """A tiny packed batch: four documents (one of length 1), GQA 2, two diagonal steps, fp32."""
    gen = torch.Generator().manual_seed(1234)
    tokens, q_heads, kv_heads, dim, steps = 23, 4, 2, 32, 2

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device).requires_grad_()

    tensors = [rand(tokens, q_heads, dim), rand(tokens, kv_heads, dim), rand(tokens, kv_heads, dim),
               rand(steps, tokens, kv_heads, dim), rand(steps, tokens, kv_heads, dim)]
    cu_seqlens = torch.tensor([0, 9, 10, 17, 23], dtype=torch.int32, device=device)
    weight = torch.randn(tokens, q_heads, dim, generator=gen).to(device)
    return tensors, cu_seqlens, weight


def csrc_parity(device: torch.device | str, tolerance: float = 1e-4) -> tuple[bool, str]:
    """Run the csrc op forward + backward against the reference on a tiny shape (cached per device)."""
    device = torch.device(device)
    key = str(device)
    if key in _parity_results:
        return _parity_results[key]
    if not ttt_op.is_built(device):
        result = (False, ttt_op.build_hint(device))
    else:
        tensors, cu_seqlens, weight = _parity_inputs(device)
        results = []
        try:
            for fn in (csrc_attention, reference_attention):
                out = fn(*tensors, cu_seqlens, None)
                grads = torch.autograd.grad((out * weight).sum(), tensors)
                results.append([out.detach(), *grads])
        except RuntimeError as exc:  # a kernel that fails to launch on this device: report it, do not use it
            result = (False, f"the csrc op raised {type(exc).__name__}: {exc}")
        else:
            worst = max((a - b).abs().max().item() for a, b in zip(*results))
            ok = worst <= tolerance
            result = (ok, f"max |csrc - reference| over out and grads = {worst:.2e} "
                          f"({'within' if ok else 'above'} {tolerance:.0e})")
    _parity_results[key] = result
    return result


CSRC_CUDA_FACT = "the csrc CUDA op is a scalar-FMA kernel with no tensor cores that has never been benchmarked on a GPU"
CSRC_CUDA_NOTE = (f"{CSRC_CUDA_FACT}: it is used only when asked for (draft.attention_backend=csrc), until a GPU "
                  "benchmark in BENCHMARKS.md shows it ahead")


def choose_backend(name: str, device_type: str, csrc_ok: bool, csrc_why: str = "") -> tuple[str, str]:
    """The rule behind ``select_attention_backend``, without touching a device: ``(backend, reason)``.

    ``csrc_ok`` / ``csrc_why``: whether the csrc op is built for the device and passed its parity check,
    and why (only consulted for ``auto`` on the CPU)."""
    if name not in BACKENDS:
        raise UserError(f"draft.attention_backend={name!r} is not one of {', '.join(BACKENDS)}")
    if name == "flex" and device_type != "cuda":
        raise UserError(f"draft.attention_backend=flex needs a CUDA device, got {device_type}: FlexAttention has no "
                        "backward on CPU; use csrc or reference")
    if name != "auto":
        reason = "asked for by draft.attention_backend"
        if name == "csrc" and device_type == "cuda":
            reason += f"; note: {CSRC_CUDA_FACT}"
        return name, reason
    if device_type == "cuda":
        return "flex", f"auto on CUDA: FlexAttention, compiled, with a document-causal + diagonal block mask; {CSRC_CUDA_NOTE}"
    if device_type == "cpu":
        if csrc_ok:
            return "csrc", f"auto on CPU: the csrc C++ op is built and its start-up parity check passed ({csrc_why})"
        return "reference", f"auto on CPU: the csrc op is not used ({csrc_why}); the reference is O(H T^2) in memory"
    return "reference", f"auto on {device_type}: only the reference runs on this device type"


def select_attention_backend(name: str, device: torch.device | str) -> AttentionFn:
    """The attention callable for ``draft.attention_backend`` = auto | reference | flex | csrc (see the
    module docstring for the rule of ``auto``); logs which one and why."""
    device = torch.device(device)
    csrc_ok, csrc_why = False, ""
    if name == "auto" and device.type == "cpu":
        csrc_ok, csrc_why = csrc_parity(device)
    backend, reason = choose_backend(name, device.type, csrc_ok, csrc_why)
    if name == "csrc":
        if not ttt_op.is_built(device):
            raise ttt_op.ExtensionNotBuiltError(f"draft.attention_backend=csrc: {ttt_op.build_hint(device)}")
        ok, why = csrc_parity(device)
        if not ok:
            raise RuntimeError(f"the csrc TTT attention failed its start-up parity check on {device}: {why}")
        reason += f"; start-up parity check passed ({why})"
    fallback = name == "auto" and backend == "reference"
    log.log(logging.WARNING if fallback else logging.INFO, "draft attention backend: %s on %s (%s)", backend,
            device.type, reason)
    return _IMPLEMENTATIONS[backend]
