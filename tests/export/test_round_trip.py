"""Export -> load_export gives back the same draft: identical logits on a fixed batch, both layouts."""

import pytest
import torch

from specforge_mcore.eval.speculative import DraftRunner
from specforge_mcore.export.io import detect_format, load_export, write_export


def logits_on_fixed_batch(draft, embedding):
    """Draft extend over 12 positions, then two chained decode steps from the last one: every logit."""
    gen = torch.Generator().manual_seed(7)
    arch = draft.arch
    draft.set_embedding(embedding)
    runner = DraftRunner(draft)
    aux = [torch.randn(12, arch.target_hidden_size, generator=gen) for _ in range(3)]
    tokens = torch.randint(0, arch.vocab_size, (12,), generator=gen)
    with torch.no_grad():
        out = runner.extend(aux, tokens, torch.arange(12))
        logits = [draft.logits(out)]
        hidden, slots = out[-1:], []
        for level in (1, 2):
            step_tokens = torch.randint(0, arch.vocab_size, (1,), generator=gen)
            hidden, new = runner.step(hidden, step_tokens, torch.tensor([11 + level]), [slots])
            slots = slots + new
            logits.append(draft.logits(hidden))
    return torch.cat(logits)


def rounded(draft, dtype):
    """The draft with every weight rounded to ``dtype`` (what a bf16 export stores)."""
    copy = type(draft)(draft.arch)
    copy.load_state_dict({k: v.to(dtype).float() if v.is_floating_point() else v
                          for k, v in draft.trainable_state_dict().items()}, strict=False)
    return copy


@pytest.mark.parametrize("layout", ["sglang", "speculators"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_round_trip_identical_logits(layout, dtype, llama_target, tmp_path, random_draft, arch_for):
    _, hf = llama_target
    draft = random_draft(arch_for(hf))
    out = write_export(draft, str(tmp_path / "export"), layout=layout, dtype=dtype)
    assert detect_format(out) == layout
    loaded = load_export(out)
    assert loaded.arch.capture_layer_ids == draft.arch.capture_layer_ids == [1, 3, 4]
    assert loaded.arch.rope == draft.arch.rope
    reference = draft if dtype == "fp32" else rounded(draft, torch.bfloat16)
    ours, theirs = reference.trainable_state_dict(), loaded.trainable_state_dict()
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    embedding = torch.randn(draft.arch.vocab_size, draft.arch.hidden_size, generator=torch.Generator().manual_seed(3))
    expected = logits_on_fixed_batch(reference, embedding)
    assert torch.equal(logits_on_fixed_batch(loaded, embedding), expected)
    if dtype == "bf16":  # the rounding is real: the fp32 draft's logits differ
        assert not torch.equal(logits_on_fixed_batch(draft, embedding), expected)


def test_round_trip_per_layer_norm_and_wide_target(llama_target, tmp_path, random_draft, arch_for):
    from dataclasses import replace

    _, hf = llama_target
    draft = random_draft(replace(arch_for(hf, per_layer_norm=True), target_hidden_size=96))
    loaded = load_export(write_export(draft, str(tmp_path / "export"), dtype="fp32"))
    assert loaded.arch.per_layer_norm and loaded.arch.target_hidden_size == 96
    embedding = torch.randn(draft.arch.vocab_size, draft.arch.hidden_size)
    assert torch.equal(logits_on_fixed_batch(loaded, embedding), logits_on_fixed_batch(draft, embedding))
