"""The frozen target, hosted by Megatron-Core: forward through the pipeline schedule, capturing features.

``TargetHost`` owns this rank's stage of the model. ``forward(micro_batches)`` runs Megatron's schedule
with ``forward_only=True`` and records, per micro-batch, on the stage that owns them:

* the outputs of the capture layers (docs/design.md §4: "output of layer i", 0-based; default [1, L//2-1, L-4]),
* on the last stage the final hidden state (after the final norm) and the target's argmax over the
  full vocabulary, computed vocab-parallel (never ``[T, V]`` on one rank),
* optionally (``verify-target``) the full logits, gathered over TP.

Sequence-parallel activations are gathered over TP before they are kept. Moving the captured tensors
to the ranks that train the draft is ``target/transport.py``'s job.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch

from specforge_mcore.errors import UserError
from specforge_mcore.platform import device as platform_device
from specforge_mcore.rope import RopeTable
from specforge_mcore.target.build import Layout, StageModel, build_stage_model, read_hf_config
from specforge_mcore.target.load import SafetensorsReader, load_stage_weights
from specforge_mcore.target.sharding import pipeline_split, stage_of_layer


def default_capture_layer_ids(num_layers: int) -> list[int]:
    """docs/design.md §4: outputs of layers [1, L//2 - 1, L - 4] (0-based "output of layer i")."""
    ids = [1, num_layers // 2 - 1, num_layers - 4]
    if num_layers < 5 or len(set(ids)) != 3:
        raise UserError(f"a target with {num_layers} layers is too shallow for the default capture layers "
                        f"{ids}; set target.capture_layer_ids explicitly")
    return ids


def check_capture_layer_ids(ids: list[int], num_layers: int) -> list[int]:
    if len(ids) != 3:
        raise UserError(f"target.capture_layer_ids={ids}: EAGLE-3 fuses exactly three layers (low, mid, high)")
    for i in ids:
        if not 0 <= i < num_layers:
            raise UserError(f"target.capture_layer_ids={ids}: layer {i} does not exist "
                            f"(the target has layers 0..{num_layers - 1})")
    return list(ids)


def resolve_capture_layer_ids(ids: Optional[list[int]], num_layers: int) -> list[int]:
    """``target.capture_layer_ids`` checked, or the default for ``num_layers`` when it is not set."""
    return check_capture_layer_ids(ids, num_layers) if ids is not None else default_capture_layer_ids(num_layers)


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [b, s] int64
    position_ids: torch.Tensor  # [b, s] int64, restarting at 0 for every packed document
    document_ids: torch.Tensor  # [b, s] int32; attention never crosses documents


@dataclass
class StageCapture:
    """What this stage recorded for one micro-batch (tensors are [b, s, ...], batch first)."""

    layers: dict[int, torch.Tensor] = field(default_factory=dict)  # capture id -> [b, s, H]
    final_hidden: Optional[torch.Tensor] = None  # [b, s, H] on the last stage
    target_argmax: Optional[torch.Tensor] = None  # [b, s] int64 on the last stage
    logits: Optional[torch.Tensor] = None  # [b, s, V] only when asked (verification)


def attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool, True where attention is NOT allowed: causal and within one document."""
    s = document_ids.shape[1]
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()
    return ~(same_doc & causal)[:, None]


def read_draft_inputs(hf_dir: str, hf: dict, family, dtype: torch.dtype, draft_ids: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The token embedding [V, H] in ``dtype`` and the output-layer rows ``draft_ids`` [Vd, H] (fp32), read
    from the checkpoint in ``hf_dir`` by the family's key names (``TargetHost.draft_inputs``)."""
    reader = SafetensorsReader(hf_dir)
    try:
        embedding = reader.read(family.hf_key("embed")).to(dtype)
        head_key = family.lm_head_key(hf)
        rows = torch.stack([reader.read(head_key, rows=(i, i + 1))[0] for i in draft_ids.tolist()]).float()
    finally:
        reader.close()
    return embedding, rows


class StoredTarget:
    """The target when every row the run reads has its features in a complete feature store
    (``data.features``, docs/design.md §13): its config, capture layers, token embedding and output rows of
    the draft vocabulary (read from the checkpoint), and no model. The configured layout's process groups
    stay, so each rank reads the rows it would train on with the target loaded."""

    weights_note = None

    def __init__(self, hf_dir: str, layout: Layout, dtype: torch.dtype, capture_layer_ids: Optional[list[int]] = None):
        from megatron.core import parallel_state as ps

        from specforge_mcore.target.families import family_for

        self.hf_dir, self.layout, self.dtype = hf_dir, layout, dtype
        self.hf = read_hf_config(hf_dir)
        self.family = family_for(self.hf, f"{hf_dir}/config.json")
        self.num_layers = int(self.hf["num_hidden_layers"])
        self.capture_layer_ids = resolve_capture_layer_ids(capture_layer_ids, self.num_layers)
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()

    def draft_inputs(self, draft_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return read_draft_inputs(self.hf_dir, self.hf, self.family, self.dtype, draft_ids)

    def forward(self, micro_batches, want_logits: bool = False):
        raise UserError(f"the target {self.hf_dir} was not loaded (every row was in the feature store when the "
                        "run started), yet a round asked for its forward: a row without stored features")


class TargetHost:
    def __init__(self, hf_dir: str, layout: Layout, dtype: torch.dtype = torch.float32,
                 capture_layer_ids: Optional[list[int]] = None, teacher_impl: str = "auto", teacher_chunk_tokens: int = 1024,
                 fp8: str = "auto", quantize: str = "none"):
        from megatron.core import parallel_state as ps

        from specforge_mcore.target import fp8 as block_fp8

        self.hf_dir = hf_dir
        self.hf = read_hf_config(hf_dir)
        self.layout = layout
        self.dtype = dtype
        where = f"{hf_dir}/config.json"
        # FP8 checkpoints: dequantized at load or kept in FP8 (target/fp8/); see TargetConfig.fp8.
        self.fp8_mode = block_fp8.resolve_mode(fp8, block_fp8.checkpoint_format(self.hf, where), platform_device(), where)
        if quantize not in ("none", "fp8") or (quantize == "fp8" and self.fp8_mode is not None):
            raise UserError(f"target.quantize={quantize!r}: expected 'none', or 'fp8' for a full-precision checkpoint "
                            f"({hf_dir} is already FP8: its own scales are used, see target.fp8)")
        native = self.fp8_mode == "native"
        self.stage: StageModel = build_stage_model(self.hf, layout, dtype, where=where, native_fp8=native)
        self.reader: SafetensorsReader = load_stage_weights(self.stage, hf_dir, fp8_mode=self.fp8_mode)
        self.reader.close()
        if native and torch.cuda.is_available():
            self.stage.model.cuda()  # built and filled in host memory: only the FP8 weights travel
        self.weights_note = {"native": f"target weights: {block_fp8.describe_native(platform_device())}",
                             "dequantize": "target weights: FP8 checkpoint dequantized at load"}.get(self.fp8_mode)
        if quantize == "fp8":
            from specforge_mcore.target.modelopt import quantize_fp8

            self.weights_note = f"target weights: {quantize_fp8(self.stage.model)}"
        self.model = self.stage.model
        self.num_layers = int(self.hf["num_hidden_layers"])
        self.capture_layer_ids = resolve_capture_layer_ids(capture_layer_ids, self.num_layers)
        # Rotary angles the host passes to Megatron's attention (MLA computes its own from positions).
        self.rope = None if self.stage.position_rotary is not None else RopeTable(self.hf, self.model.config.kv_channels)
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.teacher_impl = teacher_impl
        self.teacher_chunk_tokens = teacher_chunk_tokens
        self._current: Optional[StageCapture] = None
        self._want_logits = False
        self._hooks = []
        for layer in self.model.decoder.layers:
            layer_id = layer.layer_number - 1
            if layer_id in self.capture_layer_ids:
                self._hooks.append(layer.register_forward_hook(self._capture_hook(layer_id)))

    # ---- what the draft reads from the target besides the features ---------------------------
    def draft_inputs(self, draft_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The token embedding ``[V, H]`` (in the target's dtype, as the target embeds) and the output-layer
        rows of the draft vocabulary ``[Vd, H]`` (fp32, as stored; they seed the draft head and form the
        teacher). Read from the checkpoint, so every rank has them whatever pipeline stage it holds; the
        caller casts them once, by the dtype policy."""
        return read_draft_inputs(self.hf_dir, self.hf, self.stage.family, self.dtype, draft_ids)

    # ---- stage facts --------------------------------------------------------------------------
    @property
    def is_first_stage(self) -> bool:
        return self.stage.pre_process

    @property
    def is_last_stage(self) -> bool:
        return self.stage.post_process

    def owner_stage(self, capture_id: int) -> int:
        """Pipeline stage that owns the output of layer ``capture_id``."""
        return stage_of_layer(capture_id, pipeline_split(self.num_layers, self.layout.pp))

    def output_weight_shard(self) -> tuple[torch.Tensor, int, int]:
        """(this TP rank's rows of the output layer, first global row, number of real rows)."""
        weight = self.model.shared_embedding_or_output_weight() if self.model.share_embeddings_and_output_weights \
            else self.model.output_layer.weight
        rows = weight.shape[0]
        start = self.tp_rank * rows
        real = max(0, min(rows, self.stage.vocab_size - start))
        return weight, start, real

    # ---- capture ------------------------------------------------------------------------------
    def _gather_sequence(self, hidden: torch.Tensor) -> torch.Tensor:
        """[s(/tp), b, H] -> [b, s, H]: undo sequence parallelism, batch first."""
        if self.model.config.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False,
                                                          group=self.tp_group)
        return hidden.transpose(0, 1).contiguous()

    def _capture_hook(self, layer_id: int):
        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self._current.layers[layer_id] = self._gather_sequence(hidden.detach())

        return hook

    def _teacher(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """Global argmax over the full vocabulary, vocab-parallel over TP."""
        from specforge_mcore.kernels.teacher import fused_teacher

        weight, start, real = self.output_weight_shard()
        b, s, h = final_hidden.shape
        # Its own range inside target_forward, so the profiler's phase table can show it apart.
        nvtx = torch.cuda.nvtx.range("teacher") if final_hidden.is_cuda else contextlib.nullcontext()
        with torch.profiler.record_function("teacher"), nvtx:
            argmax = fused_teacher(final_hidden.reshape(b * s, h), weight[:real], start,
                                   group=self.tp_group if self.layout.tp > 1 else None,
                                   impl=self.teacher_impl, chunk_tokens=self.teacher_chunk_tokens)
        return argmax.view(b, s)

    def _full_logits(self, final_hidden_sbh: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [b, s, V] (verification only: O(T·V) memory)."""
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        weight = self.model.shared_embedding_or_output_weight() if self.model.share_embeddings_and_output_weights else None
        logits, _ = self.model.output_layer(final_hidden_sbh, weight=weight)
        if self.layout.tp > 1:
            logits = gather_from_tensor_model_parallel_region(logits, group=self.tp_group)
        return logits.transpose(0, 1)[..., : self.stage.vocab_size].contiguous()

    # ---- forward ------------------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        batch, capture = next(data_iterator)
        self._current = capture
        device = next(model.parameters()).device
        position_ids = batch.position_ids.to(device)
        mask = attention_mask(batch.document_ids.to(device))
        if self.stage.position_rotary is not None:  # MLA rotates inside its attention
            self.stage.position_rotary.set_positions(position_ids)
            rotary = None
        else:
            rotary = self.rope.freqs(position_ids)  # [s, b, 1, d]
        hidden = None
        if model.pre_process:
            hidden = model.embedding(input_ids=batch.input_ids.to(device), position_ids=position_ids)
        output = model.decoder(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rotary)
        if model.post_process:
            capture.final_hidden = self._gather_sequence(output)
            capture.target_argmax = self._teacher(capture.final_hidden)
            if self._want_logits:
                capture.logits = self._full_logits(output)
            output = torch.zeros((), device=device)  # nothing else leaves the last stage

        def loss_func(output_tensor):
            return torch.zeros((), device=device), {}

        return output, loss_func

    @torch.no_grad()
    def forward(self, micro_batches: list[MicroBatch], want_logits: bool = False) -> list[StageCapture]:
        """Run all micro-batches through the pipeline; return what this stage captured for each."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if not micro_batches:
            return []
        b, s = micro_batches[0].input_ids.shape
        for mb in micro_batches:
            if tuple(mb.input_ids.shape) != (b, s):
                raise ValueError(f"micro-batches must share one shape, got {tuple(mb.input_ids.shape)} and {(b, s)}")
        if self.model.config.sequence_parallel and s % self.layout.tp:
            raise UserError(f"sequence length {s} must be divisible by tp={self.layout.tp} under sequence parallelism")
        captures = [StageCapture() for _ in micro_batches]
        self._want_logits = want_logits
        forward_backward = get_forward_backward_func()
        forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=iter(list(zip(micro_batches, captures))),
            model=[self.model],
            num_microbatches=len(micro_batches),
            seq_length=s,
            micro_batch_size=b,
            forward_only=True,
        )
        self._current = None
        return captures
