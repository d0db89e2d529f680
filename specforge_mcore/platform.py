"""Device selection and the one place where Megatron-Core's CUDA assumptions are shimmed on CPU.

Megatron-Core assumes a GPU in a handful of call sites. On a machine without CUDA (CI, laptops)
``apply_cpu_shims()`` patches exactly those, each next to a comment naming the call site it answers.
Nothing here runs when CUDA is available: on GPUs Megatron runs unmodified.

Optional accelerators are detected, never required:
* Transformer Engine: merely having its empty meta-package installed makes ``import megatron.core``
  raise RuntimeError, so it is probed in a way that cannot break the import of Megatron.
* NVIDIA apex: the PyPI package ``apex`` is an unrelated web toolkit; Megatron falls back to torch.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import types
from typing import Any

import torch

_SHIMS_APPLIED = False


def quiet_known_warnings() -> None:
    """Silence Megatron's import-time notices about optional packages (TE/apex are optional here by
    design; ``has_transformer_engine()`` / ``has_apex()`` report them) so real warnings stay visible."""
    import warnings

    for pattern in (r"Transformer Engine and Apex are not installed", r"Apex is not installed",
                    r"full scope is deprecated", r"Transformer Engine is not installed"):
        warnings.filterwarnings("ignore", message=pattern)


def device() -> torch.device:
    """The device this process computes on: its local GPU when CUDA is there, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@functools.lru_cache(maxsize=None)
def has_transformer_engine() -> bool:
    """True when a working Transformer Engine (with its PyTorch extension) can be imported."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # the meta-package without a backend raises RuntimeError, not ImportError
        return False
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def has_apex() -> bool:
    """True when NVIDIA apex (not the unrelated PyPI ``apex``) is importable."""
    if importlib.util.find_spec("apex") is None:
        return False
    try:
        import apex.normalization  # noqa: F401
    except Exception:
        return False
    return True


class _NoStream:
    """Stands in for torch.cuda.Stream / Event on CPU: every wait and record is already satisfied.
    A class (not a factory) so annotations such as ``torch.cuda.Stream | None`` elsewhere still work."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "_NoStream":
        return self

    def record(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _NoStream)

    def __hash__(self) -> int:
        return 0


class _CpuTorchForSchedules(types.ModuleType):
    """``torch`` as seen by megatron.core.pipeline_parallel.schedules: identical, except that the
    literal ``device="cuda"`` of its token counter (``total_num_tokens = torch.zeros([], ...,
    device="cuda")`` in every schedule) becomes the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def zeros(*args: Any, **kwargs: Any) -> torch.Tensor:
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return torch.zeros(*args, **kwargs)


def apply_cpu_shims() -> None:
    """Make Megatron-Core run on CPU with gloo. Idempotent; a no-op when CUDA is available."""
    global _SHIMS_APPLIED
    if _SHIMS_APPLIED or torch.cuda.is_available():
        return
    _SHIMS_APPLIED = True

    # RoPE (rotary_pos_embedding: inv_freq device), TP (tensor_parallel/layers + mappings: gather
    # buffers), MoE router (router.py: weight .to(device)) and the PP receive buffers
    # (p2p_communication: torch.empty(..., device=current_device())) all allocate on
    # torch.cuda.current_device().
    torch.cuda.current_device = lambda: torch.device("cpu")
    # The alltoall token dispatcher (token_dispatcher._maybe_dtoh_and_synchronize) and shared experts
    # overlap work on side streams and synchronise with events.
    torch.cuda.Stream = _NoStream  # type: ignore[assignment]
    torch.cuda.Event = _NoStream  # type: ignore[assignment]
    torch.cuda.current_stream = lambda *a, **k: _NoStream()  # type: ignore[assignment]
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
    # p2p_communication._batched_p2p_ops / _p2p_ops call torch.cuda.synchronize() after sends.
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]

    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # Megatron 0.16.1 moe_utils: without Transformer Engine, `te_general_gemm` is never bound, and
    # the router GEMM (RouterGatingLinearFunction) reads it -> NameError.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    # token_dispatcher: the alltoall split sizes are moved "to CPU as numpy" only when they are CUDA
    # tensors; on CPU they stay tensors, which all_to_all_single rejects as split sizes.
    original_move = moe_utils.maybe_move_tensor_to_cpu

    def _move_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return original_move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = _move_to_cpu

    # schedules: `torch.zeros([], dtype=torch.int, device="cuda")` for the token counter.
    schedules.torch = _CpuTorchForSchedules()

    _shim_uneven_tp_collectives()
    _shim_tied_embedding_sync()


def _shim_tied_embedding_sync() -> None:
    """models/common/language_module.setup_embeddings_and_output_layer: with tied embeddings and
    PP > 1, the first and last stages sync their copies with ``weight.data = weight.data.cuda()`` and an
    all-reduce. On CPU the tensor stays where it is for that call (the all-reduce runs on gloo)."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule.setup_embeddings_and_output_layer

    def setup_embeddings_and_output_layer(self):
        tensor_cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda tensor, *args, **kwargs: tensor
        try:
            return original(self)
        finally:
            torch.Tensor.cuda = tensor_cuda

    LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


def _shim_uneven_tp_collectives() -> None:
    """tensor_parallel/mappings: with expert-TP > 1 the alltoall dispatcher gathers and reduce-scatters
    a different number of tokens per rank (``output_split_sizes`` / ``input_split_sizes``). NCCL takes
    uneven all_gather / reduce_scatter lists; gloo does not. Pad to the largest piece, use the even
    collective, then cut. The even case is left to Megatron."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    original_gather = mappings._gather_along_first_dim
    original_reduce_scatter = mappings._reduce_scatter_along_first_dim

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original_gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        longest = max(sizes)
        padded = input_.new_zeros((longest,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        pieces = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(pieces, padded.contiguous(), group=group)
        return torch.cat([piece[:n] for piece, n in zip(pieces, sizes)], dim=0)

    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return original_reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(n) for n in input_split_sizes]
        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        start = sum(sizes[: group.rank()])
        return total[start : start + sizes[group.rank()]].contiguous()

    mappings._gather_along_first_dim = gather
    mappings._reduce_scatter_along_first_dim = reduce_scatter


def _shim_missing_transformer_engine() -> None:
    """Megatron 0.16.1 without Transformer Engine: ``megatron.core.extensions.transformer_engine`` still
    imports (its TE classes then derive from a MagicMock), so multi_latent_attention sets HAVE_TE = True,
    and ``MLASelfAttention.__init__``'s ``isinstance(self.linear_proj, TELinear)`` raises TypeError.
    Its HAVE_TE only guards TE-specific paths; without TE they must be off."""
    from megatron.core.transformer import multi_latent_attention

    multi_latent_attention.HAVE_TE = False


def apply_platform_shims() -> None:
    """Everything a process needs before building Megatron modules on this machine."""
    apply_cpu_shims()
    if not has_transformer_engine():
        _shim_missing_transformer_engine()
