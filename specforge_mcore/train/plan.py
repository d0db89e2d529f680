"""``specforge-mcore plan --config configs/X.yaml [--gpus N] [--gpu-memory 80GiB]``: the memory one rank
needs, line by line, per pipeline stage (every rank of a stage needs the same), and whether it fits.

Everything is computed from the target's ``config.json`` (through its family's Megatron config, the
layout and ``pipeline_split``, as the trainer builds it) and the run config; nothing is allocated.

Held for the whole run:
* the target's weight shard: this stage's layers with attention/dense MLP split over TP, 1/EP of the
  experts split over expert-TP, the vocab-parallel embedding (first stage) and output layer (last
  stage), in ``target.dtype``; the routers' expert-bias buffers stay fp32 (Megatron keeps them so);
* the draft (replicated on every rank): fp32 weights + AdamW's two fp32 moments (12 B/param);
* what the draft reads: its copy of the target's token embedding (``target.dtype``), the teacher's
  output-layer rows for the draft vocabulary (fp32), d2t/t2d.

Then, during one step, the largest of four phases:
* target forward: the working set of one decoder layer for one micro-batch (forward only, no graph;
  unfused attention works on ``[b, heads/TP, s, s]`` scores, computed into a buffer Megatron keeps for the
  whole run, flash attention has none), two pipeline buffers when PP > 1, the captured features of
  every micro-batch of the round (kept until transport), or the teacher's vocab tile on the last stage;
* feature transport: those captures, their concatenation, and the shards received from other stages;
* draft: the features still held, the TTT unroll's saved activations (per token and step: about
  9H + 4I + 2·heads·head_dim + 2·head_dim floats, plus the diagonal keys/values of the earlier steps),
  the fused loss's ``[chunk, Vd]`` tiles, the gradients (fp32);
* optimizer: the gradients, their flattened copy for the all-reduce, AdamW's temporaries (one fp32
  copy of the parameters: the foreach implementation).
On a GPU a runtime reserve (CUDA context, NCCL buffers, allocator fragmentation) is added:
2 GiB + 10% of the tensors.

The draft's activation coefficients were measured on CPU (fp32) with the chunked loss and the csrc
attention; on GPU the matrix-product outputs are counted at 2 bytes (bf16 autocast) and the norm
inputs at 4. ``tests/train/test_plan.py`` checks the plan against measured peaks of tiny runs on CPU.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from specforge_mcore.config import RunConfig, load_config
from specforge_mcore.errors import UserError
from specforge_mcore.features.layout import StoreLayout
from specforge_mcore.target.fp8 import planned_weight_bytes
from specforge_mcore.target.sharding import ShardingRules, pipeline_split, stage_of_layer

# Bytes per element of the target's weights and activations (fp8 goes here when the host supports it).
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GiB = 2 ** 30
TEACHER_CHUNK_VOCAB = 8192  # kernels/teacher.py's default vocab tile


def parse_memory(text: str) -> int:
    """``80GiB``, ``80GB``, ``141G``, ``80`` (GiB) -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B?)\s*", str(text), re.IGNORECASE)
    if m is None:
        raise UserError(f"GPU memory {text!r}: expected a size such as 80GiB, 80GB or 141G")
    number, prefix, suffix = float(m.group(1)), m.group(2).upper() or "G", m.group(3).lower()
    power = "KMGT".index(prefix) + 1
    return int(number * (1000 ** power if suffix == "b" else 1024 ** power))


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# ----------------------------------------------------------------------------------------------
# Target weights
# ----------------------------------------------------------------------------------------------


def stage_weight_bytes(hf: dict, family, layout, dtype_bytes: int) -> list[int]:
    """Bytes of the target's parameters and buffers on one rank of each pipeline stage: the shards of
    ``target/sharding.py``, each in ``dtype_bytes`` (the router's expert bookkeeping in fp32)."""
    rules = ShardingRules(hf, family, layout)
    return [sum(s.numel * (4 if s.fp32 else dtype_bytes) for s in rules.stage_shards(stage))
            for stage in range(layout.pp)]


def draft_param_count(arch) -> int:
    """Trainable parameters of ``draft/model.py``'s Eagle3Draft (checked against the module in the tests)."""
    H, Ht, D = arch.hidden_size, arch.target_hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * D, arch.num_key_value_heads * D
    n = 3 * Ht * H + (3 * Ht if arch.per_layer_norm else 0)
    n += 2 * H * (q + 2 * kv) + q * H + 3 * H * arch.intermediate_size + 4 * H
    return n + arch.draft_vocab_size * H


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------


