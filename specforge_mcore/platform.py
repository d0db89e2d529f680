"""Device selection, capability probes, and the one place where Megatron-Core is shimmed.

Megatron-Core assumes a GPU, and in places Transformer Engine, in a handful of call sites. Each shim
here answers exactly one of them (its comment names the call site) and is applied when the thing it
stands in for is missing, on any device:

* no CUDA (CI, laptops): ``torch.cuda.current_device``, streams and events, ``synchronize``, the
  schedules' literal ``device="cuda"``, the tied-embedding ``.cuda()``, split sizes that stay tensors on
  the CPU, and the uneven TP collectives that gloo lacks;
* no (working) Transformer Engine, GPU or not: the MoE router's ``te_general_gemm`` and
  multi_latent_attention's ``HAVE_TE``.

Grouped GEMM needs nothing here: ``target/build.py`` asks for ``moe_grouped_gemm`` only with Transformer
Engine, so without it Megatron builds its sequential experts.

``apply_platform_shims()`` is the one entry point (idempotent). It must work with Megatron-Core 0.16.1
(CI, this repository's pin) and 0.19.x (the GPU machine): when a shim's target (module, attribute or
call site) does not exist in the installed version, that shim is skipped and the reason is recorded in
``shim_report()``; it never crashes. On a GPU with Transformer Engine nothing is patched.

Optional accelerators are detected, never required:
* Transformer Engine: merely having its empty meta-package installed makes ``import megatron.core``
  raise RuntimeError, so it is probed in a way that cannot break the import of Megatron.
* NVIDIA apex: the PyPI package ``apex`` is an unrelated web toolkit; Megatron falls back to torch.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import types
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

_SHIMS_APPLIED = False
# shim name -> "applied" | "skipped: <why>" | "not needed: <capability> present"
_SHIM_REPORT: dict[str, str] = {}


def quiet_known_warnings() -> None:
    """Silence Megatron's import-time notices about optional packages (TE/apex are optional here by
    design; ``has_transformer_engine()`` / ``has_apex()`` report them) so real warnings stay visible."""
    import warnings

    for pattern in (r"Transformer Engine and Apex are not installed", r"Apex is not installed",
                    r"full scope is deprecated", r"Transformer Engine is not installed",
                    # torch 2.13 deprecates the name Megatron's TP/SP gathers call (tensor_parallel/
                    # mappings): one FutureWarning per call and rank flooded multi-rank runs.
                    r"`torch.distributed.all_gather_into_tensor` is deprecated"):
        warnings.filterwarnings("ignore", message=pattern)


def has_cuda() -> bool:
    """Capability probe: a usable CUDA device (the shims' "no CUDA" group keys on it)."""
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device this process computes on: its local GPU when CUDA is there, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@functools.lru_cache(maxsize=None)
def has_transformer_engine() -> bool:
    """True when a working Transformer Engine (with its PyTorch extension) can be imported and used
    (it has no CPU kernels: without CUDA it counts as missing)."""
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


class _ShimSkipped(Exception):
    """The shim's target does not exist in the installed Megatron-Core: nothing to patch."""


def _module(name: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise _ShimSkipped(f"{name} does not import in this Megatron-Core ({exc})") from None


def _require(owner: Any, *names: str) -> None:
    where = getattr(owner, "__name__", repr(owner))
    for name in names:
        if not hasattr(owner, name):
            raise _ShimSkipped(f"{where} has no {name} in this Megatron-Core")


# ---- "no CUDA" shims ------------------------------------------------------------------------------


def _shim_current_device() -> None:
    # RoPE (rotary_pos_embedding: inv_freq device), TP (tensor_parallel/layers + mappings: gather
    # buffers), MoE router (router.py: weight .to(device)) and the PP receive buffers
    # (p2p_communication: torch.empty(..., device=current_device())) all allocate on
    # torch.cuda.current_device().
    torch.cuda.current_device = lambda: torch.device("cpu")


def _shim_streams_and_events() -> None:
    # The alltoall token dispatcher (token_dispatcher._maybe_dtoh_and_synchronize) and shared experts
    # overlap work on side streams and synchronise with events.
    torch.cuda.Stream = _NoStream  # type: ignore[assignment]
    torch.cuda.Event = _NoStream  # type: ignore[assignment]
    torch.cuda.current_stream = lambda *a, **k: _NoStream()  # type: ignore[assignment]
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]


def _shim_synchronize() -> None:
    # p2p_communication._batched_p2p_ops / _p2p_ops call torch.cuda.synchronize() after sends.
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]


def _shim_schedules_device() -> None:
    # schedules: `torch.zeros([], dtype=torch.int, device="cuda")` for the token counter.
    schedules = _module("megatron.core.pipeline_parallel.schedules")
    _require(schedules, "torch")
    schedules.torch = _CpuTorchForSchedules()


def _shim_split_sizes_to_numpy() -> None:
    # token_dispatcher: the alltoall split sizes are moved "to CPU as numpy" only when they are CUDA
    # tensors (moe_utils.maybe_move_tensor_to_cpu); on CPU they stay tensors, which all_to_all_single
    # rejects as split sizes.
    moe_utils = _module("megatron.core.transformer.moe.moe_utils")
    token_dispatcher = _module("megatron.core.transformer.moe.token_dispatcher")
    _require(moe_utils, "maybe_move_tensor_to_cpu")
    _require(token_dispatcher, "maybe_move_tensor_to_cpu")
    original_move = moe_utils.maybe_move_tensor_to_cpu

    def _move_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return original_move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = _move_to_cpu


