"""Speculative decoding with an exported draft: lossless against greedy decoding, exact acceptance
accounting, and draft steps that are the TTT steps the draft was trained with."""

import json

import pytest
import torch

from specforge_mcore.cli import main as cli_main
from specforge_mcore.draft.attention import reference_attention
from specforge_mcore.draft.ttt import shift
from specforge_mcore.errors import UserError
from specforge_mcore.eval.cli import encode_prompt, load_prompts, run_eval
from specforge_mcore.eval.speculative import (DraftRunner, SpecConfig, SpeculativeDecoder, Target, check_pair,
                                              eos_token_ids, greedy_generate, load_target)
from specforge_mcore.export.io import load_export


@pytest.fixture(scope="module")
def smollm2(smollm2_dir, smollm2_export):
    from transformers import AutoTokenizer

    model = load_target(smollm2_dir)
    draft = load_export(smollm2_export)
    check_pair(model, draft, smollm2_dir, smollm2_export)
    draft.set_embedding(model.get_input_embeddings().weight.detach())
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    return Target(model, draft.arch.capture_layer_ids), draft, tokenizer, eos_token_ids(model, tokenizer)


@pytest.mark.parametrize("config", ["3,1,4", "5,4,8"], ids=["chain", "tree"])
def test_lossless_on_smollm2(smollm2, config):
    target, draft, tokenizer, eos = smollm2
    spec = SpecConfig.parse(config)
    decoder = SpeculativeDecoder(target, draft, spec, eos)
    for question in load_prompts("gsm8k")[:2]:
        prompt = torch.tensor(encode_prompt(tokenizer, question))
        reference = greedy_generate(target, prompt, 16, eos)
        generated = decoder.generate(prompt, 16)
        assert generated.tokens == reference.tokens
        assert len(reference.tokens) == 16 or reference.tokens[-1] in eos
        # Every verification emits between 1 (bonus only) and steps + 1 tokens, and together they emit
        # everything after the prefill's token (the last one may be cut at the length limit).
        assert all(1 <= n <= spec.steps + 1 for n in generated.accept_lengths)
        assert sum(generated.accept_lengths) >= len(generated.tokens) - 1
        assert sum(generated.accept_lengths[:-1]) < len(generated.tokens) - 1


class Oracle(SpeculativeDecoder):
    """Proposes the target's own greedy continuation: first choice the true token up to ``right_depth``
    levels below the root (then a wrong one), or only as the second choice with ``second=True``."""

    def __init__(self, *args, sequence, right_depth=99, second=False):
        super().__init__(*args)
        self.sequence, self.right_depth, self.second = sequence, right_depth, second

    def draft_logits(self, output, positions):
        vocab = self.draft.arch.draft_vocab_size
        root = self.target.cached - 1  # the draft output at position q proposes token q + 2
        logits = torch.zeros(len(positions), vocab)
        for row, q in enumerate(positions.tolist()):
            true = self.sequence[q + 2] if q + 2 < len(self.sequence) else 0
            wrong = (true + 1) % vocab
            first, other = (wrong, true) if self.second or q - root >= self.right_depth else (true, wrong)
            logits[row, first], logits[row, other] = 10.0, 5.0
        return logits


@pytest.mark.parametrize("config, kwargs, expected", [
    ("3,1,4", {}, [4, 4, 4, 4]),                      # every draft token right: steps + 1 per verification
    ("3,1,4", {"right_depth": 1}, [2] * 8),           # only the first one right: 2 per verification
    ("3,2,6", {}, [4, 4, 4, 4]),                      # tree, the right chain ranked first
    ("3,2,6", {"second": True}, [2] * 8),             # tree, right token only second: one accepted, via branch 2
], ids=["chain", "chain-first-only", "tree", "tree-second-branch"])
@pytest.mark.parametrize("plain_head", [True, False], ids=["head-per-row", "full-logits"])
def test_acceptance_accounting(tiny, config, kwargs, expected, plain_head, monkeypatch):
    target, draft = tiny
    assert target.plain_head  # a Llama's logits are lm_head(last hidden state)
    monkeypatch.setattr(target, "plain_head", plain_head)
    prompt = torch.tensor([17, 4242, 99, 12000, 7, 31000, 5])
    reference = greedy_generate(target, prompt, 17, eos_ids=set())
    oracle = Oracle(target, draft, SpecConfig.parse(config), set(),
                    sequence=prompt.tolist() + reference.tokens, **kwargs)
    generated = oracle.generate(prompt, 17)
    assert generated.tokens == reference.tokens
    assert generated.accept_lengths == expected


