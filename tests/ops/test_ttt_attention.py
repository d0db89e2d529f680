"""The csrc TTT attention op (docs/design.md §4 attention pattern) against a naive reference.

The naive reference below shares no code with the op or the draft backends: for every query it lists,
in Python, the keys it may see (its document's step-0 keys up to itself, then its own diagonal key of
each earlier step), gathers them, and takes a plain softmax over them.
"""

import pytest
import torch

from specforge_mcore.bench.common import peak_memory_bytes
from specforge_mcore.ops import ttt_attention as op


def naive_ttt_attention(q, k0, v0, kd, vd, cu_seqlens, scale):
    """(out [T, Hq, D], lse [Hq, T]) in fp32, differentiable."""
    tokens, q_heads, dim = q.shape
    steps = kd.shape[0]
    kv_of_head = torch.arange(q_heads) // (q_heads // k0.shape[1])
    bounds = [int(b) for b in cu_seqlens]
    # Rows of the key table: the T step-0 keys, then step j's key of position t at T + (j - 1) T + t.
    seen = []
    for t in range(tokens):
        start = max(b for b in bounds if b <= t)
        seen.append(list(range(start, t + 1)) + [tokens + j * tokens + t for j in range(steps)])
    width = max(len(keys) for keys in seen)
    index = torch.tensor([keys + [0] * (width - len(keys)) for keys in seen])  # [T, L]
    valid = torch.tensor([[True] * len(keys) + [False] * (width - len(keys)) for keys in seen])
    key_table = torch.cat([k0.unsqueeze(0), kd]).flatten(0, 1)[:, kv_of_head].float()  # [(1+i)T, Hq, D]
    value_table = torch.cat([v0.unsqueeze(0), vd]).flatten(0, 1)[:, kv_of_head].float()
    scores = torch.einsum("thd,tlhd->thl", q.float(), key_table[index]) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    out = torch.einsum("thl,tlhd->thd", torch.softmax(scores, dim=-1), value_table[index])
    return out, torch.logsumexp(scores, dim=-1).transpose(0, 1)


