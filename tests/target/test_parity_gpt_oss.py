"""GPT-OSS on Megatron-Core: HF parity (fp32, 1e-5) in every layout, and clear refusals.

The tiny target has attention sinks, biases everywhere, alternating 4-token sliding windows over
packed documents, YaRN, and a clamped SwiGLU whose limit (0.2) actually clamps. Dropping the window,
widening it by one, windowing every layer, dropping the clamp or the +1, swapping gate and up, or
ignoring the sinks or YaRN's attention factor each moves the logits by 6e-4 or more.
Megatron-Core supports expert biases only with expert-TP 1, so every layout with tp > 1 says etp=1.
"""

import math

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from specforge_mcore.errors import UserError
from specforge_mcore.rope import yarn_inverse_frequencies
from specforge_mcore.target.build import Layout, check_layout, read_hf_config
from specforge_mcore.target.families import family_for
from specforge_mcore.target.random import random_target
from specforge_mcore.target.verify import format_reports, random_inputs, run_verification

TOL = 1e-5
LAYOUTS = [Layout(), Layout(tp=2, etp=1), Layout(tp=2, etp=1, sp=True), Layout(ep=2), Layout(pp=2), Layout(pp=4),
           Layout(tp=2, etp=1, pp=2), Layout(tp=2, ep=2, etp=1, sp=True), Layout(ep=2, pp=2),
           Layout(tp=2, ep=2, etp=1, pp=2, sp=True)]


@pytest.mark.slow
def test_matches_hf_in_every_layout():
    hf_dir = random_target("gpt_oss")
    inputs = [random_inputs(512, seed=dp) for dp in range(2)]
    reports = run_verification(hf_dir, LAYOUTS, 8, inputs)
    print(format_reports(reports))
    assert [r.layout for r in reports] == [str(layout) for layout in LAYOUTS]
    for report in reports:
        assert report.logits < TOL, f"gpt_oss {report.layout}: logits differ from HF by {report.logits:.2e}"
        assert report.features < TOL, f"gpt_oss {report.layout}: features differ from HF by {report.features:.2e}"
        assert report.argmax_mismatches == 0, f"gpt_oss {report.layout}: vocab-parallel argmax != HF argmax"
        assert report.shards_ok, f"gpt_oss {report.layout}: {report.notes}"


def _config(**changes):
    return dict(read_hf_config(random_target("gpt_oss")), **changes)


def test_expert_biases_need_expert_tp_1():
    hf = _config()
    with pytest.raises(UserError, match=r"TP2×SP×EP2: gpt_oss experts have biases.*expert tp=2\); add etp=1"):
        check_layout(hf, family_for(hf), Layout(tp=2, ep=2, sp=True), 4, "config.json")
    check_layout(hf, family_for(hf), Layout(tp=2, ep=2, etp=1, sp=True), 4, "config.json")


@pytest.mark.parametrize("change,pattern", [
    ({"quantization_config": {"quant_method": "mxfp4"}}, r"quant_method='mxfp4'.* dequantize the checkpoint to bf16"),
    ({"attention_bias": False}, r"attention_bias=false is not supported for gpt_oss"),
    ({"layer_types": ["chunked_attention"] * 8}, r"layer_types \['chunked_attention'\]"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, r"rope_type='llama3'"),
])
def test_refuses_what_megatron_cannot_build(change, pattern):
    hf = _config(**change)
    with pytest.raises(UserError, match=pattern):
        family_for(hf).check(hf, "config.json")


@pytest.mark.parametrize("config_class,fields", [
    ("GptOssConfig", {}),  # gpt-oss-120b's rope: factor 32, truncate=false
    ("DeepseekV3Config", dict(max_position_embeddings=163840, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096, beta_fast=32,
        beta_slow=1, mscale=1.0, mscale_all_dim=1.0))),  # DeepSeek-V3's
    ("DeepseekV3Config", dict(max_position_embeddings=2048, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=512, mscale=1.0,
        mscale_all_dim=0.8))),  # the tiny test target's: cos/sin factor != 1
])
def test_yarn_matches_transformers(config_class, fields):
    config = getattr(transformers, config_class)(**fields)
    expected, factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    inv_freq, attention_factor = yarn_inverse_frequencies(config.to_dict(), config.head_dim)
    torch.testing.assert_close(inv_freq, expected, rtol=0, atol=0)
    assert attention_factor == pytest.approx(factor, rel=1e-12)


def test_published_config_maps_to_megatron():
    """gpt-oss-120b's config.json (less its MXFP4 quantization_config) -> the Megatron fields that matter."""
    hf = dict(architectures=["GptOssForCausalLM"], model_type="gpt_oss", vocab_size=201088, hidden_size=2880,
              intermediate_size=2880, num_hidden_layers=36, num_attention_heads=64, num_key_value_heads=8,
              head_dim=64, num_local_experts=128, num_experts_per_tok=4, sliding_window=128, swiglu_limit=7.0,
              attention_bias=True, rms_norm_eps=1e-5, max_position_embeddings=131072, rope_theta=150000,
              layer_types=["sliding_attention", "full_attention"] * 18,
              rope_scaling={"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                            "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False})
    family = family_for(hf)
    family.check(hf, "config.json")
    cfg = family.transformer_config(hf)
    assert cfg["window_size"] == (127, 0) and cfg["window_attn_skip_freq"] == [1, 0] * 18
    assert cfg["softmax_type"] == "learnable" and cfg["add_bias_linear"] and cfg["add_qkv_bias"]
    assert cfg["softmax_scale"] == pytest.approx((0.1 * math.log(32) + 1) ** 2 / 8)
    assert (cfg["glu_linear_offset"], cfg["activation_func_clamp_value"]) == (1.0, 7.0)
    x = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(cfg["activation_func"](x), x * torch.sigmoid(1.702 * x))
    assert (cfg["num_moe_experts"], cfg["moe_router_topk"], cfg["moe_router_pre_softmax"]) == (128, 4, False)
    check_layout(hf, family, Layout(tp=8, ep=8, etp=1, pp=2, sp=True), 16, "config.json")
