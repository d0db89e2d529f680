"""Fused vocab-parallel teacher against full-vocabulary logits: global argmax (ties included), two TP
shards against one, and memory that does not grow with the vocabulary."""

import pytest
import torch
import torch.distributed as dist

from specforge_mcore.bench.common import peak_memory_bytes
from specforge_mcore.errors import UserError
from specforge_mcore.kernels.teacher import fused_teacher, teacher_reference
from specforge_mcore.parallel import init_distributed, spawn


def make_inputs(T, hidden_t, vocab, dtype, integer=False, device="cpu", seed=0):
    """Final hidden states and the full output layer.

    ``integer``: small integer entries, so logits are exact in any summation order and ties are real.
    """
    gen = torch.Generator().manual_seed(seed)
    if integer:
        hidden = torch.randint(-2, 3, (T, hidden_t), generator=gen).float()
        weight = torch.randint(-1, 2, (vocab, hidden_t), generator=gen).float()
    else:
        hidden = torch.randn(T, hidden_t, generator=gen)
        weight = torch.randn(vocab, hidden_t, generator=gen)
    return hidden.to(device, dtype), weight.to(device, dtype)


def check_against_reference(impl, hidden, weight, vocab_start=0, **kwargs):
    expected_argmax = teacher_reference(hidden, weight, vocab_start)
    argmax = fused_teacher(hidden, weight, vocab_start, impl=impl, **kwargs)
    assert argmax.dtype == torch.int64 and argmax.shape == hidden.shape[:1]
    if hidden.dtype == torch.float32:
        assert torch.equal(argmax, expected_argmax)
    else:
        # bf16 logits tie often and differently blocked GEMMs may round a near-tie apart: the chosen id
        # must still hold the maximal logit, within one bf16 step.
        logits = (hidden @ weight.t()).float()
        chosen = logits.gather(1, (argmax - vocab_start)[:, None])[:, 0]
        assert torch.all(chosen >= logits.max(-1).values * (1 - 2 ** -7) - 1e-6)


# T=37 and V=101 are multiples of no tile.
CASES = [
    # T, Ht, V, dtype, integer (exact ties), vocab_start
    (37, 24, 101, torch.float32, False, 0),
    (37, 24, 101, torch.float32, False, 1000),
    (37, 24, 101, torch.float32, True, 0),
    (1, 24, 101, torch.float32, False, 5),
    (37, 24, 101, torch.bfloat16, False, 0),
]


@pytest.mark.parametrize("T,hidden_t,vocab,dtype,integer,vocab_start", CASES)
def test_chunked_matches_reference(T, hidden_t, vocab, dtype, integer, vocab_start):
    hidden, weight = make_inputs(T, hidden_t, vocab, dtype, integer)
    check_against_reference("chunked", hidden, weight, vocab_start, chunk_tokens=16, chunk_vocab=32)


def test_ties_go_to_the_smallest_id():
    hidden = torch.ones(3, 4)
    weight = torch.zeros(10, 4)
    weight[[2, 7, 9]] = 1.0  # three rows tie for the max
    for impl in ("reference", "chunked"):
        argmax = fused_teacher(hidden, weight, 100, impl=impl, chunk_vocab=4)
        assert argmax.tolist() == [102, 102, 102], impl


def test_chunked_matches_reference_at_a_realistic_shape():
    hidden, weight = make_inputs(1024, 512, 32000, torch.float32)
    check_against_reference("chunked", hidden, weight)


def test_leading_dims_and_errors():
    hidden, weight = make_inputs(8, 6, 20, torch.float32)
    argmax = fused_teacher(hidden.view(2, 4, 6), weight, 0, impl="chunked")
    assert argmax.shape == (2, 4) and torch.equal(argmax.reshape(-1), teacher_reference(hidden, weight, 0))
    with pytest.raises(UserError, match="Triton runs only on CUDA"):
        fused_teacher(hidden, weight, 0, impl="triton")
    with pytest.raises(ValueError, match="vocab_start must be"):
        fused_teacher(hidden, weight, -1)
    with pytest.raises(ValueError, match="does not fit"):
        fused_teacher(hidden, weight[:, :5], 0)


