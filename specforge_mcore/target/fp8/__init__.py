"""Block-scaled FP8 targets (the official ``*-FP8`` releases of Qwen3 and DeepSeek-V3).

Two ways to host one (``target.fp8``):

* ``dequantize``: the reader returns the dequantised values of whatever slice a sharding rule asks for,
  so any TP/EP/PP layout is exact (``reads.read_scaled``).
* ``native``: each rank keeps its linear weights in FP8 with their block scales (half the bytes of bf16)
  and runs its GEMMs in FP8 where the GPU can (``linear``); a layout whose shards would cut a block is
  refused, naming the tensor and the layouts that keep whole blocks (``layouts``). The pieces of each
  shard come from ``target/sharding.py`` and bring their own scales (``reads.read_native``); the one
  Megatron patch this needs is in ``megatron_patch`` (imported by the loader only: it imports Megatron).

Modules: ``format`` (what the checkpoint says, block math), ``reads``, ``layouts``, ``linear``,
``megatron_patch``, ``reference`` (the dequantised checkpoint for HF transformers, used by verify-target).
"""

from specforge_mcore.target.fp8.format import (E4M3_MAX, FP8_DTYPE, MODES, SCALE_SUFFIX, BlockFp8, checkpoint_format,
                                               dequantize_blocks, expand_scales, quantize_blocks,
                                               read_checkpoint_format, resolve_mode, scale_key)
from specforge_mcore.target.fp8.layouts import (check_native_layout, native_layout_problems, native_layouts_that_fit,
                                                planned_weight_bytes, stage_linear_counts)
from specforge_mcore.target.fp8.linear import describe_native, fp8_gemm_available, fp8_linear, module_bytes

__all__ = ["E4M3_MAX", "FP8_DTYPE", "MODES", "SCALE_SUFFIX", "BlockFp8", "checkpoint_format", "dequantize_blocks",
           "expand_scales", "quantize_blocks", "read_checkpoint_format", "resolve_mode", "scale_key",
           "check_native_layout", "native_layout_problems", "native_layouts_that_fit", "planned_weight_bytes",
           "stage_linear_counts", "describe_native", "fp8_gemm_available", "fp8_linear", "module_bytes"]
