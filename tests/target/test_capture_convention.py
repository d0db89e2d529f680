"""The captured-layer convention (docs/design.md §4): capture id i is the OUTPUT of 0-based layer i, which is
HF's ``hidden_states[i + 1]``. An off-by-one in either direction must fail this test."""


from specforge_mcore.target.build import Layout
from specforge_mcore.target.host import default_capture_layer_ids
from specforge_mcore.target.random import random_target
from specforge_mcore.target.verify import hf_reference, load_hf_model, random_inputs, run_verification
from specforge_mcore.parallel import spawn
from specforge_mcore.target.verify import layout_worker


def test_default_capture_layers():
    assert default_capture_layer_ids(8) == [1, 3, 4]
    assert default_capture_layer_ids(30) == [1, 14, 26]
    assert default_capture_layer_ids(94) == [1, 46, 90]  # Qwen3-235B-A22B


def test_capture_is_output_of_layer_not_its_neighbours():
    hf_dir = random_target("llama")
    inputs = random_inputs(512, seed=3)
    ids = [0, 2, 6]
    (rank0,) = spawn(layout_worker, 1, hf_dir, [Layout()], [inputs], ids)
    captured = rank0[0]["layers"]
    assert sorted(captured) == ids
    model = load_hf_model(hf_dir)
    ref = hf_reference(model, inputs, list(range(8)))
    valid = ref["valid"]
    for i in ids:
        exact = (captured[i] - ref[f"layer{i}"]).abs()[valid].max().item()
        assert exact < 1e-5, f"capture {i} is not the output of layer {i}"
        for neighbour in (i - 1, i + 1):
            if 0 <= neighbour < 8:
                off = (captured[i] - ref[f"layer{neighbour}"]).abs()[valid].max().item()
                assert off > 1e-2, f"capture {i} is indistinguishable from layer {neighbour}: the test would miss an off-by-one"
    # and in a pipeline split the owner stage must hold it (layer 2 is on stage 1 of PP4)
    (report,) = run_verification(hf_dir, [Layout(pp=4)], 4, [inputs], capture_layer_ids=ids)
    assert report.features < 1e-5 and report.shards_ok
