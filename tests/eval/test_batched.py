"""Batched chain speculative decoding gives every prompt what decoding it alone gives: the same tokens and
the same accept length at every verification, with rows of different lengths, different acceptance and
rows that finish early."""

import pytest
import torch

from specforge_mcore.errors import UserError
from specforge_mcore.eval.batched import ChainBatchDecoder, generate_batched
from specforge_mcore.eval.speculative import SpecConfig, SpeculativeDecoder, greedy_generate

PROMPTS = [[17, 4242, 99, 12000, 7, 31000, 5], [3, 8, 2000], [9, 1, 44, 45, 46, 47, 48, 49, 50, 51, 52],
           [600, 601], [77, 78, 79, 80, 81]]


def _oracle_logits(vocab, sequence, q, level, right_depth):
    """The target's own next token first down to ``right_depth`` levels below the root, then a wrong one."""
    true = sequence[q + 2] if q + 2 < len(sequence) else 0
    wrong = (true + 1) % vocab
    logits = torch.zeros(vocab)
    logits[true if level < right_depth else wrong] = 10.0
    return logits


class OneOracle(SpeculativeDecoder):
    def __init__(self, *args, sequence, right_depth):
        super().__init__(*args)
        self.sequence, self.right_depth = sequence, right_depth

    def draft_logits(self, output, positions):
        root = self.target.cached - 1
        return torch.stack([_oracle_logits(self.draft.arch.draft_vocab_size, self.sequence, q, q - root,
                                           self.right_depth) for q in positions.tolist()])


class BatchOracle(ChainBatchDecoder):
    def __init__(self, *args, sequences, right_depths):
        super().__init__(*args)
        self.sequences, self.right_depths = sequences, right_depths

    def draft_logits(self, output, positions, prompts, level):
        return torch.stack([_oracle_logits(self.draft.arch.draft_vocab_size, self.sequences[i], q, level,
                                           self.right_depths[i]) for q, i in zip(positions.tolist(), prompts.tolist())])


@pytest.mark.parametrize("config", ["3,1,4", "7,1,8", "1,1,2"])
def test_batched_equals_one_at_a_time_with_an_oracle(tiny, config):
    target, draft = tiny
    spec = SpecConfig.parse(config)
    prompts = [torch.tensor(p) for p in PROMPTS]
    references = [greedy_generate(target, p, 21, set()).tokens for p in prompts]
    # Prompt 1 ends early at an end-of-sequence token (its row leaves the batch while the others go on).
    eos = {references[1][6]}
    references = [greedy_generate(target, p, 21, eos).tokens for p in prompts]
    assert len(references[1]) <= 7 < len(references[0])
    sequences = [p.tolist() + r for p, r in zip(prompts, references)]
    depths = [99, 1, 0, 2, 3]  # per prompt: how many draft levels the oracle gets right
    singles = [OneOracle(target, draft, spec, eos, sequence=s, right_depth=d).generate(p, 21)
               for p, s, d in zip(prompts, sequences, depths)]
    batched = BatchOracle(target, draft, spec, eos, sequences=sequences, right_depths=depths).generate(prompts, 21)
    for single, batch, reference in zip(singles, batched, references):
        assert batch.tokens == single.tokens == reference
        assert batch.accept_lengths == single.accept_lengths
    assert batched[0].accept_lengths[0] == spec.steps + 1  # always right: the whole chain and the bonus
    assert set(batched[2].accept_lengths) == {1}  # never right: the bonus alone


def test_batched_equals_one_at_a_time_with_the_draft(tiny):
    """The real (random) draft proposes; sub-batches of 2 (generate_batched sorts prompts by length)."""
    target, draft = tiny
    spec = SpecConfig.parse("3,1,4")
    prompts = [torch.tensor(p) for p in PROMPTS]
    singles = [SpeculativeDecoder(target, draft, spec, set()).generate(p, 12) for p in prompts]
    calls = []
    batched = generate_batched(ChainBatchDecoder(target, draft, spec, set()), prompts, 12, 2, progress=calls.append)
    assert calls == [2, 2, 1]
    for single, batch, prompt in zip(singles, batched, prompts):
        assert batch.tokens == single.tokens == greedy_generate(target, prompt, 12, set()).tokens
        assert batch.accept_lengths == single.accept_lengths
    assert sum(b.seconds for b in batched) > 0


