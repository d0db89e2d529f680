"""A recipe's scaled-down twin: the same model family, dtypes, draft settings and parallel layout (scaled
to at most 8 processes), on a tiny random target that trains in seconds on CPU ranks.

``scaled_twin("configs/qwen3-235b-a22b.yaml")`` returns ``(config_tree, world_size, description)``; the
tree is a complete run config (``config_from_dict`` accepts it) for ``specforge_mcore.parallel.spawn(
train_worker, world_size, tree, out_dir)``. What is kept and what is scaled:

* **target**: a ``target.random`` model of the real config's family (an FP8 checkpoint's twin is the bf16
  model of its family), at the family's small defaults of ``target/random.py`` with the SmolLM2
  tokenizer's vocabulary (49152) and enough layers for the layout's pipeline and the capture layers.
  The real config's structural switches that those defaults expose are copied (tied embeddings, top-k
  renormalisation, sparse-step / dense-layer lists, dense first layers, shared experts, a q latent);
  the expert count stays the family default rounded up to a multiple of the scaled EP. ``target.dtype``,
  ``fp8``, ``quantize``, the dispatcher and the micro-batch size are the recipe's.
* **layout**: every parallel dimension the recipe uses stays > 1 but at most 2 (TP, EP, PP); SP and an
  explicit expert-TP are kept (capped at 2 as well). The world is the smallest
  one the layout allows, at least 2 so that data parallelism is exercised.
* **draft**: TTT steps, decay, attention backend, per-layer norm, dtype are the recipe's; sizes the recipe
  sets are scaled to the twin's target (heads over its hidden size, GQA kept as GQA), and the draft
  vocabulary is capped at 8192. ``draft.dtype`` becomes bfloat16 when the target is bf16 (the GPU policy
  run on CPU).
* **kernels, optim**: the recipe's, grad accumulation included.
* **data/train**: the tiny chat corpus, 128-token rows, the smallest global batch that splits evenly,
  two steps, a checkpoint at step 2, no eval, no plot.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

from specforge_mcore.config import config_to_dict, load_config
from specforge_mcore.errors import UserError

TOKENIZER_DIR = ".cache/targets/smollm2"
TOKENIZER_VOCAB = 49152  # the SmolLM2 tokenizer's
CORPUS = "tests/data/corpus/tiny_chat.jsonl"
MAX_PROCESSES = 8
MAX_LENGTH = 128
DRAFT_VOCAB_CAP = 8192

# HF model_type -> the random family of the same architecture (target/random.py).
RANDOM_FAMILIES = {"llama": "llama", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe", "mixtral": "mixtral",
                   "deepseek_v3": "deepseek_v3", "gpt_oss": "gpt_oss"}
# The key that counts the routed experts, per family.
EXPERT_KEYS = {"qwen3_moe": "num_experts", "mixtral": "num_local_experts", "gpt_oss": "num_local_experts",
               "deepseek_v3": "n_routed_experts"}
DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _read_target_config(cfg, recipe_path: str) -> tuple[Optional[dict], str]:
    """The real target's config.json (target.hf_dir, else plan.hf_config); None for a random target."""
    from specforge_mcore.fileio import read_json

    candidates = []
    if cfg.target.hf_dir and os.path.isfile(os.path.join(cfg.target.hf_dir, "config.json")):
        candidates.append(os.path.join(cfg.target.hf_dir, "config.json"))
    if cfg.plan.hf_config:
        path = cfg.plan.hf_config
        candidates.append(os.path.join(path, "config.json") if os.path.isdir(path) else path)
    for path in candidates:
        if os.path.isfile(path):
            hf = read_json(path, f"{path}: no target config")
            if "text_config" in hf and "num_hidden_layers" not in hf:
                hf = dict(hf["text_config"], architectures=hf.get("architectures"))
            return hf, path
    if cfg.target.random is not None:
        return None, "target.random"
    raise UserError(f"{recipe_path}: no target config to build a twin from: target.hf_dir has no config.json "
                    "and plan.hf_config is unset or missing")


def _scaled_layout(tc) -> dict:
    tp, pp, ep = min(tc.tp, 2), min(tc.pp, 2), min(tc.ep, 2)
    layout: dict[str, Any] = dict(tp=tp, pp=pp, ep=ep, sp=bool(tc.sp) and tp > 1)
    if tc.etp is not None:
        layout["etp"] = min(tc.etp, 2)
    return layout


