"""The draft's TTT attention backends (docs/design.md §4) and how one is chosen.

The naive reference here builds the visibility of every (query, key) pair with Python loops and attends
in float64, one head at a time; it shares no code with the backends.
"""

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from specforge_mcore.config import load_config
from specforge_mcore.draft import attention
from specforge_mcore.errors import UserError
from specforge_mcore.ops import ttt_attention as op


def naive_attention(q, k0, v0, kd, vd, cu_seqlens):
    tokens, q_heads, dim = q.shape
    steps, group = kd.shape[0], q_heads // k0.shape[1]
    bounds = [int(b) for b in cu_seqlens]
    doc = [max(i for i, b in enumerate(bounds[:-1]) if b <= t) for t in range(tokens)]
    # Columns: the T step-0 keys, then one column per diagonal step (the query's own position).
    allowed = torch.zeros(tokens, tokens + steps, dtype=torch.bool)
    for t in range(tokens):
        for s in range(tokens):
            allowed[t, s] = doc[s] == doc[t] and s <= t
        allowed[t, tokens:] = True
    out = torch.empty(tokens, q_heads, dim, dtype=torch.float64)
    for h in range(q_heads):
        g = h // group
        qh = q[:, h].double()
        scores = torch.cat([qh @ k0[:, g].double().T, torch.einsum("td,jtd->tj", qh, kd[:, :, g].double())], 1)
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")) * dim ** -0.5, dim=1)
        out[:, h] = probs[:, :tokens] @ v0[:, g].double() + torch.einsum("tj,jtd->td", probs[:, tokens:],
                                                                         vd[:, :, g].double())
    return out


def make_inputs(cu_seqlens, q_heads, kv_heads, dim, steps, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = cu_seqlens[-1]

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    tensors = [rand(tokens, q_heads, dim), rand(tokens, kv_heads, dim), rand(tokens, kv_heads, dim),
               rand(steps, tokens, kv_heads, dim), rand(steps, tokens, kv_heads, dim)]
    return tensors, torch.tensor(cu_seqlens, dtype=torch.int32, device=device)


def grads_of(fn, tensors, cu, weight):
    out = fn(*tensors, cu, None)
    return [out, *torch.autograd.grad((out * weight).sum(), tensors)]


CU = [0, 7, 8, 20, 29]  # four documents, one of length 1


@pytest.fixture(autouse=True)
def fresh_parity_cache():
    attention._parity_results.clear()
    yield
    attention._parity_results.clear()


@pytest.mark.parametrize("steps", [0, 1, 4])
@pytest.mark.parametrize("q_heads,kv_heads", [(2, 2), (4, 1), (8, 2)])
def test_reference_backend_matches_naive(steps, q_heads, kv_heads):
    tensors, cu = make_inputs(CU, q_heads, kv_heads, 16, steps, seed=steps)
    leaves = [t.detach().double().requires_grad_() for t in tensors]
    weight = torch.randn(CU[-1], q_heads, 16, dtype=torch.float64)
    want = naive_attention(*leaves, cu)
    want_grads = torch.autograd.grad((want * weight).sum(), leaves)
    got = grads_of(attention.reference_attention, tensors, cu, weight.float())
    torch.testing.assert_close(got[0], want.float(), atol=1e-5, rtol=1e-5)
    for g, w in zip(got[1:], want_grads):
        torch.testing.assert_close(g, w.float(), atol=1e-5, rtol=1e-5)


def test_reference_backend_keeps_the_input_dtype():
    tensors, cu = make_inputs(CU, 4, 2, 16, 2, dtype=torch.bfloat16)
    out = attention.reference_attention(*tensors, cu)
    assert out.dtype == torch.bfloat16
    want = naive_attention(*[t.detach() for t in tensors], cu)
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", ["reference", "csrc"])
def test_backends_take_bf16_and_match_the_fp32_reference(backend):
    """bf16 q/k/v through forward and backward: output and gradients stay bf16 and within bf16 rounding of
    the fp32 reference (relative to each tensor's magnitude)."""
    tensors, cu = make_inputs(CU, 8, 2, 32, 3, seed=5)
    weight = torch.randn(CU[-1], 8, 32)
    want = grads_of(attention.reference_attention, tensors, cu, weight)
    low = [t.detach().bfloat16().requires_grad_() for t in tensors]
    got = grads_of(getattr(attention, f"{backend}_attention"), low, cu, weight.bfloat16())
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        relative = ((g.float() - w).abs().max() / w.abs().max()).item()
        assert relative < 2e-2, (backend, relative)


def test_csrc_backend_matches_reference_backend():
    tensors, cu = make_inputs(CU, 8, 2, 32, 3, seed=3)
    weight = torch.randn(CU[-1], 8, 32)
    got = grads_of(attention.csrc_attention, tensors, cu, weight)
    want = grads_of(attention.reference_attention, tensors, cu, weight)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


def test_auto_picks_csrc_on_cpu_after_the_parity_check(caplog):
    assert op.is_built("cpu"), op.build_hint("cpu")
    with caplog.at_level(logging.INFO, logger=attention.__name__):
        chosen = attention.select_attention_backend("auto", "cpu")
    assert chosen is attention.csrc_attention
    assert "csrc" in caplog.text and "parity check passed" in caplog.text
    ok, why = attention._parity_results["cpu"]
    assert ok, why


def test_auto_falls_back_to_reference_without_the_extension(monkeypatch, caplog):
    monkeypatch.setattr(op, "_LOAD_ERROR", "ImportError: specforge_mcore._C not found")
    with caplog.at_level(logging.INFO, logger=attention.__name__):
        chosen = attention.select_attention_backend("auto", "cpu")
    assert chosen is attention.reference_attention
    assert "reference" in caplog.text and "pip install" in caplog.text
    with pytest.raises(op.ExtensionNotBuiltError, match="csrc"):
        attention.select_attention_backend("csrc", "cpu")


def test_a_csrc_op_that_fails_parity_is_not_used(monkeypatch):
    def off_by_a_bit(q, k0, v0, kd, vd, cu_seqlens, scale=None):
        return op.ttt_attention(q, k0, v0, kd, vd, cu_seqlens, scale) * 1.01

    monkeypatch.setattr(attention, "csrc_attention", off_by_a_bit)
    assert attention.select_attention_backend("auto", "cpu") is attention.reference_attention
    with pytest.raises(RuntimeError, match="parity check"):
        attention.select_attention_backend("csrc", "cpu")


def test_choose_backend_rule_per_device_type():
    """auto: FlexAttention on CUDA whatever the csrc op can do; on CPU the csrc op when it is built and passed
    its parity check, else the reference; explicit names are taken as asked."""
    for csrc_ok in (True, False):
        backend, reason = attention.choose_backend("auto", "cuda", csrc_ok, "parity ok")
        assert backend == "flex"
        assert "scalar-FMA kernel with no tensor cores that has never been benchmarked on a GPU" in reason
        assert "draft.attention_backend=csrc" in reason
    backend, reason = attention.choose_backend("auto", "cpu", True, "max diff 1e-7")
    assert backend == "csrc" and "parity check passed" in reason and "max diff 1e-7" in reason
    backend, reason = attention.choose_backend("auto", "cpu", False, "specforge_mcore._C did not load")
    assert backend == "reference" and "did not load" in reason
    assert attention.choose_backend("auto", "mps", True)[0] == "reference"
    backend, reason = attention.choose_backend("csrc", "cuda", False)
    assert backend == "csrc" and "never been benchmarked on a GPU" in reason
    assert attention.choose_backend("flex", "cuda", False)[0] == "flex"
    assert attention.choose_backend("reference", "cuda", True)[0] == "reference"
    assert attention.choose_backend("csrc", "cpu", True)[0] == "csrc"
    with pytest.raises(UserError, match="needs a CUDA device"):
        attention.choose_backend("flex", "cpu", True)
    with pytest.raises(UserError, match="not one of"):
        attention.choose_backend("sdpa", "cuda", True)


def test_the_cli_logging_shows_the_choice_on_rank_0_only():
    """The CLI configures logging once: the backend line reaches stderr as `specforge_mcore: ...` on rank 0
    (once, however often it is configured) and not on other ranks."""
    script = textwrap.dedent("""
        from specforge_mcore.cli import configure_logging
        from specforge_mcore.draft.attention import select_attention_backend
        configure_logging()
        configure_logging()
        select_attention_backend("reference", "cpu")
    """)
    for rank, expected in (("0", 1), ("1", 0)):
        env = dict(os.environ, RANK=rank)
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if "draft attention backend" in line]
        assert len(lines) == expected, proc.stderr
        if expected:
            assert lines[0].startswith("specforge_mcore: draft attention backend: reference on cpu"), lines