@dataclass
class Line:
    phase: str  # "held" or a step phase
    name: str
    per_stage: list[float]


@dataclass
class MemoryPlan:
    title: str
    geometry: str
    lines: list[Line] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    gpu_memory: int = 0
    stages: int = 1

    def add(self, phase: str, name: str, per_stage) -> None:
        values = list(per_stage) if isinstance(per_stage, (list, tuple)) else [per_stage] * self.stages
        self.lines.append(Line(phase, name, [float(v) for v in values]))

    def subtotal(self, phase: str) -> list[float]:
        return [sum(l.per_stage[s] for l in self.lines if l.phase == phase) for s in range(self.stages)]

    @property
    def phases(self) -> list[str]:
        return [p for p in dict.fromkeys(l.phase for l in self.lines) if p not in ("held", "reserve")]

    def peak_phase(self) -> list[str]:
        return [max(self.phases, key=lambda p: self.subtotal(p)[s]) for s in range(self.stages)]

    def totals(self) -> list[float]:
        held, reserve = self.subtotal("held"), self.subtotal("reserve")
        return [held[s] + max(self.subtotal(p)[s] for p in self.phases) + reserve[s] for s in range(self.stages)]

    @property
    def fits(self) -> bool:
        return not self.problems and max(self.totals()) <= self.gpu_memory

    def format(self) -> str:
        if not self.lines:  # the layout did not divide: there is nothing to size
            return "\n".join([self.title] + [f"PROBLEM: {p}" for p in self.problems] +
                             ["verdict: the layout does not work as configured (see PROBLEM lines)"])
        width = 15
        head = f"{'':<58}" + "".join(f"{'stage ' + str(s):>{width}}" for s in range(self.stages))
        lines = [self.title, self.geometry, head]
        for phase in ["held"] + self.phases + ["reserve"]:
            group = [l for l in self.lines if l.phase == phase]
            if not group:
                continue
            label = {"held": "held for the whole run", "reserve": "runtime reserve"}.get(phase, f"during {phase}")
            lines.append(label)
            for l in group:
                lines.append(f"  {l.name:<56}" + "".join(f"{fmt_bytes(v):>{width}}" for v in l.per_stage))
            if phase not in ("held", "reserve"):
                lines.append(f"  {'(phase total)':<56}" + "".join(f"{fmt_bytes(v):>{width}}" for v in self.subtotal(phase)))
        lines.append(f"{'peak phase':<58}" + "".join(f"{p:>{width}}" for p in self.peak_phase()))
        lines.append(f"{'TOTAL per rank':<58}" + "".join(f"{fmt_bytes(v):>{width}}" for v in self.totals()))
        lines.append(f"{'GPU memory':<58}" + "".join(f"{fmt_bytes(self.gpu_memory):>{width}}" for _ in range(self.stages)))
        lines += [f"note: {n}" for n in self.notes]
        if self.problems:
            lines += [f"PROBLEM: {p}" for p in self.problems]
            lines.append("verdict: the layout does not work as configured (see PROBLEM lines)")
        else:
            worst = max(self.totals())
            headroom = self.gpu_memory - worst
            verdict = "fits" if headroom >= 0 else "does NOT fit"
            lines.append(f"verdict: {verdict} (worst rank {fmt_bytes(worst)} of {fmt_bytes(self.gpu_memory)}, "
                         f"headroom {fmt_bytes(headroom)} = {headroom / self.gpu_memory:.0%})")
        return "\n".join(lines)


def resolve_hf_config(cfg: RunConfig, hf_config: Optional[str] = None) -> tuple[dict, str]:
    """The target's config.json: --hf-config, else target.hf_dir (when present), else plan.hf_config,
    else the generated random target."""
    from specforge_mcore.target.build import read_hf_config

    if hf_config is None and cfg.target.hf_dir and os.path.isdir(cfg.target.hf_dir):
        return read_hf_config(cfg.target.hf_dir), os.path.join(cfg.target.hf_dir, "config.json")
    path = hf_config or cfg.plan.hf_config
    if path:
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise UserError(f"plan: the target config {path} does not exist")
        return read_hf_config(os.path.dirname(path) or "."), path
    if cfg.target.random is not None:
        from specforge_mcore.target.random import random_target

        directory = random_target(cfg.target.random.family, cfg.target.random.hf_config, cfg.target.random.seed)
        return read_hf_config(directory), os.path.join(directory, "config.json")
    raise UserError(f"plan: no target config: target.hf_dir={cfg.target.hf_dir!r} is not on this machine; "
                    "set plan.hf_config in the run config or pass --hf-config PATH/config.json")