def _smallest_world(layout: dict) -> int:
    """The smallest world the layout divides (build.check_layout's rules), at least 2 (data parallelism)."""
    tp, pp, ep = layout["tp"], layout["pp"], layout["ep"]
    etp = layout.get("etp") if layout.get("etp") is not None else tp
    for world in range(2, MAX_PROCESSES + 1):
        if world % (tp * pp) == 0 and (world // pp) % (ep * etp) == 0:
            return world
    raise UserError(f"no world of at most {MAX_PROCESSES} processes fits the scaled layout {layout}")


def _twin_layers(capture_layer_ids, pp: int) -> int:
    """The fewest layers that hold the capture layers (the default [1, L//2-1, L-4] needs 7 to be distinct)
    and give every pipeline stage at least two."""
    from specforge_mcore.target.host import default_capture_layer_ids

    for layers in range(2 * pp, 64):
        if capture_layer_ids:
            if max(capture_layer_ids) < layers - 1:
                return layers
            continue
        try:
            default_capture_layer_ids(layers)
            return layers
        except UserError:
            continue
    raise UserError(f"no twin depth fits capture layers {capture_layer_ids}")


def _twin_hf_config(family: str, real: dict, layers: int, pp: int, ep: int) -> dict:
    """Overrides of the family's random defaults: the tokenizer's vocab, the layer count, the real config's
    structural switches that the defaults expose, an EP-divisible expert count."""
    from specforge_mcore.target.random import DEFAULTS
    from specforge_mcore.target.sharding import pipeline_split

    defaults = DEFAULTS[family][1]
    hf: dict[str, Any] = dict(vocab_size=TOKENIZER_VOCAB, num_hidden_layers=layers)
    if "tie_word_embeddings" in real:
        hf["tie_word_embeddings"] = bool(real["tie_word_embeddings"])
    if family == "qwen3_moe":
        for key in ("norm_topk_prob", "decoder_sparse_step"):
            if key in real:
                hf[key] = real[key]
        # Dense layers of the real model, kept when they fall inside the twin (none in the shipped recipes).
        hf["mlp_only_layers"] = [i for i in real.get("mlp_only_layers") or [] if i < layers]
    if family == "deepseek_v3":
        # Dense first layers: as many as the real model, leaving MoE layers in every stage of a PP2 split.
        first_stage = pipeline_split(layers, pp)[0]
        hf["first_k_dense_replace"] = min(int(real.get("first_k_dense_replace") or 0), first_stage - 1)
        hf["n_shared_experts"] = int(real.get("n_shared_experts") or 0) or None
        if not real.get("q_lora_rank"):
            hf["q_lora_rank"] = None
        if "norm_topk_prob" in real:
            hf["norm_topk_prob"] = real["norm_topk_prob"]
    key = EXPERT_KEYS.get(family)
    if key:
        experts = int(defaults[key])
        experts = -(-max(experts, 2 * ep) // ep) * ep
        if experts != defaults[key]:
            hf[key] = experts
    return {k: v for k, v in hf.items() if k not in defaults or defaults[k] != v}


def _scaled_draft(draft: dict, family: str, twin_hf: dict) -> dict:
    from specforge_mcore.target.random import DEFAULTS

    target = dict(DEFAULTS[family][1], **twin_hf)
    out = dict(draft)
    heads = int(target["num_attention_heads"])
    head_dim = int(target.get("head_dim") or target["hidden_size"] // heads)
    if draft.get("hidden_size") is not None:
        out["hidden_size"] = target["hidden_size"]
    if draft.get("head_dim") is not None:
        out["head_dim"] = head_dim
    if draft.get("num_attention_heads") is not None:
        out["num_attention_heads"] = target["hidden_size"] // head_dim
    if draft.get("num_key_value_heads") is not None:  # grouped-query attention stays grouped
        n = out.get("num_attention_heads") or heads
        grouped = draft["num_key_value_heads"] < (draft.get("num_attention_heads") or heads + 1)
        out["num_key_value_heads"] = max(1, n // 2) if grouped else n
    if draft.get("intermediate_size") is not None:
        out["intermediate_size"] = target["intermediate_size"]
    out["draft_vocab_size"] = min(int(draft["draft_vocab_size"]), DRAFT_VOCAB_CAP)
    return out


def scaled_twin(recipe_path: str) -> tuple[dict, int, str]:
    """``(config_tree, world_size, description)`` of the recipe's scaled-down twin (module doc)."""
    from specforge_mcore.target.random import DEFAULTS
    from specforge_mcore.train.batching import BatchPlan

    cfg = load_config(recipe_path)
    tree = config_to_dict(cfg)
    name = cfg.name
    real, source = _read_target_config(cfg, recipe_path)
    fp8_note = ""
    if real is None:  # already a random target (a CPU config): keep its family and sizes
        family = cfg.target.random.family
        real = dict(DEFAULTS[family][1], **cfg.target.random.hf_config)
    else:
        model_type = real.get("model_type")
        if model_type not in RANDOM_FAMILIES:
            from specforge_mcore.target.families import family_for

            model_type = family_for(real, source).name
        if model_type not in RANDOM_FAMILIES:
            raise UserError(f"{source}: no random family generates a twin of model_type {model_type!r}")
        family = RANDOM_FAMILIES[model_type]
        quant = real.get("quantization_config") or {}
        if quant:
            fp8_note = (f" (the real checkpoint is {quant.get('quant_method', 'quantized')} "
                        f"{quant.get('fmt', '')}; the twin is the bf16 {family} model, target.fp8={cfg.target.fp8} "
                        "has no FP8 weights to act on)").replace(" ;", ";")

    layout = _scaled_layout(cfg.target)
    world = _smallest_world(layout)
    layers = _twin_layers(cfg.target.capture_layer_ids, layout["pp"])
    hf = _twin_hf_config(family, real, layers, layout["pp"], layout["ep"])

    target = tree["target"]
    seed = cfg.target.random.seed if cfg.target.random else 1234
    target.update(hf_dir=None, tokenizer_dir=TOKENIZER_DIR, random=dict(family=family, hf_config=hf, seed=seed),
                  etp=None)
    target.update(layout)
    if fp8_note and cfg.target.fp8 == "native":
        target["fp8"] = "auto"  # native asks for an FP8 checkpoint; the twin's is bf16 (auto: nothing to do)

    draft = _scaled_draft(tree["draft"], family, hf)
    if cfg.target.dtype == "bfloat16" and draft["dtype"] == "auto":
        draft["dtype"] = "bfloat16"  # the GPU policy (auto resolves to bf16 on CUDA) run on CPU
    draft["init_from"] = None
    tree["draft"] = draft

    data = tree["data"]
    data.update(train_files=[CORPUS], eval_files=[], eval_fraction=0.0, max_samples=None, max_length=MAX_LENGTH,
                pack=True, vocab_file=None, num_workers=0)

    dp = world // (layout["tp"] * layout["pp"])
    shards = layout["tp"] * layout["pp"]
    # The smallest global batch that splits evenly (BatchPlan.check): one row per shard and micro-batch.
    global_batch = cfg.optim.grad_accum * dp * math.lcm(cfg.target.micro_batch_size, shards)
    BatchPlan(global_batch, cfg.optim.grad_accum, dp, cfg.target.micro_batch_size, shards).check(
        f"twin of {recipe_path}")

    train = tree["train"]
    train.update(out_dir=os.path.join("runs", f"twin-{name}"), global_batch_size=global_batch, max_steps=2,
                 exit_after_step=None, log_every=1, eval_every=0, save_every=2, resume=False, plot=False,
                 profile=False, tensorboard=False)
    tree["plan"] = dict(hf_config=None, nodes=1, gpus_per_node=world, gpu_memory=cfg.plan.gpu_memory)
    tree["name"] = f"{name}-twin"

    parts = [f"TP{layout['tp']}" + ("+SP" if layout["sp"] else "")]
    if layout["ep"] > 1:
        parts.append(f"EP{layout['ep']}")
    if "etp" in layout:
        parts.append(f"ETP{layout['etp']}")
    if layout["pp"] > 1:
        parts.append(f"PP{layout['pp']}")
    policy = draft["dtype"] if draft["dtype"] != "auto" else "float32"  # auto is fp32 on the CPU ranks
    description = (f"{name}: {family} twin{fp8_note}, {' '.join(parts)} on {world} gloo ranks (DP{dp}), "
                   f"target {DTYPE_NAMES[cfg.target.dtype]}, draft compute {DTYPE_NAMES[policy]}")
    return tree, world, description