def test_batched_refuses_trees(tiny):
    target, draft = tiny
    with pytest.raises(UserError, match="chains"):
        ChainBatchDecoder(target, draft, SpecConfig.parse("3,2,6"), set())


def test_run_eval_batches_chains_only(tiny_target, tiny_export, smollm2_dir, tmp_path, capsys):
    """``--spec-batch-size``: the chain config is decoded in batches, the tree config one prompt at a time;
    both report the same acceptance as a run without batching, and the batched one's speedup is against the
    batched reference."""
    import json

    from specforge_mcore.cli import main as cli_main
    from specforge_mcore.eval.cli import run_eval

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["What is 2 + 3?", "Name a colour.", "Hi"]) + "\n")
    one = run_eval(tiny_target[0], tiny_export, str(prompts), ["2,1,3", "2,2,4"], num_prompts="all",
                   max_new_tokens=8, tokenizer_dir=smollm2_dir, progress=False)
    out = tmp_path / "eval"
    many = run_eval(tiny_target[0], tiny_export, str(prompts), ["2,1,3", "2,2,4"], num_prompts="all",
                    max_new_tokens=8, out_dir=str(out), tokenizer_dir=smollm2_dir, progress=False, spec_batch_size=3)
    assert many.lossless and [c.batch_size for c in many.configs] == [3, 1]
    for a, b in zip(one.configs, many.configs):
        assert [p.accept_lengths for p in a.prompts] == [p.accept_lengths for p in b.prompts]
    report = json.loads((out / "eval.json").read_text())
    chain = report["configs"][0]
    assert chain["batch_size"] == 3
    assert chain["speedup"] == pytest.approx(chain["tokens_per_second"] / report["reference"]["tokens_per_second"])

    argv = ["eval", "--target", tiny_target[0], "--draft", tiny_export, "--prompts", str(prompts),
            "--tokenizer", smollm2_dir, "--num-prompts", "all", "--max-new-tokens", "4", "--configs", "2,1,3",
            "--spec-batch-size", "2"]
    assert cli_main(argv) == 0
    assert "speculative 2,1,3 (batches of 2): 3 prompts" in capsys.readouterr().out
    with pytest.raises(UserError, match="--spec-batch-size 0"):
        run_eval(tiny_target[0], tiny_export, str(prompts), ["2,1,3"], tokenizer_dir=smollm2_dir, spec_batch_size=0)


def test_eval_table_reads_several_evals(tiny_target, tiny_export, smollm2_dir, tmp_path, capsys):
    import json

    from specforge_mcore.cli import main as cli_main
    from specforge_mcore.eval.cli import run_eval

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 2 + 3?"}) + "\n")
    run_eval(tiny_target[0], tiny_export, str(prompts), ["2,1,3", "3,1,4"], num_prompts=1, max_new_tokens=4,
             out_dir=str(tmp_path / "a"), tokenizer_dir=smollm2_dir, progress=False)
    assert cli_main(["eval-table", f"trained={tmp_path / 'a'}", str(tmp_path / "a"), "--out", str(tmp_path / "t.md")]) == 0
    rows = (tmp_path / "t.md").read_text().splitlines()
    assert len(rows) == 2 + 4 and rows[2].startswith("| trained | prompts.jsonl | 1 x 4 | 2,1,3 |")
    assert rows[5].startswith("| a | prompts.jsonl | 1 x 4 | 3,1,4 |") and rows[5].endswith("| yes |")
    assert cli_main(["eval-table", str(tmp_path / "missing")]) == 2
    assert "missing/eval.json: no such file" in capsys.readouterr().err