def test_peak_memory_is_flat_in_the_vocabulary():
    """At V=4096 and V=16384 the chunked peak stays within 10% (the reference's grows with V)."""
    cpu = torch.device("cpu")
    peaks = {}
    for vocab in (4096, 16384):
        hidden, weight = make_inputs(256, 64, vocab, torch.float32)
        peaks[vocab] = {impl: peak_memory_bytes(
            lambda: fused_teacher(hidden, weight, 0, impl=impl, chunk_tokens=128, chunk_vocab=1024), cpu)
            for impl in ("chunked", "reference")}
    assert abs(peaks[16384]["chunked"] / peaks[4096]["chunked"] - 1) <= 0.10, peaks
    assert peaks[16384]["reference"] >= 3 * peaks[4096]["reference"], peaks


# ----------------------------------------------------------------------------------------------
# Two TP shards (real gloo processes) against one shard holding the whole output layer
# ----------------------------------------------------------------------------------------------

SPLIT_AT = 50  # V=101: rank 0 owns ids 0..49, rank 1 ids 50..100 (unequal shards)


def tp_inputs(integer):
    hidden, weight = make_inputs(37, 24, 101, torch.float32, integer, seed=3)
    if integer:
        # A tie across the shard boundary: ids 10 (rank 0) and 60 (rank 1) are the best for every token.
        weight[[10, 60]] = 20.0
        hidden = hidden.abs() + 1
    return hidden, weight


def _tp_rank(rank, world, impls):
    init_distributed()
    tp_group = dist.group.WORLD
    results = {}
    for impl in impls:
        for integer in (False, True):
            hidden, weight = tp_inputs(integer)
            start = 0 if rank == 0 else SPLIT_AT
            shard = weight[:SPLIT_AT] if rank == 0 else weight[SPLIT_AT:]
            kwargs = dict(chunk_tokens=16, chunk_vocab=16) if impl == "chunked" else {}
            results[impl, integer] = fused_teacher(hidden, shard, start, group=tp_group, impl=impl, **kwargs)
    return results


def check_tp_results(per_rank):
    for integer in (False, True):
        hidden, weight = tp_inputs(integer)
        expected_argmax = teacher_reference(hidden, weight, 0)
        if integer:
            assert torch.all(expected_argmax == 10)
        else:
            assert (expected_argmax < SPLIT_AT).any() and (expected_argmax >= SPLIT_AT).any(), "both shards win"
        for results in per_rank:
            for (impl, case), argmax in results.items():
                if case == integer:
                    assert torch.equal(argmax, expected_argmax), (impl, integer)


def test_two_tp_shards_match_one(spawnable):
    check_tp_results(spawn(_tp_rank, 2, ("chunked", "reference"), threads=1))


# ----------------------------------------------------------------------------------------------
# Triton: under the interpreter here (child pytest), on the GPU where there is one
# ----------------------------------------------------------------------------------------------


def test_under_triton_interpreter(run_interpreted):
    run_interpreted()


@pytest.mark.parametrize("T,hidden_t,vocab,dtype,integer,vocab_start", CASES)
def test_triton_interpreted_matches_reference(T, hidden_t, vocab, dtype, integer, vocab_start):
    hidden, weight = make_inputs(T, hidden_t, vocab, dtype, integer)
    check_against_reference("triton", hidden, weight, vocab_start)


def test_triton_interpreted_two_tp_shards_match_one(spawnable):
    check_tp_results(spawn(_tp_rank, 2, ("triton",), threads=1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_gpu_matches_reference(dtype):
    hidden, weight = make_inputs(1500, 1024, 151936, dtype, device="cuda")
    check_against_reference("triton", hidden, weight)
    check_against_reference("auto", hidden, weight)
