"""DeepSeek-V3 on Megatron-Core: HF parity (fp32, 1e-5) in every layout, and clear refusals of the HF
variants Megatron-Core 0.16 cannot build exactly.

The tiny target has what makes DeepSeek-V3 different: MLA with q and kv latents, YaRN with both mscales
(cos/sin factor and softmax scale), a dense first layer, sigmoid routing with a random correction bias,
group-limited top-k, routed_scaling_factor and a shared expert. Each of those, when dropped, moves the
logits by 1e-3 or more, so the test cannot pass without it.
"""

import pytest

from specforge_mcore.errors import UserError
from specforge_mcore.target.build import Layout, check_layout, read_hf_config
from specforge_mcore.target.families import family_for
from specforge_mcore.target.random import random_target
from specforge_mcore.target.verify import format_reports, random_inputs, run_verification

TOL = 1e-5
LAYOUTS = [Layout(), Layout(tp=2), Layout(tp=2, sp=True), Layout(ep=2), Layout(pp=2), Layout(pp=4),
           Layout(tp=2, pp=2), Layout(tp=2, ep=2, sp=True), Layout(ep=2, pp=2), Layout(tp=2, ep=2, pp=2, sp=True)]


def _assert_parity(reports, layouts, what):
    print(format_reports(reports))
    assert [r.layout for r in reports] == [str(layout) for layout in layouts]
    for report in reports:
        assert report.logits < TOL, f"{what} {report.layout}: logits differ from HF by {report.logits:.2e}"
        assert report.features < TOL, f"{what} {report.layout}: features differ from HF by {report.features:.2e}"
        assert report.argmax_mismatches == 0, f"{what} {report.layout}: vocab-parallel argmax != HF argmax"
        assert report.shards_ok, f"{what} {report.layout}: {report.notes}"


@pytest.mark.slow
def test_matches_hf_in_every_layout():
    hf_dir = random_target("deepseek_v3")
    inputs = [random_inputs(512, seed=dp) for dp in range(2)]
    _assert_parity(run_verification(hf_dir, LAYOUTS, 8, inputs), LAYOUTS, "deepseek_v3")


@pytest.mark.slow
def test_variant_without_query_latent_yarn_or_group_limit():
    """q_proj instead of the q latent, plain RoPE, all groups eligible, two shared experts, two dense layers."""
    hf_dir = random_target("deepseek_v3", {
        "q_lora_rank": None, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "n_group": 2, "topk_group": 2, "n_shared_experts": 2, "first_k_dense_replace": 2})
    layouts = [Layout(tp=2, sp=True)]
    _assert_parity(run_verification(hf_dir, layouts, 2, [random_inputs(512, seed=0)]), layouts, "variant")


def _config(**changes):
    return dict(read_hf_config(random_target("deepseek_v3")), **changes)


@pytest.mark.parametrize("change,pattern", [
    ({"rope_interleave": False}, r"rope_interleave=false .* always rotates interleaved pairs"),
    ({"norm_topk_prob": False}, r"norm_topk_prob=False .* always renormalises the top-k weights"),
    ({"num_experts_per_tok": 2}, r"num_experts_per_tok=2, topk_group=2 .* agree only when that ratio is 2"),
    ({"n_group": 3}, r"n_group=3 .* must divide n_routed_experts=8"),
    ({"quantization_config": {"quant_method": "fp8"}}, r"quant_method='fp8'.* dequantize the checkpoint to bf16"),
    ({"rms_norm_eps": 1e-5}, r"rms_norm_eps=1e-05 .* q/kv latents with eps=1e-06"),
    ({"attention_bias": True}, r"attention_bias=true .* no bias on q_a_proj"),
    ({"scoring_func": "softmax"}, r"scoring_func='softmax' .* routes with scoring_func='sigmoid'"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, r"rope_type='linear'"),
])
def test_refuses_what_megatron_cannot_build(change, pattern):
    hf = _config(**change)
    with pytest.raises(UserError, match=pattern):
        family_for(hf).check(hf, "config.json")


def test_layout_must_divide_the_latents():
    hf = _config(kv_lora_rank=30)  # 30 + 8 rotary dims: the local spec splits these rows over TP
    with pytest.raises(UserError, match=r"kv_lora_rank \+ qk_rope_head_dim=38 is not divisible by tp=4"):
        check_layout(hf, family_for(hf), Layout(tp=4), 4, "config.json")
    check_layout(hf, family_for(hf), Layout(tp=2), 2, "config.json")


def test_published_config_maps_to_megatron():
    """DeepSeek-V3's config.json (less its FP8 quantization_config) -> the Megatron fields that matter."""
    hf = dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=129280,
              hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
              num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
              routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
              qk_nope_head_dim=128, topk_method="noaux_tc", n_group=8, topk_group=4, num_experts_per_tok=8,
              first_k_dense_replace=3, norm_topk_prob=True, scoring_func="sigmoid", hidden_act="silu",
              max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000, num_nextn_predict_layers=1,
              rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                            "original_max_position_embeddings": 4096, "type": "yarn"})
    family = family_for(hf)
    family.check(hf, "config.json")
    cfg = family.transformer_config(hf)
    assert (cfg["q_lora_rank"], cfg["kv_lora_rank"], cfg["qk_head_dim"], cfg["qk_pos_emb_head_dim"],
            cfg["v_head_dim"], cfg["kv_channels"]) == (1536, 512, 128, 64, 128, 128)
    assert (cfg["rope_type"], cfg["rotary_scaling_factor"], cfg["mscale_all_dim"]) == ("yarn", 40.0, 1.0)
    assert cfg["moe_layer_freq"] == [0, 0, 0] + [1] * 58
    assert (cfg["num_moe_experts"], cfg["moe_router_topk"], cfg["moe_router_num_groups"],
            cfg["moe_router_group_topk"]) == (256, 8, 8, 4)
    assert (cfg["moe_router_score_function"], cfg["moe_router_enable_expert_bias"],
            cfg["moe_router_topk_scaling_factor"], cfg["moe_shared_expert_intermediate_size"]) == \
        ("sigmoid", True, 2.5, 2048)
    check_layout(hf, family, Layout(tp=8, ep=8, etp=1, pp=4, sp=True), 32, "config.json")
    with pytest.raises(UserError, match=r"quant_method='fp8'"):
        check_layout(dict(hf, quantization_config={"quant_method": "fp8"}), family, Layout(), 1, "config.json")
