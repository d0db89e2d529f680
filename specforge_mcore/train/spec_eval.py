"""``train.eval_spec_prompts``: real speculative decoding at every held-out evaluation.

The chained estimate (``eval_sim_al``, docs/design.md §10) is computed from teacher-forced chains; this
measures what serving does instead: the draft as it is at that step proposes, the target verifies (greedy,
a chain of ``draft.ttt_steps`` drafts, ``eval/batched.py``), on the first ``N`` held-out documents' prompts
(each document's tokens before its first assistant token: the conversation up to the generation prompt,
rendered by the same chat template as the training data). Rank 0 alone runs it, on an HF copy of the
target on the CPU in fp32 (so the lossless check is token for token), loaded once: meant for targets that
fit in host memory (the CPU demo, small targets); for a 235B target measure the export with SGLang.

Logged per evaluation: ``eval_spec_al`` (mean accept length, SGLang's definition: tokens per
verification), ``eval_spec_accept`` (acceptance rate at each draft position), ``eval_spec_lossless`` and
``eval_spec_seconds``.
"""

from __future__ import annotations

import time

import torch

from specforge_mcore.data.packing import PackedData
from specforge_mcore.draft.model import Eagle3Draft
from specforge_mcore.errors import UserError
from specforge_mcore.eval.batched import ChainBatchDecoder, generate_batched
from specforge_mcore.eval.report import acceptance_rates
from specforge_mcore.eval.speculative import (SpecConfig, Target, eos_token_ids, first_mismatch,
                                              greedy_generate_batch, load_target)


def held_out_prompts(data: PackedData, count: int) -> list[torch.Tensor]:
    """The first ``count`` documents' prompts: each document's tokens before its first assistant token
    (documents with no assistant token, or none before it, are passed over)."""
    prompts: list[torch.Tensor] = []
    for row in range(len(data)):
        ids, docs, mask = data.input_ids[row], data.document_ids[row], data.assistant_mask[row]
        length = int(data.row_lengths[row])
        for doc in torch.unique(docs[:length]).tolist():
            where = (docs[:length] == doc).nonzero().flatten()
            first = where[mask[where]]
            if first.numel() and int(first[0]) > int(where[0]):
                prompts.append(ids[int(where[0]):int(first[0])].clone())
                if len(prompts) == count:
                    return prompts
    return prompts


class SpecProbe:
    def __init__(self, hf_dir: str, eval_data: PackedData, capture_layer_ids: list[int], prompts: int,
                 max_new_tokens: int, steps: int):
        self.prompts = held_out_prompts(eval_data, prompts)
        if not self.prompts:
            raise UserError(f"train.eval_spec_prompts={prompts}: the held-out split has no document with a "
                            "prompt before an assistant turn (raise data.eval_fraction or add data.eval_files)")
        self.model = load_target(hf_dir, torch.float32)
        self.target = Target(self.model, capture_layer_ids)
        self.eos = eos_token_ids(self.model, None)
        self.config = SpecConfig(steps, 1, steps + 1)
        self.max_new_tokens = max_new_tokens
        with torch.inference_mode():
            self.references = greedy_generate_batch(self.target, self.prompts, max_new_tokens, self.eos,
                                                    batch_size=len(self.prompts))

    def measure(self, draft: Eagle3Draft) -> dict:
        """Speculative decoding with an fp32 copy of ``draft`` (the trainer's is left untouched)."""
        start = time.perf_counter()
        copy = Eagle3Draft(draft.arch)
        copy.load_state_dict({k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
                              for k, v in draft.trainable_state_dict().items()})
        copy.set_embedding(self.model.get_input_embeddings().weight.detach().float())
        copy.eval()
        generations = generate_batched(ChainBatchDecoder(self.target, copy, self.config, self.eos), self.prompts,
                                       self.max_new_tokens, batch_size=len(self.prompts))
        lengths = [n for g in generations for n in g.accept_lengths]
        lossless = all(first_mismatch(r.tokens, g.tokens) is None for r, g in zip(self.references, generations))
        return {"eval_spec_al": sum(lengths) / len(lengths),
                "eval_spec_accept": acceptance_rates(lengths, self.config.steps),
                "eval_spec_lossless": lossless, "eval_spec_prompts": len(self.prompts),
                "eval_spec_seconds": time.perf_counter() - start}