def test_tree_verification_matches_each_path(tiny):
    """One verify forward with the 4D tree mask gives, at every node, the logits of running the root and
    that node's ancestors as a plain sequence after the same prompt."""
    from specforge_mcore.eval.speculative import Node

    target, draft = tiny
    decoder = SpeculativeDecoder(target, draft, SpecConfig.parse("3,2,6"), set())
    prompt = torch.tensor([5, 900, 31, 4000, 77, 12])
    root = 321
    # root -> a, b; a -> c, d; c -> e  (parents before children)
    tree = [Node(11, -1, 0, 0.5, None), Node(12, -1, 0, 0.4, None), Node(13, 0, 1, 0.3, None),
            Node(14, 0, 1, 0.2, None), Node(15, 2, 2, 0.1, None)]
    n = prompt.numel()
    with torch.no_grad():
        target.reset()
        target.forward(prompt, torch.arange(n))
        tokens = torch.tensor([root] + [node.token for node in tree])
        positions = torch.tensor([n] + [n + 1 + node.depth for node in tree])
        tree_logits, _ = target.forward(tokens, positions, decoder._verify_mask(tree, n))
        for row in range(len(tree) + 1):
            path, node = [], row - 1
            while node >= 0:
                path.append(tree[node].token)
                node = tree[node].parent
            sequence = torch.cat([prompt, torch.tensor([root] + path[::-1])])
            target.reset()
            plain, _ = target.forward(sequence, torch.arange(sequence.numel()))
            torch.testing.assert_close(tree_logits[row], plain[-1], rtol=1e-4, atol=1e-4)


def test_draft_steps_are_the_training_steps(tiny):
    """Drafting a chain from position t with the true tokens reproduces TTT step i at t (draft/ttt.py):
    step 0 from fc(features) and token t+1; step i from step i-1's output, token t+1+i, RoPE t+i, seeing
    step-0 keys <= t and its own chain's keys."""
    _, draft = tiny
    layer, arch = draft.midlayer, draft.arch
    gen = torch.Generator().manual_seed(0)
    T, steps = 12, 4
    aux = [torch.randn(T, arch.target_hidden_size, generator=gen) for _ in range(3)]
    ids = torch.randint(0, arch.vocab_size, (T,), generator=gen)
    cu_seqlens = torch.tensor([0, T], dtype=torch.int32)
    ttt_outputs = []
    with torch.no_grad():
        hidden, hidden_normed = draft.project(aux, impl="reference")
        k_steps, v_steps = [], []
        for i in range(steps):
            if i > 0:
                hidden_normed = layer.hidden_norm(hidden)
            cos, sin = draft.rope.cos_sin(torch.arange(T) + i)
            q, k, v = layer.self_attn.qkv(layer.attention_input(draft.embed(shift(ids, 1 + i)), hidden_normed), cos, sin)
            if i == 0:
                k0, v0 = k, v
            else:
                k_steps.append(k)
                v_steps.append(v)
            kd = torch.stack(k_steps) if k_steps else k.new_zeros((0,) + tuple(k.shape))
            vd = torch.stack(v_steps) if v_steps else v.new_zeros((0,) + tuple(v.shape))
            hidden = layer.finish(hidden, reference_attention(q, k0, v0, kd, vd, cu_seqlens, arch.head_dim ** -0.5))
            ttt_outputs.append(hidden)

        runner = DraftRunner(draft)
        for t in (0, 3, T - 1 - steps):
            runner.reset()
            out = runner.extend([a[: t + 1] for a in aux], ids[1: t + 2], torch.arange(t + 1))[-1]
            torch.testing.assert_close(out, ttt_outputs[0][t], rtol=1e-5, atol=1e-5)
            slots = []
            for i in range(1, steps):
                out, new = runner.step(out[None], ids[t + 1 + i: t + 2 + i], torch.tensor([t + i]), [slots])
                slots += new
                out = out[0]
                torch.testing.assert_close(out, ttt_outputs[i][t], rtol=1e-5, atol=1e-5)