def test_explicit_backends_and_bad_names():
    assert attention.select_attention_backend("reference", "cpu") is attention.reference_attention
    assert attention.select_attention_backend("csrc", torch.device("cpu")) is attention.csrc_attention
    with pytest.raises(UserError, match="needs a CUDA device"):
        attention.select_attention_backend("flex", "cpu")
    with pytest.raises(UserError, match="not one of"):
        attention.select_attention_backend("sdpa", "cpu")
    tensors, cu = make_inputs(CU, 2, 2, 16, 1)
    with pytest.raises(UserError, match="needs a CUDA device"):
        attention.flex_attention_ttt(*tensors, cu)


def test_config_option_names_the_backends():
    assert load_config(overrides=["draft.attention_backend=csrc"]).draft.attention_backend == "csrc"
    assert load_config().draft.attention_backend == "auto"
    with pytest.raises(UserError, match="attention_backend"):
        load_config(overrides=["draft.attention_backend=sdpa"])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "csrc"])
def test_cuda_backends_match_reference(backend):
    fn = attention.select_attention_backend(backend, "cuda")
    for steps in (0, 3, 7):
        tensors, cu = make_inputs([0, 100, 101, 250, 300], 8, 2, 64, steps, device="cuda", seed=steps)
        weight = torch.randn(300, 8, 64, device="cuda")
        got = grads_of(fn, tensors, cu, weight)
        want = grads_of(attention.reference_attention, tensors, cu, weight)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "csrc"])
def test_cuda_backends_take_bf16(backend):
    fn = attention.select_attention_backend(backend, "cuda")
    tensors, cu = make_inputs([0, 100, 101, 250, 300], 8, 2, 64, 3, device="cuda", seed=11)
    weight = torch.randn(300, 8, 64, device="cuda")
    want = grads_of(attention.reference_attention, tensors, cu, weight)
    low = [t.detach().bfloat16().requires_grad_() for t in tensors]
    for g, w in zip(grads_of(fn, low, cu, weight.bfloat16()), want):
        assert g.dtype == torch.bfloat16
        assert ((g.float() - w).abs().max() / w.abs().max()).item() < 2e-2


@pytest.mark.gpu
def test_auto_picks_flex_on_cuda(caplog):
    with caplog.at_level(logging.INFO, logger=attention.__name__):
        assert attention.select_attention_backend("auto", "cuda") is attention.flex_attention_ttt
    assert "never been benchmarked on a GPU" in caplog.text
    assert not attention._parity_results  # the csrc CUDA op is not even tried
