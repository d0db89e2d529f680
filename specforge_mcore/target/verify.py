"""``specforge-mcore verify-target``: load the target in a layout and compare it with HF transformers.

Spawns the ranks (gloo on CPU), runs the Megatron-hosted target over a few packed prompts through the
pipeline schedule, scatters the captured features to their draft shards, and compares, in fp32:

* logits (gathered on the last stage) with HF's logits,
* captured features (outputs of the capture layers and the final hidden state) with HF's hidden states,
* the vocab-parallel argmax with HF's argmax,
* the union of the draft shards with the full batch, in order.

HF runs every packed document on its own, so this also checks that attention never crosses documents
and that positions restart per document. An FP8 checkpoint is compared with HF on its dequantised weights
(exact), or with ``--reference-dir`` (its full-precision twin) within ``--tolerance``. The last line is ``max_scaled_diff logits=<x> features=<y>``;
the command exits 1 when either exceeds the tolerance (1e-4). Differences are scaled by the reference's
magnitude, ``max|ours - HF| / max(1, max|HF|)``: a real model's hidden states reach hundreds, where fp32
summation order alone moves the last digits by ~1e-4 absolute.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from specforge_mcore import collectives
from specforge_mcore.errors import UserError
from specforge_mcore.target.build import Layout, check_layout, read_hf_config
from specforge_mcore.target.families import family_for
from specforge_mcore.target.host import MicroBatch, default_capture_layer_ids

TOLERANCE = 1e-4
# A bf16 target against the fp32 HF reference: 8-bit mantissas through every layer. Differences are scaled
# by max(1, |HF|), so this bounds the error at ~6 bf16 ulps of the largest value; near-ties may flip the
# argmax, so up to ARGMAX_FLIPS of the positions may disagree there.
DTYPE_TOLERANCE = {"float32": TOLERANCE, "bfloat16": 5e-2}
ARGMAX_FLIPS = {"float32": 0.0, "bfloat16": 0.02}


@dataclass
class PackedInputs:
    """Micro-batches of packed documents, plus the documents themselves for the HF reference."""

    micro_batches: list[MicroBatch]
    documents: list[list[list[int]]]  # [sequence][document] -> token ids (padding excluded)


def pack_documents(documents: list[list[int]], seq_len: int, micro_batch_size: int, pad_id: int = 0,
                   rows_multiple_of: int = 1) -> PackedInputs:
    """Greedily pack documents into rows of ``seq_len`` (right padding is its own document); the row
    count is padded to a multiple of the micro-batch size and of ``rows_multiple_of``."""
    rows: list[list[list[int]]] = [[]]
    for doc in documents:
        if len(doc) > seq_len:
            raise UserError(f"a verification prompt of {len(doc)} tokens does not fit seq_len={seq_len}")
        if sum(map(len, rows[-1])) + len(doc) > seq_len:
            rows.append([])
        rows[-1].append(list(doc))
    multiple = micro_batch_size * rows_multiple_of // math.gcd(micro_batch_size, rows_multiple_of)
    while len(rows) % multiple:
        rows.append([[pad_id]])
    ids, pos, docs = [], [], []
    for row in rows:
        r_ids, r_pos, r_doc = [], [], []
        for d, doc in enumerate(row):
            r_ids += doc
            r_pos += list(range(len(doc)))
            r_doc += [d] * len(doc)
        pad = seq_len - len(r_ids)
        r_ids += [pad_id] * pad
        r_pos += list(range(pad))
        r_doc += [len(row)] * pad
        ids.append(r_ids), pos.append(r_pos), docs.append(r_doc)
    ids_t, pos_t, docs_t = torch.tensor(ids), torch.tensor(pos), torch.tensor(docs, dtype=torch.int32)
    micro = [MicroBatch(ids_t[i:i + micro_batch_size], pos_t[i:i + micro_batch_size], docs_t[i:i + micro_batch_size])
             for i in range(0, len(rows), micro_batch_size)]
    return PackedInputs(micro, rows)


def random_inputs(vocab_size: int, seed: int, num_sequences: int = 4, seq_len: int = 16,
                  micro_batch_size: int = 2) -> PackedInputs:
    """Rows of 1-3 random documents each (a length-1 document included), exactly filling seq_len."""
    gen = torch.Generator().manual_seed(seed)
    documents = []
    for row in range(num_sequences):
        lengths = [1, seq_len - 1] if row == 0 else [int(n) for n in torch.randint(4, seq_len - 4, (1,), generator=gen)]
        if row:
            lengths.append(seq_len - lengths[0])
        for n in lengths:
            documents.append(torch.randint(0, vocab_size, (n,), generator=gen).tolist())
    return pack_documents(documents, seq_len, micro_batch_size)


# ---- the ranks -------------------------------------------------------------------------------------


def layout_worker(rank: int, world: int, hf_dir: str, layouts: list[Layout], inputs_per_dp: list[PackedInputs],
                  capture_layer_ids: Optional[list[int]] = None, fp8: str | list[str] = "auto",
                  dtype: str = "float32") -> list[dict]:
    """Run every layout on this rank (spawned); return what this rank computed for each. ``fp8``: the
    target.fp8 mode, or one per layout."""
    from megatron.core import parallel_state as ps

    from specforge_mcore.parallel import init_distributed
    from specforge_mcore.target.build import init_model_parallel
    from specforge_mcore.target.fp8 import module_bytes
    from specforge_mcore.target.host import TargetHost
    from specforge_mcore.target.transport import row_shards, scatter_features

    init_distributed()
    results = []
    modes = [fp8] * len(layouts) if isinstance(fp8, str) else list(fp8)
    for layout, mode in zip(layouts, modes):
        init_model_parallel(layout)
        start = time.perf_counter()
        host = TargetHost(hf_dir, layout, getattr(torch, dtype), capture_layer_ids=capture_layer_ids, fp8=mode)
        load_seconds = time.perf_counter() - start
        dp = ps.get_data_parallel_rank()
        inputs = inputs_per_dp[dp % len(inputs_per_dp)]
        b, s = inputs.micro_batches[0].input_ids.shape
        start = time.perf_counter()
        captures = host.forward(inputs.micro_batches, want_logits=True)
        forward_seconds = time.perf_counter() - start
        shards = row_shards(host)
        shard = scatter_features(host, captures, b, s, shards)
        result = dict(
            layout=str(layout), rank=rank, dp=dp % len(inputs_per_dp), pp=host.pp_rank, tp=host.tp_rank,
            shard_index=shards.index, shard=shard, capture_layer_ids=host.capture_layer_ids,
            bytes_read=host.reader.bytes_read,
            param_bytes=module_bytes(host.model),  # FP8 weights kept natively are buffers
            load_seconds=load_seconds, forward_seconds=forward_seconds,
            tokens=sum(mb.input_ids.numel() for mb in inputs.micro_batches),
        )
        if host.tp_rank == 0:
            result["layers"] = {k: torch.cat([c.layers[k] for c in captures]) for k in captures[0].layers}
            if host.is_last_stage:
                result["logits"] = torch.cat([c.logits for c in captures])
                result["final_hidden"] = torch.cat([c.final_hidden for c in captures])
                result["target_argmax"] = torch.cat([c.target_argmax for c in captures])
        results.append(result)
        del host, captures
        collectives.barrier()
        ps.destroy_model_parallel()
    return results


# ---- the reference -------------------------------------------------------------------------------


def load_hf_model(hf_dir: str):
    import transformers

    from specforge_mcore.target.fp8 import read_checkpoint_format
    from specforge_mcore.target.fp8.reference import load_dequantized_hf_model

    if read_checkpoint_format(hf_dir) is not None:  # FP8: HF on the dequantised weights, the exact reference
        return load_dequantized_hf_model(hf_dir)
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def hf_reference(model, inputs: PackedInputs, capture_layer_ids: list[int]) -> dict[str, torch.Tensor]:
    """HF transformers on every document alone, laid back into the packed [N, s, ...] grid."""
    n_seq = len(inputs.documents)
    s = inputs.micro_batches[0].input_ids.shape[1]
    cfg = model.config
    out = {
        "logits": torch.zeros(n_seq, s, cfg.vocab_size),
        "final_hidden": torch.zeros(n_seq, s, cfg.hidden_size),
        "valid": torch.zeros(n_seq, s, dtype=torch.bool),
        **{f"layer{k}": torch.zeros(n_seq, s, cfg.hidden_size) for k in capture_layer_ids},
    }
    with torch.no_grad():
        for i, row in enumerate(inputs.documents):
            col = 0
            for doc in row:
                result = model(torch.tensor([doc]), output_hidden_states=True)
                n = len(doc)
                out["logits"][i, col:col + n] = result.logits[0]
                out["final_hidden"][i, col:col + n] = result.hidden_states[-1][0]
                for k in capture_layer_ids:
                    out[f"layer{k}"][i, col:col + n] = result.hidden_states[k + 1][0]
                out["valid"][i, col:col + n] = True
                col += n
    return out


@dataclass
class LayoutReport:
    layout: str
    logits: float = 0.0
    features: float = 0.0
    argmax_mismatches: int = 0
    shards_ok: bool = True
    bytes_read_max: int = 0
    param_bytes_max: int = 0
    load_seconds: float = 0.0
    forward_tokens_per_s: float = 0.0
    notes: list[str] = field(default_factory=list)


def scaled_diff(ours: torch.Tensor, reference: torch.Tensor, valid: torch.Tensor) -> float:
    """max |ours - reference| over the valid positions, relative to max(1, max |reference|)."""
    scale = max(1.0, reference.abs()[valid].max().item())
    return (ours - reference).abs()[valid].max().item() / scale


def compare(results: list[list[dict]], references: list[dict[str, torch.Tensor]], layouts: list[Layout],
            tolerance: float = TOLERANCE, argmax_flips: float = 0.0) -> list[LayoutReport]:
    reports = []
    for li, layout in enumerate(layouts):
        rows = [per_rank[li] for per_rank in results]
        report = LayoutReport(str(layout))
        report.bytes_read_max = max(r["bytes_read"] for r in rows)
        report.param_bytes_max = max(r["param_bytes"] for r in rows)
        report.load_seconds = max(r["load_seconds"] for r in rows)
        report.forward_tokens_per_s = rows[0]["tokens"] / max(r["forward_seconds"] for r in rows)
        shards_by_dp: dict[int, dict[int, object]] = {}
        for r in rows:
            ref = references[r["dp"]]
            valid = ref["valid"]
            if "logits" in r:
                report.logits = max(report.logits, scaled_diff(r["logits"], ref["logits"], valid))
                report.features = max(report.features, scaled_diff(r["final_hidden"], ref["final_hidden"], valid))
                report.argmax_mismatches += int((r["target_argmax"] != ref["logits"].argmax(-1))[valid].sum())
            for k, tensor in r.get("layers", {}).items():
                report.features = max(report.features, scaled_diff(tensor, ref[f"layer{k}"], valid))
            # One union per data-parallel group (several groups may share an input set).
            group, index = divmod(r["shard_index"], layout.tp * layout.pp)
            shards_by_dp.setdefault(group, {})[index] = r["shard"]
        # Union over the ranks of the draft shards == the full batch, in order.
        for dp, shards in shards_by_dp.items():
            ref = references[dp % len(references)]
            ordered = [shards[k] for k in sorted(shards)]
            ids = [r["capture_layer_ids"] for r in rows][0]
            full = {f"layer{k}": torch.cat([sh.aux_hidden[i] for sh in ordered]) for i, k in enumerate(ids)}
            full["final_hidden"] = torch.cat([sh.final_hidden for sh in ordered])
            argmax = torch.cat([sh.target_argmax for sh in ordered])
            valid = ref["valid"]
            for name, tensor in full.items():
                if tensor.shape != ref[name].shape or scaled_diff(tensor, ref[name], valid) > tolerance:
                    report.shards_ok = False
                    report.notes.append(f"dp{dp}: shard union of {name} differs from the batch")
            flips = (argmax != ref["logits"].argmax(-1))[valid].float().mean().item() if argmax.shape == valid.shape else 1.0
            if flips > argmax_flips:
                report.shards_ok = False
                report.notes.append(f"dp{dp}: shard union of target_argmax differs from HF at {flips:.1%} of positions")
        reports.append(report)
    return reports


def minimal_world(layout: Layout) -> int:
    expert_grid = layout.ep * layout.expert_tp
    return layout.pp * (layout.tp * expert_grid // math.gcd(layout.tp, expert_grid))


def run_layouts(hf_dir: str, layouts: list[Layout], nproc: int, inputs_per_dp: list[PackedInputs],
                capture_layer_ids: Optional[list[int]] = None, fp8: str | list[str] = "auto",
                dtype: str = "float32") -> list[list[dict]]:
    """Every layout on ``nproc`` spawned ranks: per rank, per layout, what ``layout_worker`` returns."""
    from specforge_mcore.parallel import spawn

    hf = read_hf_config(hf_dir)
    family = family_for(hf, f"{hf_dir}/config.json")
    for layout in layouts:
        check_layout(hf, family, layout, nproc, f"{hf_dir}/config.json")
    ids = capture_layer_ids or default_capture_layer_ids(hf["num_hidden_layers"])
    return spawn(layout_worker, nproc, hf_dir, layouts, inputs_per_dp, ids, fp8, dtype)


def run_verification(hf_dir: str, layouts: list[Layout], nproc: int, inputs_per_dp: list[PackedInputs],
                     capture_layer_ids: Optional[list[int]] = None, fp8: str | list[str] = "auto",
                     reference_dir: Optional[str] = None, tolerance: float = TOLERANCE,
                     dtype: str = "float32") -> list[LayoutReport]:
    """Run the layouts (target in ``dtype``) and compare with HF transformers in fp32 on ``reference_dir``
    (default: the checkpoint itself; an FP8 one through its dequantised weights)."""
    hf = read_hf_config(hf_dir)
    ids = capture_layer_ids or default_capture_layer_ids(hf["num_hidden_layers"])
    start = time.perf_counter()
    results = run_layouts(hf_dir, layouts, nproc, inputs_per_dp, ids, fp8, dtype)
    spawn_seconds = time.perf_counter() - start
    start = time.perf_counter()
    model = load_hf_model(reference_dir or hf_dir)
    references = [hf_reference(model, inputs, ids) for inputs in inputs_per_dp]
    if os.environ.get("SPECFORGE_MCORE_VERBOSE"):
        print(f"[verify] ranks {spawn_seconds:.1f}s, HF reference {time.perf_counter() - start:.1f}s")
    return compare(results, references, layouts, tolerance, ARGMAX_FLIPS[dtype])


def format_reports(reports: list[LayoutReport]) -> str:
    lines = [f"{'layout':<22}{'logits':>12}{'features':>12}{'argmax≠':>9}{'shards':>8}{'read MiB/rank':>15}"
             f"{'load s':>8}{'fwd tok/s':>11}"]
    for r in reports:
        lines.append(f"{r.layout:<22}{r.logits:>12.2e}{r.features:>12.2e}{r.argmax_mismatches:>9}"
                     f"{'ok' if r.shards_ok else 'BAD':>8}{r.bytes_read_max / 2**20:>15.1f}{r.load_seconds:>8.1f}"
                     f"{r.forward_tokens_per_s:>11.0f}")
        lines += [f"    {note}" for note in r.notes]
    return "\n".join(lines)


# ---- CLI -----------------------------------------------------------------------------------------

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about pipelines.",
    "Explain speculative decoding in one sentence.",
    "List three prime numbers.",
]


def prompt_inputs(hf_dir: str, vocab_size: int, seq_len: int, micro_batch_size: int,
                  rows_multiple_of: int = 1) -> PackedInputs:
    """The built-in prompts through the target's chat template, or random tokens without a tokenizer."""
    if not os.path.isfile(os.path.join(hf_dir, "tokenizer_config.json")):
        gen = torch.Generator().manual_seed(0)
        documents = [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in (9, 17, 5, 12)]
        return pack_documents(documents, seq_len, micro_batch_size, rows_multiple_of=rows_multiple_of)
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    documents = []
    for prompt in PROMPTS:
        if tokenizer.chat_template:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
        else:
            ids = tokenizer(prompt)["input_ids"]
        documents.append(list(ids))
    return pack_documents(documents, seq_len, micro_batch_size, pad_id=tokenizer.pad_token_id or 0,
                          rows_multiple_of=rows_multiple_of)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--etp", type=int, default=None, help="expert tensor parallel (default: tp)")
    parser.add_argument("--sp", action="store_true", help="sequence parallel (needs tp > 1)")
    parser.add_argument("--nproc", type=int, default=None, help="processes (default: the smallest world the layout needs)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--dispatcher", choices=["alltoall", "allgather"], default="alltoall")
    parser.add_argument("--capture-layer-ids", type=lambda t: [int(x) for x in t.split(",")], default=None)
    parser.add_argument("--fp8", choices=["auto", "dequantize", "native"], default="auto",
                        help="an FP8 checkpoint: dequantize at load, or keep FP8 weights (target.fp8)")
    parser.add_argument("--reference-dir", default=None,
                        help="compare with HF transformers on this checkpoint instead (e.g. the full-precision "
                             "twin of an FP8 one; then raise --tolerance to the quantization error)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_TOLERANCE), default="float32",
                        help="the target's dtype (target.dtype); the HF reference runs in fp32")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="max difference relative to max(1, max|HF|) (default: "
                             + ", ".join(f"{k} {v:g}" for k, v in DTYPE_TOLERANCE.items()) + ")")