def plan_memory(cfg: RunConfig, world: int, gpu_memory: int, device: str = "cuda", hf: Optional[dict] = None,
                where: str = "config.json", target_attention: str = "auto") -> MemoryPlan:
    """The per-rank memory plan of ``cfg`` on ``world`` ranks (module doc). ``device`` picks the kernel
    paths ``auto`` resolves to (cuda: Triton; cpu: chunked) and the activation byte counts."""
    from specforge_mcore.draft.model import DraftArch
    from specforge_mcore.target.build import Layout, check_layout
    from specforge_mcore.target.families import family_for
    from specforge_mcore.target.host import resolve_capture_layer_ids
    from specforge_mcore.train.batching import BatchPlan

    if hf is None:
        hf, where = resolve_hf_config(cfg)
    tc_cfg = cfg.target
    layout = Layout(tp=tc_cfg.tp, pp=tc_cfg.pp, ep=tc_cfg.ep, etp=tc_cfg.etp, sp=tc_cfg.sp,
                    dispatcher=tc_cfg.moe_token_dispatcher)
    family = family_for(hf, where)
    arch_name = (hf.get("architectures") or [hf.get("model_type")])[0]
    plan = MemoryPlan(title=f"plan: {arch_name} ({hf['num_hidden_layers']} layers, hidden {hf['hidden_size']}, "
                            f"vocab {hf['vocab_size']}) from {where}; layout {layout} on {world} rank(s)",
                      geometry="", gpu_memory=gpu_memory, stages=layout.pp)
    try:
        family.check(hf, where)
    except UserError as exc:
        plan.problems.append(str(exc))
    try:
        check_layout(hf, family, layout, world, where)
    except UserError as exc:
        plan.problems.append(str(exc))
        return plan  # the shapes below need a layout that divides
    dp_groups = world // (layout.tp * layout.pp)
    batch = BatchPlan(cfg.train.global_batch_size, cfg.optim.grad_accum, dp_groups, tc_cfg.micro_batch_size,
                      layout.tp * layout.pp)
    try:
        batch.check("train")
    except UserError as exc:
        plan.problems.append(str(exc))
    split = pipeline_split(hf["num_hidden_layers"], layout.pp, where)
    if len(set(split)) > 1:
        plan.notes.append(f"uneven pipeline: the stages hold {split} layers")
    if hf["vocab_size"] % layout.tp:
        plan.notes.append(f"vocab_size={hf['vocab_size']} is padded to {-(-hf['vocab_size'] // layout.tp) * layout.tp} "
                          f"rows for TP={layout.tp}")

    tb = DTYPE_BYTES[tc_cfg.dtype]
    cuda = device == "cuda"
    act = 2 if cuda else 4  # draft matrix-product outputs (bf16 autocast on GPU)
    tc = family.transformer_config(hf)
    L, H, V = hf["num_hidden_layers"], tc["hidden_size"], int(hf["vocab_size"])
    capture = resolve_capture_layer_ids(tc_cfg.capture_layer_ids, L)
    arch = DraftArch.from_target(hf, cfg.draft, capture, cfg.draft.draft_vocab_size)
    Vd, P, S = arch.draft_vocab_size, draft_param_count(arch), cfg.draft.ttt_steps
    s, b = cfg.data.max_length, tc_cfg.micro_batch_size
    rows_round = max(1, batch.global_batch // batch.rounds)
    rows_group = max(1, rows_round // dp_groups)
    micro = max(1, rows_group // b)
    n = max(1, rows_group // (layout.tp * layout.pp))
    T = n * s
    plan.geometry = (f"batch: {batch.global_batch} sequences x {s} tokens per step in {batch.rounds} round(s); each of the "
                     f"{dp_groups} model-parallel group(s) runs {micro} micro-batch(es) of {b} per round; every rank "
                     f"trains the draft on {n} sequence(s) = {T} tokens, {S} TTT steps; draft {P / 1e6:.1f}M params")

    # ---- held ------------------------------------------------------------------------------------

    label, weights = planned_weight_bytes(tc_cfg, hf, family, layout, stage_weight_bytes(hf, family, layout, tb), tb,
                                          device)
    plan.add("held", label, weights)
    plan.add("held", "draft weights + AdamW moments (fp32, 12 B/param)", 12 * P)
    plan.add("held", "draft inputs: embedding copy, teacher rows, d2t/t2d", V * H * tb + Vd * H * 4 + 8 * Vd + V)

    # ---- target forward ----------------------------------------------------------------------------
    t = b * s
    heads, groups = tc["num_attention_heads"], tc["num_query_groups"]
    if tc.get("multi_latent_attention"):
        q_dim = k_dim = heads * (tc["qk_head_dim"] + tc["qk_pos_emb_head_dim"])
        v_dim = heads * tc["v_head_dim"]
        latent = (tc.get("q_lora_rank") or 0) + tc["kv_lora_rank"] + tc["qk_pos_emb_head_dim"]
    else:
        q_dim, k_dim, v_dim, latent = heads * tc["kv_channels"], groups * tc["kv_channels"], groups * tc["kv_channels"], 0
    flash = {"auto": cuda, "flash": True, "unfused": False}[target_attention]
    # q, k, v; the rotated q and k; the attention output; the projection's output
    attention = t * ((3 * q_dim + 2 * k_dim + v_dim + latent) // layout.tp + H) * tb
    if not flash:
        # Megatron's local attention computes its scores into a global buffer that stays allocated.
        plan.add("held", "Megatron's buffer for the scores of unfused attention", b * (heads // layout.tp) * s * s * tb)
        # 8 bytes per score either way: fp32 scores and probabilities, or bf16 scores, fp32 softmax, bf16
        # probabilities; plus the host's [b, 1, s, s] bool mask
        attention += b * (heads // layout.tp) * s * s * 8 + b * s * s
    gated = 2 if tc.get("gated_linear_unit") else 1
    mlp = t * (gated + 1) * tc.get("ffn_hidden_size", 0) // layout.tp * tb
    if family.is_moe:
        k, mf, E = tc["moe_router_topk"], tc["moe_ffn_hidden_size"], tc["num_moe_experts"]
        # router scores (fp32), permuted tokens (sent and received), expert up/act/down, unpermuted output
        moe = 4 * t * E * 4 + t * k * (3 * H + (gated + 1) * mf // layout.expert_tp) * tb + t * H * tb
        mlp = max(mlp, moe)
    in_flight = (3 + (2 if layout.pp > 1 else 0)) * t * H * tb  # residual, norm output, layer output; P2P buffers
    owned = [sum(1 for c in capture if stage_of_layer(c, split) == st) for st in range(layout.pp)]
    last = layout.pp - 1
    features = [rows_group * s * H * tb * (owned[st] + (1 if st == last else 0)) + (rows_group * s * 8 if st == last else 0)
                for st in range(layout.pp)]
    plan.add("target forward", f"captured features of all {micro} micro-batch(es), kept until transport", features)
    # The teacher runs after the last layer: its tile and a layer's working set never coexist.
    teacher_tile = 0 if cuda and cfg.kernels.teacher == "auto" else \
        min(cfg.kernels.teacher_chunk_tokens, t) * min(TEACHER_CHUNK_VOCAB, -(-V // layout.tp)) * 4
    layer_set = in_flight + max(attention, mlp)
    plan.add("target forward", "one layer's working set for the micro-batch in flight" + ("" if flash else
             " (unfused attention)") + ", or the teacher's vocab tile on the last stage",
             [max(layer_set, teacher_tile + t * 16 if st == last else 0) for st in range(layout.pp)])

    # ---- transport ---------------------------------------------------------------------------------
    shard = n * s * H * tb
    received = [shard * (4 - owned[st] - (1 if st == last else 0)) + (0 if st == last else n * s * 8)
                for st in range(layout.pp)]
    plan.add("feature transport", "captured features", features)
    plan.add("feature transport", "their concatenation (sent from and sliced)", features)
    plan.add("feature transport", "shards received from other stages", received)

    # ---- draft -------------------------------------------------------------------------------------
    plan.add("draft", "features held: concatenated captures + received shards",
             [f + r for f, r in zip(features, received)])
    q, kv, I, D = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim, \
        arch.intermediate_size, arch.head_dim
    per_step = 9 * H * 4 + (4 * I + 2 * q) * act + (2 * D + arch.num_attention_heads + 6) * 4
    saved = T * (S * per_step + S * (S - 1) * kv * act + H * 4) + T * (8 + 8 + 4 + 1 + S)
    plan.add("draft", f"TTT activations saved for backward ({S} steps)", saved)
    reference_attention = cfg.draft.attention_backend == "reference"
    attn = arch.num_attention_heads * T * (T + S) * 4 * 3 if reference_attention else T * (2 * q + 2 * kv) * 4
    plan.add("draft", "TTT attention working set" + (" (reference: O(T^2))" if reference_attention else " (O(T*d))"), attn)
    chunk = min(cfg.kernels.loss_chunk_tokens, T)
    loss_impl_reference = cfg.kernels.loss == "reference"
    # Two fp32 [chunk, Vd] tiles (the draft's logits and the teacher's), counting every position as
    # supervised: an upper bound, as only positions inside the position mask are computed.
    loss = (3 * T * Vd * 4 if loss_impl_reference else 2 * chunk * Vd * 4) + 2 * T * max(I, 2 * H) * act
    plan.add("draft", "fused loss working set" + (" (reference: full logits)" if loss_impl_reference else
                                                  f" ([{chunk}, {Vd}] tiles)"), loss)
    plan.add("draft", "gradients (fp32)", 4 * P)

    # ---- optimizer ---------------------------------------------------------------------------------
    plan.add("optimizer", "gradients, flattened copy for the all-reduce, AdamW temporaries (fp32)", 12 * P)

    store = StoreLayout(H, len(capture), 2)
    per_sample = s * store.bytes_per_token
    plan.notes.append(
        f"offline feature store (bf16): {store.bytes_per_token / 1024:.1f} KiB/token, "
        f"{fmt_bytes(per_sample)} per {s}-token row, {fmt_bytes(65536 * store.bytes_per_token)} per 64K tokens; "
        f"keeping draft-vocabulary logits instead: x{store.logits_store_bytes_per_token(Vd) / store.bytes_per_token:.1f}, "
        f"full-vocabulary logits: x{store.logits_store_bytes_per_token(V) / store.bytes_per_token:.1f}")

    if cuda:
        tensors = [h + max(plan.subtotal(p)[st] for p in plan.phases) for st, h in enumerate(plan.subtotal("held"))]
        plan.add("reserve", "CUDA context, NCCL, allocator fragmentation (2 GiB + 10%)", [2 * GiB + 0.1 * x for x in tensors])
    return plan


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def store_size_note(cfg, hf: dict) -> str:
    """The offline feature store of this recipe's own data (training rows plus held-out rows, whole rows of
    ``data.max_length`` as stored), when its data cache is prepared."""
    from specforge_mcore.data.prepare import prepared_stats
    from specforge_mcore.features.layout import StoreLayout
    from specforge_mcore.target.host import resolve_capture_layer_ids

    stats = prepared_stats(cfg)
    if stats is None:
        return ("offline feature store of this recipe's data: run `specforge-mcore prepare-data` with this config "
                "first (the size depends on how many packed rows the data makes)")
    layers = int(hf["num_hidden_layers"])
    capture = resolve_capture_layer_ids(cfg.target.capture_layer_ids, layers)
    store = StoreLayout(int(hf["hidden_size"]), len(capture), 2)
    train, held = stats
    per_row = train["max_length"] * store.bytes_per_token
    return (f"offline feature store of this recipe's data (bf16): {train['rows']} training rows + {held['rows']} held-out "
            f"rows of {train['max_length']} tokens = {fmt_bytes(train['rows'] * per_row)} + "
            f"{fmt_bytes(held['rows'] * per_row)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config (YAML), e.g. configs/qwen3-235b-a22b.yaml")
    parser.add_argument("--gpus", type=int, default=None, help="world size (default: plan.nodes x plan.gpus_per_node)")
    parser.add_argument("--gpu-memory", default=None, help="memory per GPU, e.g. 80GiB (default: plan.gpu_memory)")
    parser.add_argument("--hf-config", default=None, help="the target's config.json (default: target.hf_dir, then plan.hf_config)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="plan for GPUs (Triton kernels, bf16 draft activations) or for CPU processes")
    parser.add_argument("--target-attention", choices=["auto", "flash", "unfused"], default="auto",
                        help="the target's attention: flash (Transformer Engine; auto on cuda) keeps no [s, s] scores")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. target.pp=4 data.max_length=8192")


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    world = args.gpus or cfg.plan.nodes * cfg.plan.gpus_per_node
    memory = parse_memory(args.gpu_memory or cfg.plan.gpu_memory)
    hf, where = resolve_hf_config(cfg, args.hf_config)
    plan = plan_memory(cfg, world, memory, device=args.device, hf=hf, where=where, target_attention=args.target_attention)
    plan.notes.append(store_size_note(cfg, hf))
    print(plan.format())
    return 0 if plan.fits else 1
