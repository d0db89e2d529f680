"""Parity of the Megatron-hosted target with HF transformers (fp32, 1e-5), in every layout.

One 8-rank job per family runs all its layouts (data parallelism fills the ranks a layout leaves, and
two DP groups see different packed batches). HF runs every packed document alone, so this also checks
document masking and per-document positions. The draft shards' union must equal the batch, in order.
"""

import pytest

from specforge_mcore.target.build import Layout
from specforge_mcore.target.random import random_target
from specforge_mcore.target.verify import format_reports, random_inputs, run_verification

TOL = 1e-5
DENSE = [Layout(), Layout(tp=2), Layout(tp=2, sp=True), Layout(pp=2), Layout(pp=4), Layout(tp=2, pp=2)]
MOE = DENSE + [Layout(ep=2), Layout(tp=2, ep=2, sp=True), Layout(tp=2, ep=2, etp=1, sp=True),
               Layout(ep=2, pp=2), Layout(ep=2, dispatcher="allgather"), Layout(tp=2, ep=2, pp=2, sp=True)]


@pytest.mark.slow
@pytest.mark.parametrize("family,layouts", [("llama", DENSE), ("qwen3", DENSE), ("qwen3_moe", MOE), ("mixtral", MOE)])
def test_matches_hf_in_every_layout(family, layouts):
    hf_dir = random_target(family)
    inputs = [random_inputs(512, seed=dp) for dp in range(2)]
    reports = run_verification(hf_dir, layouts, 8, inputs)
    print(format_reports(reports))
    assert [r.layout for r in reports] == [str(layout) for layout in layouts]
    for report in reports:
        assert report.logits < TOL, f"{family} {report.layout}: logits differ from HF by {report.logits:.2e}"
        assert report.features < TOL, f"{family} {report.layout}: features differ from HF by {report.features:.2e}"
        assert report.argmax_mismatches == 0, f"{family} {report.layout}: vocab-parallel argmax != HF argmax"
        assert report.shards_ok, f"{family} {report.layout}: {report.notes}"


def test_single_process_layout_and_loading_memory():
    """World of one, and: each rank of TP2×EP2×PP2 reads exactly the bytes it holds, a fraction of the model."""
    import os

    hf_dir = random_target("qwen3_moe")
    full = os.path.getsize(os.path.join(hf_dir, "model.safetensors"))
    inputs = [random_inputs(512, seed=0)]
    (single,) = run_verification(hf_dir, [Layout()], 1, inputs)
    assert single.logits < TOL and single.features < TOL and single.shards_ok
    (split,) = run_verification(hf_dir, [Layout(tp=2, ep=2, pp=2, sp=True)], 8, inputs)
    assert split.logits < TOL and split.features < TOL and split.shards_ok
    print(f"full checkpoint {full / 2**20:.2f} MiB; per rank at TP2xEP2xPP2: read {split.bytes_read_max / 2**20:.2f} MiB, "
          f"holds {split.param_bytes_max / 2**20:.2f} MiB")
    assert split.bytes_read_max <= split.param_bytes_max  # nothing read that is not kept
    assert split.param_bytes_max < 0.3 * full  # well under the full model
