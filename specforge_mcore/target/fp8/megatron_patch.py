"""The one patch to Megatron that native FP8 needs, and why.

Megatron's local ``ColumnParallelLinear`` / ``RowParallelLinear`` multiply by ``self.weight`` in full
precision; there is no hook for a weight held in FP8 with block scales. Instead of subclassing every
linear layer in every spec, a linear that holds FP8 weights gets its own ``_forward_impl`` (the function
Megatron calls for the GEMM, with the same arguments): the sequence-parallel gather Megatron would have
done, then ``fp8_linear``. The target is frozen, so no backward is needed. Transformer Engine's layers are
not patched: a native FP8 target is always built on the local spec (``build_stage_model(native_fp8=True)``).
"""

from __future__ import annotations

import functools

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from specforge_mcore.target.fp8.linear import fp8_linear


def is_native_candidate(model: torch.nn.Module, name: str) -> bool:
    """Decoder-layer linear weights: the embedding and output layer are read whole by the draft and the
    teacher, and stay in target.dtype."""
    if not name.startswith("decoder.") or not name.endswith(".weight"):
        return False
    return isinstance(model.get_submodule(name[: -len(".weight")]), (ColumnParallelLinear, RowParallelLinear))


def keep_fp8(module: torch.nn.Module, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> None:
    """Make a Megatron Column/RowParallelLinear hold ``weight`` in FP8 and run its GEMM through ``fp8_linear``."""
    dtype = module.weight.dtype
    module.register_buffer("weight_fp8", weight, persistent=False)
    module.register_buffer("weight_scale_inv", scale_inv, persistent=False)
    module.fp8_block = block
    # The full-precision parameter goes; an empty one keeps Megatron's forward (which reads self.weight) working.
    module.weight = torch.nn.Parameter(torch.empty(0, dtype=dtype, device=weight.device), requires_grad=False)
    module._forward_impl = functools.partial(_fp8_forward_impl, module)


def _fp8_forward_impl(module, input, weight, bias, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                      sequence_parallel=False, tp_group=None, grad_output_buffer=None, wgrad_deferral_limit=None,
                      **unused):
    """Stands in for Megatron's ``linear_with_frozen_weight`` (same arguments; the target is frozen, so
    there is no backward): gather the sequence-parallel input, then the FP8 GEMM."""
    if sequence_parallel:
        input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True,
                                                     group=tp_group if tp_group is not None else module.tp_group)
    out = fp8_linear(input, module.weight_fp8, module.weight_scale_inv, module.fp8_block)
    return out + bias if bias is not None else out