def _shim_tied_embedding_sync() -> None:
    """models/common/language_module.setup_embeddings_and_output_layer: with tied embeddings and
    PP > 1, the first and last stages sync their copies with ``weight.data = weight.data.cuda()`` and an
    all-reduce. On CPU the tensor stays where it is for that call (the all-reduce runs on gloo)."""
    language_module = _module("megatron.core.models.common.language_module.language_module")
    _require(language_module, "LanguageModule")
    LanguageModule = language_module.LanguageModule
    _require(LanguageModule, "setup_embeddings_and_output_layer")
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
    uneven all_gather / reduce_scatter lists; gloo (which carries CPU tensors) does not. Pad to the
    largest piece, use the even collective, then cut. The even case, and CUDA tensors, are left to
    Megatron."""
    from specforge_mcore import collectives

    mappings = _module("megatron.core.tensor_parallel.mappings")
    _require(mappings, "_gather_along_first_dim", "_reduce_scatter_along_first_dim")
    original_gather = mappings._gather_along_first_dim
    original_reduce_scatter = mappings._reduce_scatter_along_first_dim

    def uneven_on_cpu(tensor, sizes, group) -> bool:
        return sizes is not None and group.size() > 1 and tensor.device.type == "cpu"

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if not uneven_on_cpu(input_, output_split_sizes, group):
            return original_gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        longest = max(sizes)
        padded = input_.new_zeros((longest,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        pieces = collectives.all_gather(padded, group=group)
        return torch.cat([piece[:n] for piece, n in zip(pieces, sizes)], dim=0)

    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if not uneven_on_cpu(input_, input_split_sizes, group):
            return original_reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(n) for n in input_split_sizes]
        total = collectives.all_reduce(input_.contiguous().clone(), group=group)
        start = sum(sizes[: group.rank()])
        return total[start : start + sizes[group.rank()]].contiguous()

    mappings._gather_along_first_dim = gather
    mappings._reduce_scatter_along_first_dim = reduce_scatter


# ---- "no Transformer Engine" shims ---------------------------------------------------------------


def _shim_router_gemm() -> None:
    """moe_utils.RouterGatingLinearFunction (the MoE router GEMM) reads ``te_general_gemm``. Megatron
    0.16.1 binds that name only when its TE import succeeds, so without TE the router raises NameError,
    on a GPU as on the CPU; newer versions bind it to None themselves. Where TE imports but cannot run
    (no CUDA) the name is also set to None, so the router takes its torch GEMM."""
    moe_utils = _module("megatron.core.transformer.moe.moe_utils")
    _require(moe_utils, "RouterGatingLinearFunction")
    if getattr(moe_utils, "te_general_gemm", None) is None and hasattr(moe_utils, "te_general_gemm"):
        raise _ShimSkipped("moe_utils.te_general_gemm is already None in this Megatron-Core")
    moe_utils.te_general_gemm = None


def _shim_mla_have_te() -> None:
    """Megatron 0.16.1 without Transformer Engine: ``megatron.core.extensions.transformer_engine`` still
    imports (its TE classes then derive from a MagicMock), so multi_latent_attention sets HAVE_TE = True,
    and ``MLASelfAttention.__init__``'s ``isinstance(self.linear_proj, TELinear)`` raises TypeError.
    Its HAVE_TE only guards TE-specific paths; without TE they must be off."""
    multi_latent_attention = _module("megatron.core.transformer.multi_latent_attention")
    _require(multi_latent_attention, "HAVE_TE")
    multi_latent_attention.HAVE_TE = False


# (name, the capability whose absence calls for it, the shim)
_SHIMS: list[tuple[str, str, Callable[[], None]]] = [
    ("current_device", "cuda", _shim_current_device),
    ("streams_and_events", "cuda", _shim_streams_and_events),
    ("synchronize", "cuda", _shim_synchronize),
    ("schedules_device", "cuda", _shim_schedules_device),
    ("split_sizes_to_numpy", "cuda", _shim_split_sizes_to_numpy),
    ("tied_embedding_sync", "cuda", _shim_tied_embedding_sync),
    ("uneven_tp_collectives", "cuda", _shim_uneven_tp_collectives),
    ("router_te_general_gemm", "transformer_engine", _shim_router_gemm),
    ("mla_have_te", "transformer_engine", _shim_mla_have_te),
]


def missing_capabilities() -> dict[str, bool]:
    """Which of the things the shims stand in for are missing on this machine (probed now)."""
    return {"cuda": not has_cuda(), "transformer_engine": not has_transformer_engine()}


def apply_platform_shims() -> None:
    """Everything a process needs before building Megatron modules on this machine: each shim whose
    capability is missing (see the module docstring). Idempotent."""
    global _SHIMS_APPLIED
    if _SHIMS_APPLIED:
        return
    _SHIMS_APPLIED = True
    missing = missing_capabilities()
    for name, capability, shim in _SHIMS:
        if not missing[capability]:
            _SHIM_REPORT[name] = f"not needed: {capability} present"
            continue
        try:
            shim()
        except _ShimSkipped as why:
            _SHIM_REPORT[name] = f"skipped: {why}"
            log.debug("Megatron shim %s skipped: %s", name, why)
        else:
            _SHIM_REPORT[name] = "applied"


def shim_report() -> dict[str, str]:
    """What ``apply_platform_shims()`` did, per shim: applied, skipped (and why), or not needed."""
    return dict(_SHIM_REPORT)
