"""The training-time acceptance estimate ``eval_sim_al`` replays greedy speculative decoding on the
teacher-forced chains (``draft/ttt.py: walk_accept_lengths``). Given the same right/wrong outcome for each
(root, draft level), the replay must produce the accept lengths real speculative decoding produces."""

import torch

from specforge_mcore.draft.ttt import DraftBatch, decoding_walk, walk_accept_lengths, walk_roots
from specforge_mcore.eval.batched import ChainBatchDecoder
from specforge_mcore.eval.speculative import SpecConfig, greedy_generate


def test_walk_by_hand():
    # Two rows of 8; row 0 drafts from position 1 on, row 1 only at positions 9..12.
    roots = torch.tensor([0, 1, 1, 1, 1, 1, 1, 0] + [0, 1, 1, 1, 1, 0, 0, 0], dtype=torch.bool)
    lengths = torch.tensor([3, 2, 3, 0, 1, 0, 3, 3] + [3, 0, 3, 1, 3, 3, 3, 3])
    # Row 0: root 1 accepts 2 -> 3 tokens, root 4 accepts 1 -> 2, root 6 accepts 3 -> 4 (then past the row).
    # Row 1: root 9 accepts 0 -> 1, root 10 accepts 3 (capped at 2 steps) -> 3, root 13 is no root.
    assert walk_accept_lengths(lengths, roots, 8, 3) == [[3, 2, 4], [1, 4]]
    assert walk_accept_lengths(lengths, roots, 8, 2) == [[3, 2, 3], [1, 3]]
    assert decoding_walk(lengths, roots, 8, 3).tolist() == [3 + 2 + 4 + 1 + 4, 5]


def test_walk_roots_are_where_serving_drafts():
    # One row: document 1 = prompt (2 tokens) + answer (4 tokens), document 2 = prompt (2) + answer (2).
    docs = torch.tensor([[1, 1, 1, 1, 1, 1, 2, 2, 2, 2]])
    assistant = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    batch = DraftBatch(input_ids=torch.zeros(1, 10, dtype=torch.long), position_ids=torch.zeros(1, 10, dtype=torch.long),
                       document_ids=docs, assistant_mask=assistant, aux_hidden=[], final_hidden=torch.zeros(0),
                       target_argmax=torch.zeros(1, 10, dtype=torch.long))
    # Position 1 (last prompt token) drafts token 3 after the target's token 2; the last root of a
    # document is two before its end.
    assert walk_roots(batch).nonzero().flatten().tolist() == [1, 2, 3, 7]


class DesignedOracle(ChainBatchDecoder):
    """Level ``level`` of the chain rooted at draft position ``root`` is right iff ``right[root][level]``."""

    def __init__(self, *args, sequence, right):
        super().__init__(*args)
        self.sequence, self.right = sequence, right

    def draft_logits(self, output, positions, prompts, level):
        vocab = self.draft.arch.draft_vocab_size
        rows = []
        for q in positions.tolist():
            true = self.sequence[q + 2] if q + 2 < len(self.sequence) else 0
            logits = torch.zeros(vocab)
            logits[true if self.right[q - level][level] else (true + 1) % vocab] = 10.0
            rows.append(logits)
        return torch.stack(rows)


def test_walk_equals_speculative_decoding(tiny):
    target, draft = tiny
    prompt = torch.tensor([17, 4242, 99, 12000, 7, 31000, 5])
    new_tokens = 40
    reference = greedy_generate(target, prompt, new_tokens, set()).tokens
    sequence = prompt.tolist() + reference
    gen = torch.Generator().manual_seed(0)
    for steps in (1, 3, 5):
        right = (torch.rand(len(sequence) + 8, steps, generator=gen) < 0.6).tolist()
        decoder = DesignedOracle(target, draft, SpecConfig(steps, 1, steps + 1), set(), sequence=sequence, right=right)
        served = decoder.generate([prompt], new_tokens)[0]
        assert served.tokens == reference
        # The replay: chains rooted where the answer is drafted (token t+1 and t+2 generated), each step
        # right as designed and inside the sequence.
        n = len(sequence)
        lengths = torch.zeros(n, dtype=torch.long)
        for t in range(n):
            while lengths[t] < steps and t + 2 + lengths[t] < n and right[t][int(lengths[t])]:
                lengths[t] += 1
        roots = torch.zeros(n, dtype=torch.bool)
        roots[len(prompt) - 1:n - 2] = True
        walked = walk_accept_lengths(lengths, roots, n, steps)[0]
        # Serving stops at the token limit; the replay stops at the end of the sequence: the last
        # verification of each may be cut differently.
        assert walked[:-1] == served.accept_lengths[:len(walked) - 1]
        assert len(served.accept_lengths) - len(walked) in (0, 1, -1)
        assert len(set(walked)) > 1, "the design must exercise several accept lengths"