def make_inputs(cu_seqlens, q_heads, kv_heads, dim, steps, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = cu_seqlens[-1]

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    tensors = [rand(tokens, q_heads, dim), rand(tokens, kv_heads, dim), rand(tokens, kv_heads, dim),
               rand(steps, tokens, kv_heads, dim), rand(steps, tokens, kv_heads, dim)]
    weight = torch.randn(tokens, q_heads, dim, generator=gen).to(device=device, dtype=dtype)
    return tensors, torch.tensor(cu_seqlens, dtype=torch.int32, device=device), weight


def run_op(tensors, cu_seqlens, weight):
    out, lse = op.ttt_attention_with_lse(*tensors, cu_seqlens)
    grads = torch.autograd.grad((out * weight).sum(), tensors)
    return out, lse, grads


def run_naive(tensors, cu_seqlens, weight):
    leaves = [t.detach().cpu().float().requires_grad_() for t in tensors]
    out, lse = naive_ttt_attention(*leaves, cu_seqlens.cpu(), tensors[0].shape[-1] ** -0.5)
    grads = torch.autograd.grad((out * weight.cpu().float()).sum(), leaves)
    return out, lse, grads


def assert_matches(got, want, atol, rtol):
    names = ["out", "lse", "dq", "dk0", "dv0", "dkd", "dvd"]
    got_flat = [got[0], got[1], *got[2]]
    want_flat = [want[0], want[1], *want[2]]
    for name, g, w in zip(names, got_flat, want_flat):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g.detach().cpu().float(), w.detach(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# Four documents per packed row, one of them a single token; T = 37 is not a multiple of the 64-row tile.
CU_SMALL = [0, 11, 12, 30, 37]


def test_extension_is_built():
    assert op.is_built(), op.build_hint()
    assert op.is_built("cpu")


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("gqa", [1, 2, 4, 8])
@pytest.mark.parametrize("steps", range(8))
def test_matches_naive_fp32(steps, gqa, head_dim):
    kv_heads = 2
    tensors, cu, weight = make_inputs(CU_SMALL, kv_heads * gqa, kv_heads, head_dim, steps, seed=steps * 10 + gqa)
    assert_matches(run_op(tensors, cu, weight), run_naive(tensors, cu, weight), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("cu_seqlens", [
    [0, 150, 151, 190, 203],  # a document spanning three query/key tiles, then a length-1 one
    [0, 1, 2, 130, 130, 197],  # two length-1 documents first, an empty one in the middle
    [0, 129],  # one document, one row past two full tiles
])
def test_matches_naive_across_tiles(cu_seqlens):
    tensors, cu, weight = make_inputs(cu_seqlens, 4, 2, 64, 3, seed=len(cu_seqlens))
    assert_matches(run_op(tensors, cu, weight), run_naive(tensors, cu, weight), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    # Inputs are rounded to the dtype, both sides accumulate in fp32; only the outputs' rounding differs.
    tensors, cu, weight = make_inputs(CU_SMALL, 8, 2, 64, 3, dtype=dtype, seed=7)
    got = run_op(tensors, cu, weight)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert all(g.dtype == dtype for g in got[2])
    assert_matches(got, run_naive(tensors, cu, weight), atol=3e-2, rtol=3e-2)


def test_extra_memory_is_linear_in_tokens():
    # fwd + bwd at T = 2048: O(T * H * D) is 0.5 MiB here; one [H, T, T] score tensor would be 32 MiB.
    tokens, heads, dim = 2048, 2, 32
    tensors, cu, weight = make_inputs([0, tokens // 2, tokens], heads, 1, dim, 2)
    peak = peak_memory_bytes(lambda: run_op(tensors, cu, weight), torch.device("cpu"))
    linear_unit = tokens * heads * dim * 4
    assert peak < 16 * linear_unit, f"peak {peak / 2**20:.1f} MiB is not O(T * H * D)"


def test_opcheck_schema_fake_and_autograd_registration():
    tensors, cu, _ = make_inputs([0, 5, 6, 13], 4, 2, 16, 2)
    torch.library.opcheck(torch.ops.specforge_mcore.ttt_attention_fwd.default, (*tensors, cu, 0.25))


def check_compiled_matches_eager(backend):
    tensors, cu, weight = make_inputs([0, 5, 6, 13], 4, 2, 16, 2)

    def loss(q, k0, v0, kd, vd):
        return (op.ttt_attention(q, k0, v0, kd, vd, cu) * weight).sum()

    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    got = torch.autograd.grad(compiled(*tensors), tensors)
    want = torch.autograd.grad(loss(*tensors), tensors)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_torch_compile_fullgraph_traces_the_op():
    # aot_eager runs the fake kernels and the autograd formula through AOTAutograd, without codegen.
    check_compiled_matches_eager("aot_eager")


@pytest.mark.slow
def test_torch_compile_fullgraph_inductor():
    check_compiled_matches_eager("inductor")


def test_bad_inputs_are_rejected():
    tensors, cu, _ = make_inputs(CU_SMALL, 3, 2, 16, 1)
    with pytest.raises(RuntimeError, match="must divide"):
        op.ttt_attention(*tensors, cu)
    tensors, cu, _ = make_inputs(CU_SMALL, 4, 2, 16, 1)
    with pytest.raises(RuntimeError, match="end at T"):
        op.ttt_attention(*tensors, torch.tensor([0, 11, 36], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="non-decreasing"):
        op.ttt_attention(*tensors, torch.tensor([0, 20, 11, 37], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        op.ttt_attention(*[t.detach().double() for t in tensors], cu)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-2)])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("steps,gqa", [(0, 1), (3, 4), (7, 8)])
def test_cuda_matches_naive(dtype, tol, head_dim, steps, gqa):
    assert op.is_built("cuda"), op.build_hint("cuda")
    for cu_seqlens in (CU_SMALL, [0, 150, 151, 190, 203]):
        tensors, cu, weight = make_inputs(cu_seqlens, 2 * gqa, 2, head_dim, steps, dtype=dtype, device="cuda")
        assert_matches(run_op(tensors, cu, weight), run_naive(tensors, cu, weight), atol=tol, rtol=tol)