def main(args: argparse.Namespace) -> int:
    if args.tolerance is None:
        args.tolerance = DTYPE_TOLERANCE[args.dtype]
    layout = Layout(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, sp=args.sp, dispatcher=args.dispatcher)
    nproc = args.nproc or minimal_world(layout)
    hf = read_hf_config(args.hf_dir)
    # Every rank of the model-parallel group trains the draft on its own shard of the sequences.
    inputs = prompt_inputs(args.hf_dir, int(hf["vocab_size"]), args.seq_len, args.micro_batch_size,
                           rows_multiple_of=layout.tp * layout.pp)
    print(f"verify-target: {args.hf_dir} [{family_for(hf).name}, {hf['num_hidden_layers']} layers] "
          f"layout {layout} on {nproc} process(es), {len(inputs.documents)} sequences of {args.seq_len} tokens, "
          f"target {args.dtype}")
    reports = run_verification(args.hf_dir, [layout], nproc, [inputs], args.capture_layer_ids, args.fp8,
                               args.reference_dir, args.tolerance, args.dtype)
    print(format_reports(reports))
    worst_logits = max(r.logits for r in reports)
    worst_features = max(r.features for r in reports)
    ok = worst_logits <= args.tolerance and worst_features <= args.tolerance and all(r.shards_ok for r in reports)
    print(f"max_scaled_diff logits={worst_logits:.3e} features={worst_features:.3e}")
    return 0 if ok else 1
