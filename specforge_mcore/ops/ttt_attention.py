"""The TTT attention op (``specforge_mcore::ttt_attention_fwd`` / ``_bwd``, built from ``csrc/``).

Step i of the training-time-test unroll (docs/design.md §4), on a packed batch of T tokens whose documents
are given by ``cu_seqlens`` (int32 ``[n_docs + 1]``, from 0 to T; padding is a document of its own):

* ``q``       ``[T, Hq, D]``       queries of step i (RoPE applied by the caller)
* ``k0, v0``  ``[T, Hkv, D]``      keys/values of step 0
* ``kd, vd``  ``[i, T, Hkv, D]``   keys/values of steps 1..i (index j-1 holds step j; leading dim 0 at i=0)

A query at position t attends to k0/v0 at positions s <= t of its own document and to kd[j, t], vd[j, t];
query head h reads kv head ``h // (Hq // Hkv)``; ``scale`` defaults to ``D ** -0.5``. The op returns the
output ``[T, Hq, D]`` (dtype of q) and the log-sum-exp of the scaled scores, fp32 ``[Hq, T]``, which the
backward uses to recompute the probabilities; lse is not differentiable.

Extra memory is O(T * H * D) per step: the kernels are flash-style and never form the ``[T, T]`` scores.
The C++ library defines the schemas and the CPU/CUDA kernels; this module adds what Python owns: fake
(meta) kernels so ``torch.compile`` can trace the op, and its autograd formula.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from specforge_mcore.errors import UserError

_OP_FWD = "specforge_mcore::ttt_attention_fwd"
_OP_BWD = "specforge_mcore::ttt_attention_bwd"


class ExtensionNotBuiltError(UserError):
    """The csrc extension (``specforge_mcore._C``) was asked for but is not built for that device."""


def _load_extension() -> Optional[str]:
    """Import the extension; return why it is unavailable, or None when it loaded."""
    try:
        importlib.import_module("specforge_mcore._C")
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


_LOAD_ERROR = _load_extension()


def is_built(device: Optional[torch.device | str] = None) -> bool:
    """Whether the extension is importable, and when ``device`` is given, has kernels for its type."""
    if _LOAD_ERROR is not None:
        return False
    if device is None:
        return True
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(_OP_FWD, key)


def build_hint(device: Optional[torch.device | str] = None) -> str:
    """Why the op is unavailable (for ``device``) and how to build it."""
    if _LOAD_ERROR is not None:
        return (f"specforge_mcore._C did not load ({_LOAD_ERROR}); build it with "
                "`pip install --no-build-isolation -e .` from the repository root (see csrc/README.md)")
    kind = torch.device(device).type
    if kind == "cuda":
        return ("specforge_mcore._C was built without CUDA kernels; rebuild it with a CUDA torch and nvcc "
                "(CUDA_HOME) present (see csrc/README.md)")
    return f"specforge_mcore._C has no kernels for {kind} devices (it has CPU and, when built so, CUDA ones)"


if _LOAD_ERROR is None:

    @torch.library.register_fake(_OP_FWD)
    def _fwd_fake(q, k0, v0, kd, vd, cu_seqlens, scale):
        torch._check(q.dim() == 3 and k0.dim() == 3 and kd.dim() == 4, lambda: "ttt_attention: bad ranks")
        tokens, q_heads, _ = q.shape
        return q.new_empty(q.shape), q.new_empty((q_heads, tokens), dtype=torch.float32)

    @torch.library.register_fake(_OP_BWD)
    def _bwd_fake(dout, q, k0, v0, kd, vd, cu_seqlens, out, lse, scale):
        return (q.new_empty(q.shape), k0.new_empty(k0.shape), v0.new_empty(v0.shape),
                kd.new_empty(kd.shape), vd.new_empty(vd.shape))

    def _setup_context(ctx, inputs, output):
        q, k0, v0, kd, vd, cu_seqlens, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k0, v0, kd, vd, cu_seqlens, out, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)

    def _backward(ctx, dout, _dlse):
        q, k0, v0, kd, vd, cu_seqlens, out, lse = ctx.saved_tensors
        dq, dk0, dv0, dkd, dvd = torch.ops.specforge_mcore.ttt_attention_bwd(
            dout.contiguous(), q, k0, v0, kd, vd, cu_seqlens, out, lse, ctx.scale)
        return dq, dk0, dv0, dkd, dvd, None, None

    torch.library.register_autograd(_OP_FWD, _backward, setup_context=_setup_context)


def ttt_attention_with_lse(q: torch.Tensor, k0: torch.Tensor, v0: torch.Tensor, kd: torch.Tensor,
                           vd: torch.Tensor, cu_seqlens: torch.Tensor,
                           scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [T, Hq, D], lse fp32 [Hq, T])``; differentiable in q, k0, v0, kd, vd."""
    if _LOAD_ERROR is not None:
        raise ExtensionNotBuiltError(f"the csrc TTT attention is not available: {build_hint()}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.ops.specforge_mcore.ttt_attention_fwd(q, k0, v0, kd, vd, cu_seqlens.to(torch.int32), float(scale))


def ttt_attention(q: torch.Tensor, k0: torch.Tensor, v0: torch.Tensor, kd: torch.Tensor, vd: torch.Tensor,
                  cu_seqlens: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """TTT attention output ``[T, Hq, D]`` (see the module docstring for the layout)."""
    return ttt_attention_with_lse(q, k0, v0, kd, vd, cu_seqlens, scale)[0]
