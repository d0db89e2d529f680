"""Fused hidden-state projection against its reference (cat + fc + RMSNorm): outputs and every gradient."""

import pytest
import torch

from specforge_mcore.errors import UserError
from specforge_mcore.kernels.projection import fused_projection, projection_reference

EPS = 1e-6
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# The interpreter rounds fp32 -> bf16 by truncation (a GPU rounds to nearest): one more ulp per rounding.
INTERPRETER_TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2}


def assert_close(actual, expected, tol, what):
    actual, expected = actual.float(), expected.float()
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= tol * max(scale, 1e-30), f"{what}: max error {err:.3g}, max |expected| {scale:.3g}, tol {tol}"


def make_inputs(T, hidden_t, hidden, per_layer_norm, dtype, input_grad, device="cpu", lead=()):
    gen = torch.Generator().manual_seed(T * 1000 + hidden_t)
    hiddens = [torch.randn(*lead, T, hidden_t, generator=gen).to(device, dtype).requires_grad_(input_grad)
               for _ in range(3)]
    fc = (torch.randn(hidden, 3 * hidden_t, generator=gen) / (3 * hidden_t) ** 0.5).to(device, dtype).requires_grad_()
    norm = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device, dtype).requires_grad_()
    layer_norms = None
    if per_layer_norm:
        layer_norms = [(1 + 0.1 * torch.randn(hidden_t, generator=gen)).to(device, dtype).requires_grad_()
                       for _ in range(3)]
    return hiddens, fc, norm, layer_norms


def run(impl, inputs, used="both", chunk_tokens=16):
    """Outputs and gradients of ``sum(g * a) + sum(g_norm * b)`` (fixed random a, b)."""
    hiddens, fc, norm, layer_norms = inputs
    leaves = [t for t in [*hiddens, fc, norm, *(layer_norms or [])] if t.requires_grad]
    for t in leaves:
        t.grad = None
    g, g_norm = fused_projection(hiddens, fc, norm, EPS, layer_norms, impl=impl, chunk_tokens=chunk_tokens)
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(g.shape, generator=gen).to(g.device, g.dtype)
    b = torch.randn(g.shape, generator=gen).to(g.device, g.dtype)
    loss = {"both": (g * a).sum() + (g_norm * b).sum(), "norm": (g_norm * b).sum(), "residual": (g * a).sum()}[used]
    loss.backward()
    return {"g": g.detach(), "g_norm": g_norm.detach(), **{f"grad{i}": t.grad for i, t in enumerate(leaves)}}


def compare(impl, inputs, tol, **kwargs):
    expected = run("reference", inputs, **kwargs)
    actual = run(impl, inputs, **kwargs)
    assert actual.keys() == expected.keys()
    for name in expected:
        # Autograd leaves a weight outside the used graph at None; the fused paths report zeros.
        want = expected[name] if expected[name] is not None else torch.zeros_like(actual[name])
        assert_close(actual[name], want, tol, f"{impl} {name}")


# T=37 is not a multiple of the chunk (16) nor of the Triton tiles; H=40 and Ht=24 are not powers of two.
CASES = [
    # T, Ht, H, per-layer norm, input grads, dtype, outputs used
    (37, 24, 40, False, True, torch.float32, "both"),
    (37, 24, 40, True, True, torch.float32, "both"),
    (37, 24, 40, True, False, torch.float32, "norm"),
    (32, 24, 40, False, False, torch.float32, "residual"),
    (1, 24, 40, True, True, torch.float32, "both"),
    (37, 24, 40, True, True, torch.bfloat16, "both"),
]


@pytest.mark.parametrize("T,hidden_t,hidden,per_layer_norm,input_grad,dtype,used", CASES)
def test_chunked_matches_reference(T, hidden_t, hidden, per_layer_norm, input_grad, dtype, used):
    inputs = make_inputs(T, hidden_t, hidden, per_layer_norm, dtype, input_grad)
    compare("chunked", inputs, TOL[dtype], used=used)


def test_chunked_matches_reference_at_a_realistic_shape():
    inputs = make_inputs(2048, 768, 768, True, torch.float32, True)
    compare("chunked", inputs, TOL[torch.float32], chunk_tokens=1024)


