"""Block-FP8 targets: the block math, scales that follow the weights under every slicing, parity at
TP2×EP2 and PP2 in both execution modes, the planner's bytes, ModelOpt's on-the-fly FP8.

The tolerance against the full-precision model is the quantisation error itself:

* weight by weight, rounding to e4m3 (3 mantissa bits) moves a value by at most half a unit in the last
  place: 2^-4 of its magnitude, or 2^-10 of its block's scale for the few subnormals
  (``test_rounding_error_is_half_an_e4m3_ulp``);
* through the model, those roundings give the logits and features a relative error of the order of the
  format's precision (4-6% in this eight-layer random model, growing with depth), and exactly the same
  error in any correct implementation running the same FP8 weights. So, element by element, the hosted
  FP8 target may differ from the full-precision model by no more than HF transformers on the same FP8
  weights does, plus the 1e-5 of ordinary parity; and as a sanity bound that catches a broken
  quantisation shared by both, the relative (Frobenius) error must stay below one e4m3 unit, 2^-3.

That the hosted FP8 target matches HF on the dequantised weights to 1e-5 is what shows that every scale
is applied to its own block: a scale applied to another block changes its weights by the ratio of the
two blocks' maxima, an error orders of magnitude above 1e-5.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from specforge_mcore.errors import UserError
from specforge_mcore.target import fp8
from specforge_mcore.target.build import Layout, read_hf_config
from specforge_mcore.target.families import family_for
from specforge_mcore.target.fp8 import expand_scales, quantize_blocks, scale_key
from specforge_mcore.target.fp8 import reads as fp8_reads
from specforge_mcore.target.fp8.reference import write_dequantized_checkpoint
from specforge_mcore.target.load import SafetensorsReader, assemble
from specforge_mcore.target.random import random_target
from specforge_mcore.target.sharding import Coords, ShardingRules

BLOCK = (16, 16)  # the tiny target's matrices are 16-128 wide; 128x128 blocks would cover them whole
E4M3_ULP = 2.0 ** -3  # one unit in the last place, relative to the binade


# ---- block-FP8 checkpoints written from a full-precision tiny model, as the releases lay them out --------


def default_quantized(key: str, shape: list[int]) -> bool:
    """The tensors the official FP8 releases quantize: 2-D weights inside decoder layers, except routers."""
    if len(shape) != 2 or not key.endswith(".weight") or ".layers." not in key:
        return False
    return not key.endswith(("mlp.gate.weight", "mlp.router.weight", "block_sparse_moe.gate.weight"))


def write_fp8_checkpoint(src_dir: str, out_dir: str, block: tuple[int, int] = (128, 128)) -> str:
    """Write ``src_dir`` (full precision) as a block-FP8 checkpoint at ``out_dir``; other files are copied."""
    reader = SafetensorsReader(src_dir)
    if reader.fmt is not None:
        raise UserError(f"{src_dir} is already an FP8 checkpoint")
    os.makedirs(out_dir, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for key in sorted(reader.key_to_file):
        with safe_open(reader.key_to_file[key], framework="pt") as handle:
            tensor = handle.get_tensor(key)
        if default_quantized(key, list(tensor.shape)):
            tensors[key], tensors[scale_key(key)] = quantize_blocks(tensor, block)
        else:
            tensors[key] = tensor.contiguous()
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(src_dir):
        if name.endswith(".safetensors") or name == "model.safetensors.index.json":
            continue
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copy(os.path.join(src_dir, name), os.path.join(out_dir, name))
    with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as fh:
        hf = json.load(fh)
    hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                 "weight_block_size": list(block)}
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(hf, fh, indent=2)
    return out_dir


def e4m3_rounding_bound(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The largest error rounding ``weight`` to e4m3 in its block may make, per element: half a unit in the last
    place, 2^-4 of the magnitude for normal values (3 mantissa bits), 2^-10 of the block scale for subnormals."""
    rows, cols = weight.shape
    scale = expand_scales(scale_inv, block, (0, rows), (0, cols))
    return torch.maximum(weight.float().abs() * 2.0 ** -4, scale * 2.0 ** -10)


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    """(full-precision tiny Qwen3-MoE, its block-FP8 copy, that copy dequantised to fp32)."""
    full = random_target("qwen3_moe")
    root = tmp_path_factory.mktemp("fp8")
    quantized = write_fp8_checkpoint(full, str(root / "fp8"), BLOCK)
    return full, quantized, write_dequantized_checkpoint(quantized, str(root / "dequantized"))