def test_run_eval_reports_and_cli(tiny_target, tiny_export, smollm2_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["What is 2 + 3?", "Name a colour."]) + "\n")
    out = tmp_path / "eval"
    results = run_eval(tiny_target[0], tiny_export, str(prompts), ["2,1,3", "2,2,4"], num_prompts=2,
                       max_new_tokens=8, out_dir=str(out), tokenizer_dir=smollm2_dir, progress=False)
    assert results.lossless and results.num_prompts == 2
    with open(out / "eval.json", encoding="utf-8") as fh:
        report = json.load(fh)
    assert [c["config"] for c in report["configs"]] == ["2,1,3", "2,2,4"]
    for config in report["configs"]:
        assert config["lossless"] is True and len(config["acceptance_rate"]) == 2
        assert 1.0 <= config["mean_accept_length"] <= 3.0
        assert config["tokens_per_second"] > 0 and config["verifications"] > 0
    assert report["baseline"]["tokens_per_second"] > 0
    table = (out / "eval.md").read_text().splitlines()
    assert table[0].startswith("| config") and len(table) == 4 and table[2].startswith("| 2,1,3 |")
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    argv = ["eval", "--target", tiny_target[0], "--draft", tiny_export, "--prompts", str(prompts),
            "--tokenizer", smollm2_dir, "--num-prompts", "1", "--max-new-tokens", "4", "--steps", "2",
            "--topk", "1", "--num-draft-tokens", "3"]
    assert cli_main(argv) == 0
    assert "lossless: every speculative generation equals" in capsys.readouterr().out


def test_lossless_failure_fails_the_command(tiny_target, tiny_export, smollm2_dir, tmp_path, monkeypatch, capsys):
    original = SpeculativeDecoder._accept

    def corrupt(tree, argmax):  # a broken verifier: emits a wrong bonus token
        path, bonus = original(tree, argmax)
        return path, (bonus + 1) % 1000

    monkeypatch.setattr(SpeculativeDecoder, "_accept", staticmethod(corrupt))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\n")
    argv = ["eval", "--target", tiny_target[0], "--draft", tiny_export, "--prompts", str(prompts),
            "--tokenizer", smollm2_dir, "--num-prompts", "1", "--max-new-tokens", "4"]
    assert cli_main(argv) == 1
    assert "LOSSLESS CHECK FAILED: config 3,1,4, prompt 0" in capsys.readouterr().out


def test_mismatched_pair_and_bad_configs(tiny_target, smollm2_export):
    model = load_target(tiny_target[0])
    with pytest.raises(UserError, match="reads target features of width 576"):
        check_pair(model, load_export(smollm2_export), tiny_target[0], smollm2_export)
    with pytest.raises(UserError, match="use 3,1,4"):
        SpecConfig.parse("3,1,6")
    with pytest.raises(UserError, match="at most 7"):
        SpecConfig.parse("2,2,9")
    with pytest.raises(UserError, match="STEPS,TOPK,NUM_DRAFT_TOKENS"):
        SpecConfig.parse("3-1-4")


def test_packaged_prompt_sets():
    assert len(load_prompts("gsm8k")) == 500  # the evaluation questions; 500.. are the training source gsm8k:train
    humaneval = load_prompts("humaneval")
    assert len(humaneval) == 164 and humaneval[0].startswith("from typing import List")
    heldout = load_prompts("sharegpt-heldout")  # first user turns of the split training never reads
    assert len(heldout) > 400 and all(isinstance(p, str) and p.strip() for p in heldout)
    with pytest.raises(UserError, match="neither one of"):
        load_prompts("no-such-set")
