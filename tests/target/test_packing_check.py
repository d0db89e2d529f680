"""The start-up check that packed documents never see each other inside the target
(specforge_mcore/target/packing_check.py): it passes on the real host, and a mask that lets documents
mix (a plain causal mask) or an attention path that ignores the dense mask (Transformer Engine) is
refused with the attention path named."""

import types

import pytest
import torch

from specforge_mcore.errors import UserError
from specforge_mcore.parallel import spawn
from specforge_mcore.target import packing_check
from specforge_mcore.target.random import random_target


def _causal_only(document_ids):
    """The leak: causal over the whole row, documents ignored."""
    b, s = document_ids.shape
    return ~torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()[None, None].expand(b, 1, s, s)


def _check_worker(rank, world, hf_dir, layout_kwargs, dtype):
    """Build the host, run the check as the trainer would, then again with a leaking document mask."""
    from specforge_mcore.parallel import init_distributed
    from specforge_mcore.target import host as host_module
    from specforge_mcore.target.build import Layout, init_model_parallel
    from specforge_mcore.target.host import TargetHost

    init_distributed()
    layout = Layout(**layout_kwargs)
    init_model_parallel(layout)
    host = TargetHost(hf_dir, layout, dtype=dtype)
    report = packing_check.check_document_isolation(host)
    host_module.attention_mask = _causal_only
    try:
        packing_check.check_document_isolation(host)
        refused = None
    except UserError as exc:
        refused = str(exc)
    return dict(worst=report.worst, tolerance=report.tolerance, path=report.attention_path, refused=refused)


def _assert_passes_then_refuses(results, tolerance):
    for r in results:
        assert r["tolerance"] == tolerance
        assert all(w <= tolerance for w in r["worst"]), r
        assert "local spec with a dense document mask" in r["path"]
        assert r["refused"] is not None, "a plain causal mask over two packed documents was not caught"
        assert "packed documents mix inside the target" in r["refused"]
        assert "local spec with a dense document mask" in r["refused"] and "refusing to train" in r["refused"]
    assert len({r["refused"] for r in results}) == 1, "the ranks reached different verdicts"


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_tiny_target_passes_and_a_leaking_mask_is_refused(dtype, tolerance):
    hf_dir = random_target("qwen3_moe")
    _assert_passes_then_refuses(spawn(_check_worker, 1, hf_dir, {}, dtype, threads=1), tolerance)


def test_every_rank_agrees_under_pipeline_parallelism():
    """PP2: only the last stage has logits; the first stage must reach the same verdict."""
    hf_dir = random_target("qwen3_moe")
    _assert_passes_then_refuses(spawn(_check_worker, 2, hf_dir, dict(pp=2), torch.float32, threads=1), 1e-4)


def test_the_batch_packs_two_documents_and_runs_each_alone():
    batch = packing_check.packed_and_alone(vocab_size=100, seq_len=14)
    a, b = packing_check.DOCUMENT_LENGTHS
    assert batch.input_ids.shape == (3, 14)
    assert torch.equal(batch.input_ids[0, :a], batch.input_ids[1, :a])
    assert torch.equal(batch.input_ids[0, a:a + b], batch.input_ids[2, :b])
    assert batch.document_ids[0].tolist() == [0] * a + [1] * b + [2] * 2
    assert batch.position_ids[0].tolist() == list(range(a)) + list(range(b)) + [0, 1]
    assert batch.document_ids[2].tolist() == [0] * b + [1] * (14 - b)


def _host_with_core_attention(core_attention):
    layer = types.SimpleNamespace(self_attention=types.SimpleNamespace(core_attention=core_attention))
    return types.SimpleNamespace(model=types.SimpleNamespace(decoder=types.SimpleNamespace(layers=[layer])))


def test_transformer_engine_with_a_dense_mask_is_refused_before_running():
    """TE's causal mask type ignores the host's dense mask (Megatron-LM issue #2357); without THD packing the
    check refuses without running anything (every rank decides alike from the spec it built)."""
    TEDotProductAttention = type("TEDotProductAttention", (), {"__module__": "megatron.core.extensions.transformer_engine"})
    te = TEDotProductAttention()
    te.attn_mask_type = types.SimpleNamespace(name="causal")
    assert packing_check.is_transformer_engine(te)
    with pytest.raises(UserError) as caught:
        packing_check.check_document_isolation(_host_with_core_attention(te))
    message = str(caught.value)
    assert "Transformer Engine's TEDotProductAttention with attn_mask_type=causal" in message
    assert "Megatron-LM issue #2357" in message and "qkv_format='thd'" in message


def test_tolerance_follows_the_dtype_and_fp8():
    def host(dtype, fp8_mode=None, note=None):
        return types.SimpleNamespace(dtype=dtype, fp8_mode=fp8_mode, weights_note=note)

    assert packing_check.tolerance_for(host(torch.float32)) == 1e-4
    assert packing_check.tolerance_for(host(torch.bfloat16)) == 3e-2
    assert packing_check.tolerance_for(host(torch.float32, "dequantize", "dequantized")) == 1e-4
    assert packing_check.tolerance_for(host(torch.bfloat16, "native", "fp8")) == packing_check.FP8_TOLERANCE
    assert packing_check.tolerance_for(host(torch.bfloat16, None, "quantized")) == packing_check.FP8_TOLERANCE