def test_reference_is_cat_fc_norm():
    """The reference itself: EAGLE-3.1 norms, then fc over low|mid|high, then hidden_norm (Llama RMSNorm)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hiddens, fc, norm, layer_norms = make_inputs(5, 8, 12, True, torch.float32, False)

    def llama_norm(x, w):
        module = LlamaRMSNorm(x.shape[-1], eps=EPS)
        module.weight.data.copy_(w.detach())
        return module(x)

    g, g_norm = projection_reference(hiddens, fc, norm, EPS, layer_norms)
    normed = [llama_norm(h, w) for h, w in zip(hiddens, layer_norms)]
    expected = normed[0] @ fc[:, :8].t() + normed[1] @ fc[:, 8:16].t() + normed[2] @ fc[:, 16:].t()
    assert_close(g, expected, 1e-6, "g")
    assert_close(g_norm, llama_norm(expected, norm), 1e-6, "g_norm")


def test_leading_dims_are_kept():
    inputs = make_inputs(9, 8, 12, False, torch.float32, True, lead=(2,))
    g, g_norm = fused_projection(*inputs[:3], EPS, impl="chunked", chunk_tokens=4)
    ref = projection_reference(*inputs[:3], EPS)
    assert g.shape == g_norm.shape == (2, 9, 12)
    assert_close(g, ref[0], 1e-5, "g")
    assert_close(g_norm, ref[1], 1e-5, "g_norm")


def test_path_selection_and_errors():
    inputs = make_inputs(4, 8, 12, False, torch.float32, False)
    with pytest.raises(UserError, match="unknown implementation"):
        fused_projection(*inputs[:3], EPS, impl="fast")
    with pytest.raises(UserError, match="Triton runs only on CUDA"):
        fused_projection(*inputs[:3], EPS, impl="triton")
    with pytest.raises(ValueError, match="fc.weight has shape"):
        fused_projection(inputs[0], inputs[1][:, :-1], inputs[2], EPS)
    g_auto, _ = fused_projection(*inputs[:3], EPS, impl="auto")
    g_chunked, _ = fused_projection(*inputs[:3], EPS, impl="chunked")
    assert torch.equal(g_auto, g_chunked)


def test_chunked_saves_no_concatenation():
    """Backward keeps inputs, g and weights only: no [T, 3*Ht] tensor is saved by the fused path."""
    hiddens, fc, norm, layer_norms = make_inputs(64, 32, 16, True, torch.float32, True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        fused_projection(hiddens, fc, norm, EPS, layer_norms, impl="chunked")
    assert (64, 96) not in saved
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        projection_reference(hiddens, fc, norm, EPS, layer_norms)
    assert (64, 96) in saved  # the check above can see a concatenation when there is one


# ----------------------------------------------------------------------------------------------
# Triton: under the interpreter here (child pytest), on the GPU where there is one
# ----------------------------------------------------------------------------------------------


def test_under_triton_interpreter(run_interpreted):
    run_interpreted()


@pytest.mark.parametrize("T,hidden_t,hidden,per_layer_norm,input_grad,dtype,used", CASES)
def test_triton_interpreted_matches_reference(T, hidden_t, hidden, per_layer_norm, input_grad, dtype, used):
    inputs = make_inputs(T, hidden_t, hidden, per_layer_norm, dtype, input_grad)
    compare("triton", inputs, INTERPRETER_TOL[dtype], used=used)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_layer_norm", [False, True])
def test_triton_on_gpu_matches_reference(dtype, per_layer_norm):
    inputs = make_inputs(1000, 512, 768, per_layer_norm, dtype, True, device="cuda")
    compare("triton", inputs, TOL[dtype])
    compare("auto", inputs, TOL[dtype])


# ----------------------------------------------------------------------------------------------
# The dtype policy (docs/design.md §9): bf16 activations, fp32 master weights, with or without autocast
# ----------------------------------------------------------------------------------------------


def policy_inputs(device="cpu", per_layer_norm=True):
    """What the trainer hands the projection: captured layers in bf16, fc and norms as fp32 masters."""
    hiddens, fc, norm, layer_norms = make_inputs(37, 24, 40, per_layer_norm, torch.bfloat16, True, device=device)
    masters = [t.detach().float().requires_grad_() for t in [fc, norm, *(layer_norms or [])]]
    return hiddens, masters[0], masters[1], (masters[2:] or None)


def check_policy(impl, device, tol):
    inputs = policy_inputs(device)
    expected = run("reference", inputs)
    actual = run(impl, inputs)
    assert actual["g"].dtype == actual["g_norm"].dtype == torch.bfloat16, "outputs are in the activations' dtype"
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, f"{impl} {name}: gradient dtype"
        assert_close(actual[name], expected[name], tol, f"{impl} {name} (bf16 activations, fp32 weights)")
    # Weights' gradients come back in the weights' dtype (fp32), accumulated in fp32.
    assert all(actual[f"grad{i}"].dtype == torch.float32 for i in range(3, 8))
    with torch.autocast(device, dtype=torch.bfloat16):
        under_autocast = run(impl, inputs)
    for name in expected:
        assert torch.equal(under_autocast[name], actual[name]), f"{impl} {name} changes under autocast"


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_dtype_policy_bf16_activations_fp32_weights(impl):
    check_policy(impl, "cpu", TOL[torch.bfloat16])


def test_triton_interpreted_dtype_policy():
    check_policy("triton", "cpu", INTERPRETER_TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_dtype_policy_on_gpu(impl):
    check_policy(impl, "cuda", TOL[torch.bfloat16])