# ---- block math ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,block", [((40, 24), (16, 8)), ((128, 64), (128, 128)), ((7, 300), (4, 128))])
def test_rounding_error_is_half_an_e4m3_ulp(shape, block):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen) * torch.logspace(-3, 1, shape[1])  # blocks of very different scale
    q, scale_inv = fp8.quantize_blocks(weight, block)
    assert q.dtype == torch.float8_e4m3fn
    assert list(scale_inv.shape) == [-(-shape[0] // block[0]), -(-shape[1] // block[1])]  # partial blocks count
    restored = fp8.dequantize_blocks(q, scale_inv, block)
    bound = e4m3_rounding_bound(weight, scale_inv, block)
    assert bool(((restored - weight).abs() <= bound * (1 + 1e-5) + 1e-12).all())
    assert float((restored - weight).abs().max()) > 0  # it is lossy: the bound is what is being tested
    # Every block's largest magnitude lands on the top of the e4m3 range.
    top = q.float().abs().view(-1).max()
    assert float(top) == fp8.E4M3_MAX


def test_reader_dequantizes_any_slice_exactly(moe_dirs):
    """Rows/columns cut anywhere, block boundaries or not: each element gets its own block's scale."""
    _, quantized, dequantized = moe_dirs
    fp8_reader, plain = SafetensorsReader(quantized), SafetensorsReader(dequantized)
    key = "model.layers.2.self_attn.q_proj.weight"  # [64, 64] in 16x16 blocks
    assert fp8_reader.has(fp8.scale_key(key)) and fp8_reader.read_raw(key).dtype == torch.float8_e4m3fn
    for rows in [(0, 64), (5, 37), (16, 32), (63, 64)]:
        for cols in [None, (3, 29), (48, 64)]:
            assert torch.equal(fp8_reader.read(key, rows=rows, cols=cols), plain.read(key, rows=rows, cols=cols))
    # Unquantized tensors (norms, router, embedding) come through unchanged.
    for key in ["model.embed_tokens.weight", "model.layers.0.mlp.gate.weight", "model.norm.weight"]:
        assert not fp8_reader.has(fp8.scale_key(key))
        assert torch.equal(fp8_reader.read(key), plain.read(key))


# ---- the scales follow the weights under every slicing ----------------------------------------


def _block_ids(piece, number: int) -> torch.Tensor:
    """Each element of ``piece`` labelled with the checkpoint block it comes from (``number``: the tensor)."""
    br, bc = BLOCK
    (r0, r1), (c0, c1) = piece.row_span, piece.col_span
    rows, cols = torch.arange(r0, r1) // br, torch.arange(c0, c1) // bc
    return (number << 40) + rows[:, None] * -(-piece.matrix[1] // bc) + cols[None, :]


def _tiles_whole(ids: torch.Tensor) -> bool:
    """Does every BLOCK-sized tile of a rank's tensor come from one checkpoint block?"""
    br, bc = BLOCK
    corner = ids[::br, ::bc]
    rows, cols = ids.shape
    return torch.equal(corner.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols], ids)


LAYOUTS = [Layout(), Layout(tp=2), Layout(ep=2), Layout(tp=2, ep=2), Layout(tp=2, ep=2, etp=1), Layout(ep=4),
           Layout(tp=2, ep=4, etp=1), Layout(tp=2, etp=2), Layout(ep=1, etp=4, tp=2)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_scales_follow_the_weights_under_every_slicing(moe_dirs, layout):
    """Every rank of the layout, every linear shard of layer 1 (plus the embedding): dequantized reads equal
    the same shard of the dequantised checkpoint; the native FP8 pieces with their own scales equal them too,
    or (exactly when the layout check from the slice descriptions says the layout cuts blocks) some tile of
    the rank's tensor mixes blocks, found from the data by labelling every element with its block."""
    full, quantized, dequantized = moe_dirs
    hf = read_hf_config(quantized)
    family = family_for(hf)
    cut = fp8.native_layout_problems(hf, family, layout, BLOCK)
    ours, reference = SafetensorsReader(quantized), SafetensorsReader(dequantized)
    numbers: dict[str, int] = {}
    mixed = 0
    for tp_rank in range(layout.tp):
        for ep_rank in range(layout.ep):
            for etp_rank in range(layout.expert_tp):
                rules = ShardingRules(hf, family, layout, Coords(tp_rank, ep_rank, etp_rank))
                names = [n for n in rules.layer_names(1) if rules.shard(n).linear] + ["embedding.word_embeddings.weight"]
                for shard in map(rules.shard, names):
                    where = f"{layout} rank {(tp_rank, ep_rank, etp_rank)}: {shard.name}"
                    expected = assemble(shard, [reference.read_piece(p) for p in shard.pieces])
                    assert torch.equal(assemble(shard, [ours.read_piece(p) for p in shard.pieces]), expected), where
                    held = fp8_reads.read_native(ours, ours.fmt, shard, "test")
                    if held is None:  # the embedding
                        assert shard.name.startswith("embedding")
                        continue
                    ids = assemble(shard, [_block_ids(p, numbers.setdefault(p.key, len(numbers))) for p in shard.pieces])
                    if not _tiles_whole(ids):
                        mixed += 1
                        continue
                    assert torch.equal(fp8.dequantize_blocks(*held, BLOCK), expected), f"{where} native"
    assert bool(mixed) == bool(cut), f"{layout}: tiles mixing blocks {mixed}, problems from the descriptions {cut}"


def test_native_layout_error_names_the_tensor_and_the_layouts_that_fit(moe_dirs):
    _, quantized, _ = moe_dirs
    hf = read_hf_config(quantized)
    family = family_for(hf)
    fmt = fp8.checkpoint_format(hf)
    fp8.check_native_layout(hf, family, Layout(tp=2, ep=2), fmt, "config.json")
    with pytest.raises(UserError, match=r"layout TP2×ETP4 would cut them: model.layers.0.mlp.experts.0.gate_proj.weight rows "
                                        r"\[0, 8\) of 32 do not start and end on the 16-row blocks.*layouts that keep whole blocks "
                                        r"\(same pp/ep\): tp=1 etp=1, tp=2 etp=1, tp=2 etp=2.*target.fp8=dequantize"):
        fp8.check_native_layout(hf, family, Layout(tp=2, etp=4), fmt, "config.json")
    # 32-row blocks cut the interleaved [q_g | k_g | v_g] rows (16-row k and v) at any TP.
    with pytest.raises(UserError, match=r"model.layers.0.self_attn.k_proj.weight rows \[0, 16\) of 32 do not start and end on the "
                                        r"32-row blocks.*"
                                        r"no tp/etp keeps whole blocks"):
        fp8.check_native_layout(hf, family, Layout(), fp8.BlockFp8((32, 16)), "config.json")


def test_deepseek_latent_down_projection_cannot_stay_fp8_under_tp():
    """DeepSeek-V3's kv_a_proj_with_mqa has kv_lora_rank + rope rows (576 in the release: 4.5 blocks); the
    local spec splits them over TP, which cuts a block: native FP8 needs tp=1 there, dequantize takes any tp."""
    hf = dict(read_hf_config(random_target("deepseek_v3")),
              quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [8, 8]})
    family = family_for(hf)
    family.check(hf, "config.json")  # the block-FP8 release is accepted now
    fmt = fp8.checkpoint_format(hf)
    fp8.check_native_layout(hf, family, Layout(ep=2), fmt, "config.json")
    with pytest.raises(UserError, match=r"self_attn.kv_a_proj_with_mqa.weight rows \[20, 40\) of 40 do not start and end "
                                        r"on the 8-row blocks.*tp=1 etp=1"):
        fp8.check_native_layout(hf, family, Layout(tp=2, ep=2), fmt, "config.json")


# ---- configs and files that are refused ---------------------------------------------------------


@pytest.mark.parametrize("qc,pattern", [
    ({"quant_method": "mxfp4"}, r"quant_method='mxfp4' is not supported.*dequantize the checkpoint to bf16"),
    ({"quant_method": "fp8"}, r"\(quant_method='fp8'\) has weight_block_size=None.*per-tensor FP8"),
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, r"fmt='e5m2' is not supported"),
    ({"quant_method": "compressed-tensors"}, r"quant_method='compressed-tensors'"),
])
def test_other_quantizations_are_refused_for_every_family(qc, pattern):
    for family in ("llama", "qwen3_moe", "deepseek_v3"):
        hf = dict(read_hf_config(random_target(family)), quantization_config=qc)
        with pytest.raises(UserError, match=pattern):
            family_for(hf).check(hf, "config.json")


def test_modes_resolve_by_device_and_checkpoint():
    fmt = fp8.BlockFp8((128, 128))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fp8.resolve_mode("auto", fmt, cpu, "x") == "dequantize"
    assert fp8.resolve_mode("auto", fmt, cuda, "x") == "native"
    assert fp8.resolve_mode("native", fmt, cpu, "x") == "native"
    assert fp8.resolve_mode("auto", None, cuda, "x") is None
    with pytest.raises(UserError, match=r"target.fp8=native: /m is not an FP8 checkpoint.*target.quantize=fp8"):
        fp8.resolve_mode("native", None, cpu, "/m")


def test_bad_fp8_files_are_named(moe_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    _, quantized, _ = moe_dirs
    key = "model.layers.0.self_attn.o_proj.weight"
    for case in ("no_scale", "wrong_scale"):
        broken = tmp_path / case
        broken.mkdir()
        for name in os.listdir(quantized):
            if name != "model.safetensors":
                (broken / name).write_bytes(open(os.path.join(quantized, name), "rb").read())
        tensors = load_file(os.path.join(quantized, "model.safetensors"))
        if case == "no_scale":
            del tensors[fp8.scale_key(key)]
        else:
            tensors[fp8.scale_key(key)] = torch.ones(2, 2)
        save_file(tensors, str(broken / "model.safetensors"))
        reader = SafetensorsReader(str(broken))
        pattern = (r"o_proj.weight is stored in float8 but has no .*weight_scale_inv" if case == "no_scale" else
                   r"o_proj.weight_scale_inv has shape \[2, 2\], but .*o_proj.weight \[64, 64\] in 16x16 blocks.*\[4, 4\]")
        with pytest.raises(UserError, match=pattern):
            reader.read(key)


# ---- the hosted FP8 target against HF, in both modes ---------------------------------------------


def _relative(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> float:
    return float((a - b)[valid].norm() / b[valid].norm())


@pytest.mark.slow
def test_fp8_target_parity_at_tp2_ep2_and_pp2(moe_dirs):
    """One 8-rank job: TP2×EP2 (dequantize), PP2 (native), TP2×EP2×PP2 (native), all with SP where TP > 1."""
    from specforge_mcore.config import TargetConfig
    from specforge_mcore.target.verify import compare, format_reports, hf_reference, load_hf_model, random_inputs, run_layouts
    from specforge_mcore.train.plan import stage_weight_bytes

    full, quantized, _ = moe_dirs
    layouts = [Layout(tp=2, ep=2, sp=True), Layout(pp=2), Layout(tp=2, ep=2, pp=2, sp=True)]
    modes = ["dequantize", "native", "native"]
    inputs = [random_inputs(512, seed=dp) for dp in range(2)]
    results = run_layouts(quantized, layouts, 8, inputs, None, modes)
    ids = [1, 3, 4]
    exact = [hf_reference(load_hf_model(quantized), x, ids) for x in inputs]  # HF on the dequantised weights
    reference = [hf_reference(load_hf_model(full), x, ids) for x in inputs]
    reports = compare(results, exact, layouts, tolerance=1e-5)
    print(format_reports(reports))
    for report in reports:
        assert report.logits < 1e-5 and report.features < 1e-5, f"{report.layout}: FP8 target != HF on its weights"
        assert report.argmax_mismatches == 0 and report.shards_ok, f"{report.layout}: {report.notes}"

    # Against the full-precision model: within what the same FP8 weights cost HF, and below one e4m3 unit.
    for dp, (ref, hf_fp8) in enumerate(zip(reference, exact)):
        valid = ref["valid"]
        names = ["logits"] + [f"layer{k}" for k in ids]
        quantization_error = {n: float((hf_fp8[n] - ref[n]).abs()[valid].max()) for n in names}
        for li, layout in enumerate(layouts):
            for per_rank in results:
                r = per_rank[li]
                if r["dp"] != dp:
                    continue
                ours = dict({f"layer{k}": t for k, t in r.get("layers", {}).items()},
                            **({"logits": r["logits"]} if "logits" in r else {}))
                for name, tensor in ours.items():
                    relative = _relative(tensor, ref[name], valid)
                    assert relative < E4M3_ULP, f"{layout} {name}: relative error {relative:.4f} vs full precision"
                    worst = float((tensor - ref[name]).abs()[valid].max())
                    assert worst <= quantization_error[name] + 1e-5, f"{layout} {name}: {worst} vs {quantization_error[name]}"

    # Native FP8 holds 1 byte per quantized weight plus a fp32 scale per block: exactly what the planner says.
    hf = read_hf_config(quantized)
    family = family_for(hf)
    for li, layout in enumerate(layouts):
        full_bytes = stage_weight_bytes(hf, family, layout, 4)
        cfg = TargetConfig(dtype="float32", fp8=modes[li])
        _, planned = fp8.planned_weight_bytes(cfg, hf, family, layout, full_bytes, 4, "cpu")
        held = sorted({(per_rank[li]["pp"], per_rank[li]["param_bytes"]) for per_rank in results})
        assert held == list(enumerate(planned)), f"{layout} {modes[li]}: held {held}, planned {planned}"
        if modes[li] == "native":
            assert all(n < 0.6 * f for n, f in zip(planned, full_bytes))  # fp32 -> FP8 linears; embeddings, norms kept


# ---- the recipe -----------------------------------------------------------------------------------


def test_fp8_recipe_fits_on_half_the_gpus():
    from specforge_mcore.config import load_config
    from specforge_mcore.train.plan import GiB, plan_memory

    cfg = load_config("configs/qwen3-235b-a22b-fp8.yaml")
    world = cfg.plan.nodes * cfg.plan.gpus_per_node
    plan = plan_memory(cfg, world, 80 * GiB)
    print(plan.format())
    assert plan.fits and world == 8
    assert "FP8 checkpoint kept in FP8" in plan.format()
    hf = read_hf_config(os.path.dirname(cfg.plan.hf_config))
    tc = cfg.target
    layout = Layout(tp=tc.tp, pp=tc.pp, ep=tc.ep, etp=tc.etp, sp=tc.sp)
    fp8.check_native_layout(hf, family_for(hf), layout, fp8.checkpoint_format(hf), cfg.plan.hf_config)
    bf16 = load_config("configs/qwen3-235b-a22b-fp8.yaml", ["target.fp8=dequantize"])
    assert not plan_memory(bf16, world, 80 * GiB).fits  # the same 8 GPUs cannot hold the bf16 weights


# ---- on-the-fly FP8 through ModelOpt ---------------------------------------------------------------


def _modelopt_worker(rank, world, hf_dir, inputs):
    from megatron.core import parallel_state as ps

    from specforge_mcore.parallel import init_distributed
    from specforge_mcore.target.build import init_model_parallel
    from specforge_mcore.target.host import TargetHost

    init_distributed()
    init_model_parallel(Layout(tp=2))
    out = {}
    for quantize in ("none", "fp8"):
        host = TargetHost(hf_dir, Layout(tp=2), quantize=quantize)
        captures = host.forward(inputs.micro_batches, want_logits=True)
        out[quantize] = dict(logits=torch.cat([c.logits for c in captures]), note=host.weights_note,
                             bytes=fp8.module_bytes(host.model),
                             fp8_params=sum(p.dtype == torch.float8_e4m3fn for p in host.model.parameters()))
    ps.destroy_model_parallel()
    return out


@pytest.mark.slow
def test_modelopt_quantizes_a_full_precision_target_on_the_fly():
    pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not installed")
    from specforge_mcore.parallel import spawn
    from specforge_mcore.target.verify import random_inputs

    hf_dir = random_target("qwen3_moe")
    inputs = random_inputs(512, seed=0)
    results = spawn(_modelopt_worker, 2, hf_dir, inputs)  # forked: the ranks reuse this process's import
    for r in results:
        plain, quantized = r["none"], r["fp8"]
        assert plain["note"] is None and "ModelOpt FP8" in quantized["note"] and "saved" in quantized["note"]
        assert quantized["fp8_params"] > 0
        assert quantized["bytes"] < 0.45 * plain["bytes"], quantized["note"]
        valid = torch.ones(plain["logits"].shape[:2], dtype=torch.bool)
        relative = _relative(quantized["logits"], plain["logits"], valid)
        assert 0 < relative < E4M3_ULP, relative  # see the module doc
        print(quantized["note"], f"logits relative error {relative:.4f}")


# ---- the FP8 GEMM (GPU only) -------------------------------------------------------------------------


@pytest.mark.gpu
def test_block_scaled_fp8_gemm_on_gpu():
    device = torch.device("cuda")
    usable, why = fp8.fp8_gemm_available(device)
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip(why)
    assert usable, why
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(384, 1024, generator=gen)
    x = torch.randn(2, 37, 1024, generator=gen).to(device, torch.bfloat16)
    q, s = fp8.quantize_blocks(w, (128, 128))
    out = fp8.fp8_linear(x, q.to(device), s.to(device), (128, 128)).float()
    ref = x.float() @ fp8.dequantize_blocks(q, s, (128, 128)).to(device).t()
    assert out.shape == (2, 37, 384)
    assert float((out - ref).norm() / ref.norm()) < 0.03  # the activations' own 1x128 FP8 rounding
