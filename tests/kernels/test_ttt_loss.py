"""Fused draft head + TTT loss against the materialised-logits reference: loss, accuracy, gradients, memory."""

import pytest
import torch

from specforge_mcore.bench.common import peak_memory_bytes
from specforge_mcore.errors import UserError
from specforge_mcore.kernels._common import rms_norm
from specforge_mcore.kernels.ttt_loss import fused_ttt_step_loss, ttt_step_loss_reference

EPS = 1e-6
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# The interpreter rounds fp32 -> bf16 by truncation (a GPU rounds to nearest): one more ulp per rounding.
INTERPRETER_TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2}


def assert_close(actual, expected, tol, what):
    actual, expected = actual.float(), expected.float()
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= tol * max(scale, 1e-30), f"{what}: max error {err:.3g}, max |expected| {scale:.3g}, tol {tol}"


def make_inputs(T, hidden, vocab, dtype, mask="random", device="cpu", lead=()):
    """Draft head inputs and a teacher (target final hidden + t2d rows of its output layer) that agrees
    with the draft often enough for accuracy to matter."""
    gen = torch.Generator().manual_seed(T * 7 + vocab)
    o = torch.randn(*lead, T, hidden, generator=gen).to(device, dtype).requires_grad_()
    norm = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device, dtype).requires_grad_()
    head = (torch.randn(vocab, hidden, generator=gen) / hidden ** 0.25).to(device, dtype).requires_grad_()
    position_mask = {
        "random": torch.rand(*lead, T, generator=gen) > 0.3,
        "none": torch.zeros(*lead, T, dtype=torch.bool),
        "all": torch.ones(*lead, T, dtype=torch.bool),
    }[mask].to(device)
    with torch.no_grad():
        normed = rms_norm(o, norm, EPS).float()
        # A target with its own width (Ht = H + 8) whose first H features echo the draft's.
        extra = torch.randn(*lead, T, 8, generator=gen).to(device)
        t_hidden = torch.cat([normed + 0.5 * torch.randn(normed.shape, generator=gen).to(device), extra], -1)
        t_weight = torch.cat([head.float(), torch.randn(vocab, 8, generator=gen).to(device)], -1)
        kwargs = dict(teacher_hidden=t_hidden.to(dtype), teacher_weight=t_weight.to(dtype))
    return (o, norm, head, position_mask), kwargs


def run(impl, inputs, teacher, weight=0.37, chunk_tokens=16, objective="soft_ce"):
    o, norm, head, position_mask = inputs
    for t in (o, norm, head):
        t.grad = None
    loss, correct = fused_ttt_step_loss(o, norm, head, EPS, position_mask, weight, impl=impl,
                                        chunk_tokens=chunk_tokens, objective=objective, **teacher)
    (1.7 * loss).backward()
    return dict(loss=loss.detach(), correct=correct, d_o=o.grad, d_norm=norm.grad, d_head=head.grad)


def hits(impl, inputs, teacher, chunk_tokens=16):
    o, norm, head, position_mask = inputs
    with torch.no_grad():
        return fused_ttt_step_loss(o, norm, head, EPS, position_mask, 0.37, impl=impl, chunk_tokens=chunk_tokens,
                                   return_hits=True, **teacher)[1]


def compare(impl, inputs, teacher, tol, **kwargs):
    expected = run("reference", inputs, teacher, **kwargs)
    actual = run(impl, inputs, teacher, **kwargs)
    per_position = hits(impl, inputs, teacher, kwargs.get("chunk_tokens", 16))
    assert per_position.dtype == torch.bool and per_position.shape == inputs[3].shape
    assert int(per_position.sum()) == int(actual["correct"]) and not bool((per_position & ~inputs[3]).any())
    if tol <= 1e-5:
        assert torch.equal(per_position, hits("reference", inputs, teacher)), "per-position hits"
    assert actual["loss"].dtype == torch.float32 and actual["correct"].dtype == torch.int64
    assert not actual["correct"].requires_grad
    if tol <= 1e-5:
        assert int(actual["correct"]) == int(expected["correct"]), "accuracy count"
    else:  # bf16: a near-tie may flip between differently blocked GEMMs
        assert abs(int(actual["correct"]) - int(expected["correct"])) <= 2, "accuracy count"
    for name in ("loss", "d_o", "d_norm", "d_head"):
        assert_close(actual[name], expected[name], tol, f"{impl} {name}")
    return expected


# T=37 is not a multiple of the chunk (16) nor of the Triton tiles; Vd=50 is not a power of two.
CASES = [
    # T, H, Vd, dtype, mask
    (37, 40, 50, torch.float32, "random"),
    (37, 40, 50, torch.float32, "none"),
    (1, 40, 50, torch.float32, "all"),
    (37, 40, 50, torch.bfloat16, "random"),
]


@pytest.mark.parametrize("T,hidden,vocab,dtype,mask", CASES)
def test_chunked_matches_reference(T, hidden, vocab, dtype, mask):
    inputs, kwargs = make_inputs(T, hidden, vocab, dtype, mask)
    expected = compare("chunked", inputs, kwargs, TOL[dtype])
    if mask == "none":
        assert float(expected["loss"]) == 0.0 and int(expected["correct"]) == 0
    if mask == "random" and dtype == torch.float32:
        assert int(expected["correct"]) > 0  # accuracy is exercised, not trivially zero


def float64_loss_and_grads(inputs, teacher, weight=0.37):
    """The contract evaluated in float64 throughout (the reference computes in fp32, as the trainer does)."""
    o, norm, head, mask = [t.detach().double().requires_grad_(t.dtype != torch.bool) for t in inputs]
    normed = norm * o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + EPS)
    p = torch.softmax(teacher["teacher_hidden"].double() @ teacher["teacher_weight"].double().t(), -1)
    per_position = -(p * torch.log_softmax(normed @ head.t(), -1)).sum(-1)
    loss = weight * (per_position * mask).sum()
    (1.7 * loss).backward()
    return dict(loss=loss.detach(), d_o=o.grad, d_norm=norm.grad, d_head=head.grad)


def test_chunked_is_as_accurate_as_the_reference_at_a_realistic_shape():
    """Vd=32000 sums are long: both fp32 paths are held to a float64 evaluation of the same inputs."""
    inputs, kwargs = make_inputs(160, 256, 32000, torch.float32)
    exact = float64_loss_and_grads(inputs, kwargs)
    reference = run("reference", inputs, kwargs)
    chunked = run("chunked", inputs, kwargs, chunk_tokens=96)
    assert int(chunked["correct"]) == int(reference["correct"]) > 0
    for name in ("loss", "d_o", "d_norm", "d_head"):
        scale = exact[name].abs().max().item()
        ref_err = (reference[name].double() - exact[name]).abs().max().item()
        err = (chunked[name].double() - exact[name]).abs().max().item()
        assert err <= max(2 * ref_err, 1e-6 * scale), f"{name}: chunked error {err:.3g}, reference error {ref_err:.3g}"


def test_fully_masked_rows_get_no_gradient():
    inputs, kwargs = make_inputs(37, 40, 50, torch.float32)
    grads = run("chunked", inputs, kwargs)
    masked = ~inputs[3]
    assert masked.any()
    assert torch.all(grads["d_o"][masked] == 0)


def test_weight_as_tensor_and_leading_dims():
    inputs, kwargs = make_inputs(9, 16, 20, torch.float32, lead=(2,))
    compare("chunked", inputs, kwargs, TOL[torch.float32], weight=torch.tensor(0.25))


def test_reference_is_soft_cross_entropy():
    """The reference against the contract written out: masked sum of -sum p log softmax(z), times weight."""
    (o, norm, head, mask), kwargs = make_inputs(6, 8, 10, torch.float32)
    loss, hits = ttt_step_loss_reference(o, norm, head, EPS, mask, 0.5, **kwargs)
    z = rms_norm(o, norm, EPS) @ head.t()
    teacher_logits = kwargs["teacher_hidden"] @ kwargs["teacher_weight"].t()
    p = torch.softmax(teacher_logits, -1)
    expected = sum(-(p[t] * torch.log_softmax(z[t], -1)).sum() for t in range(6) if mask[t]) * 0.5
    assert_close(loss, expected, 1e-6, "loss")
    assert hits.tolist() == [bool(mask[t]) and bool(z[t].argmax() == teacher_logits[t].argmax()) for t in range(6)]


# ---- objectives: forward KL and the LK acceptance loss ---------------------------------------------


@pytest.mark.parametrize("objective", ["forward_kl", "lk_alpha"])
@pytest.mark.parametrize("T,hidden,vocab,dtype,mask", CASES)
def test_objectives_chunked_match_reference(objective, T, hidden, vocab, dtype, mask):
    inputs, kwargs = make_inputs(T, hidden, vocab, dtype, mask)
    compare("chunked", inputs, kwargs, TOL[dtype], objective=objective)


def float64_objective(objective, inputs, teacher, weight=0.37):
    """forward_kl / lk_alpha written out from their definitions in float64, differentiated by autograd."""
    o, norm, head, mask = [t.detach().double().requires_grad_(t.dtype != torch.bool) for t in inputs]
    normed = norm * o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + EPS)
    log_p = torch.log_softmax(teacher["teacher_hidden"].double() @ teacher["teacher_weight"].double().t(), -1)
    log_q = torch.log_softmax(normed @ head.t(), -1)
    if objective == "forward_kl":
        per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
    else:  # the probability that speculative sampling accepts the draft's token, then -log
        per_position = -torch.minimum(log_p.exp(), log_q.exp()).sum(-1).log()
    loss = weight * (per_position * mask).sum()
    (1.7 * loss).backward()
    return dict(loss=loss.detach(), d_o=o.grad, d_norm=norm.grad, d_head=head.grad)


@pytest.mark.parametrize("objective", ["forward_kl", "lk_alpha"])
def test_objectives_against_their_definitions(objective):
    """The analytic backward of each objective (chunked and reference) equals autograd on its definition."""
    inputs, kwargs = make_inputs(37, 40, 50, torch.float32)
    exact = float64_objective(objective, inputs, kwargs)
    for impl in ("reference", "chunked"):
        got = run(impl, inputs, kwargs, objective=objective)
        for name in ("loss", "d_o", "d_norm", "d_head"):
            assert_close(got[name], exact[name], 1e-5, f"{impl} {objective} {name}")


def test_forward_kl_is_soft_ce_minus_teacher_entropy():
    inputs, kwargs = make_inputs(37, 40, 50, torch.float32)
    ce, kl = run("chunked", inputs, kwargs), run("chunked", inputs, kwargs, objective="forward_kl")
    p = torch.softmax(kwargs["teacher_hidden"] @ kwargs["teacher_weight"].t(), -1)
    entropy = torch.special.entr(p).sum(-1)[inputs[3]].sum() * 0.37
    assert_close(kl["loss"], ce["loss"] - entropy, 1e-5, "KL = CE - H(p)")
    assert float(kl["loss"]) > 0
    for name in ("d_o", "d_norm", "d_head"):  # the same gradient
        assert_close(kl[name], ce[name], 1e-6, name)


def test_lk_alpha_is_zero_when_the_draft_equals_the_teacher_and_log_vd_apart():
    """alpha = sum min(p, q): 1 when q = p (loss 0), and a peaked teacher against a uniform draft accepts 1/Vd."""
    vocab, hidden = 50, 40
    (o, norm, head, mask), _ = make_inputs(8, hidden, vocab, torch.float32, mask="all")
    with torch.no_grad():
        same = dict(teacher_hidden=rms_norm(o, norm, EPS).detach(), teacher_weight=head.detach().clone())
        loss, _ = fused_ttt_step_loss(o, norm, head, EPS, mask, 1.0, impl="chunked", objective="lk_alpha", **same)
        assert abs(float(loss)) < 1e-5
        peaked = dict(teacher_hidden=torch.full((8, 1), 100.0), teacher_weight=torch.eye(vocab)[:, :1])
        flat_head = torch.zeros(vocab, hidden)
        loss, _ = fused_ttt_step_loss(o, norm, flat_head, EPS, mask, 1.0, impl="chunked", objective="lk_alpha", **peaked)
    assert_close(loss, torch.tensor(8 * torch.log(torch.tensor(float(vocab))).item()), 1e-5, "-log(1/Vd) per position")


def test_unknown_objective_is_refused():
    inputs, kwargs = make_inputs(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="objective='tv', expected one of soft_ce, forward_kl, lk_alpha"):
        fused_ttt_step_loss(*inputs[:3], EPS, inputs[3], 1.0, objective="tv", **kwargs)


def test_path_selection_and_errors():
    inputs, kwargs = make_inputs(4, 8, 10, torch.float32)
    hidden, rows = kwargs["teacher_hidden"], kwargs["teacher_weight"]
    with pytest.raises(UserError, match="unknown implementation"):
        fused_ttt_step_loss(*inputs[:3], EPS, inputs[3], 1.0, impl="fast", **kwargs)
    with pytest.raises(UserError, match="Triton runs only on CUDA"):
        fused_ttt_step_loss(*inputs[:3], EPS, inputs[3], 1.0, impl="triton", **kwargs)
    with pytest.raises(ValueError, match="teacher_weight must be"):
        fused_ttt_step_loss(*inputs[:3], EPS, inputs[3], 1.0, teacher_hidden=hidden, teacher_weight=rows[:-1])
    with pytest.raises(ValueError, match="teacher_hidden has shape"):
        fused_ttt_step_loss(*inputs[:3], EPS, inputs[3], 1.0, teacher_hidden=hidden[:, :-1], teacher_weight=rows)
    with pytest.raises(ValueError, match="must not require grad"):
        fused_ttt_step_loss(*inputs[:3], EPS, inputs[3], 1.0, teacher_hidden=hidden.clone().requires_grad_(),
                            teacher_weight=rows)
    auto = fused_ttt_step_loss(*inputs[:3], EPS, inputs[3], 1.0, impl="auto", **kwargs)[0]
    chunked = fused_ttt_step_loss(*inputs[:3], EPS, inputs[3], 1.0, impl="chunked", **kwargs)[0]
    assert torch.equal(auto, chunked)


def test_chunked_keeps_no_logits_for_backward():
    """Peak memory of forward + backward: the reference holds [T, Vd] fp32 tensors, the chunked path tiles."""
    T, vocab, chunk = 512, 8192, 64
    inputs, kwargs = make_inputs(T, 64, vocab, torch.float32)
    logits_bytes = T * vocab * 4

    def step(impl):
        loss, _ = fused_ttt_step_loss(*inputs[:3], EPS, inputs[3], 1.0, impl=impl, chunk_tokens=chunk, **kwargs)
        loss.backward()

    reference = peak_memory_bytes(lambda: step("reference"), torch.device("cpu"))
    fused = peak_memory_bytes(lambda: step("chunked"), torch.device("cpu"))
    assert reference >= 2 * logits_bytes
    assert fused <= logits_bytes / 2, f"chunked peak {fused} B vs one [T, Vd] fp32 tensor {logits_bytes} B"


# ----------------------------------------------------------------------------------------------
# Triton: under the interpreter here (child pytest), on the GPU where there is one
# ----------------------------------------------------------------------------------------------


def test_under_triton_interpreter(run_interpreted):
    run_interpreted()


@pytest.mark.parametrize("T,hidden,vocab,dtype,mask", CASES)
def test_triton_interpreted_matches_reference(T, hidden, vocab, dtype, mask):
    inputs, kwargs = make_inputs(T, hidden, vocab, dtype, mask)
    compare("triton", inputs, kwargs, INTERPRETER_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_gpu_matches_reference(dtype):
    inputs, kwargs = make_inputs(1500, 512, 32000, dtype, device="cuda")
    compare("triton", inputs, kwargs, TOL[dtype], chunk_tokens=512)
    compare("auto", inputs, kwargs, TOL[dtype], chunk_tokens=512)


# ----------------------------------------------------------------------------------------------
# The dtype policy (docs/design.md §9): bf16 activations, fp32 master weights, with or without autocast
# ----------------------------------------------------------------------------------------------


def policy_inputs(device="cpu"):
    """What the trainer hands the loss: the draft's output and the teacher in bf16, norm and head as fp32
    masters (the teacher rows were cast to bf16 once, at the boundary)."""
    (o, norm, head, mask), kwargs = make_inputs(37, 40, 50, torch.bfloat16, device=device)
    return (o, norm.detach().float().requires_grad_(), head.detach().float().requires_grad_(), mask), kwargs


def check_policy(impl, device, tol):
    inputs, kwargs = policy_inputs(device)
    expected = compare(impl, inputs, kwargs, tol)
    actual = run(impl, inputs, kwargs)
    assert actual["d_o"].dtype == torch.bfloat16
    assert actual["d_norm"].dtype == actual["d_head"].dtype == torch.float32, "weight gradients in fp32"
    with torch.autocast(device, dtype=torch.bfloat16):
        under_autocast = run(impl, inputs, kwargs)
    for name in actual:
        assert torch.equal(under_autocast[name], actual[name]), f"{impl} {name} changes under autocast"
    return expected


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_dtype_policy_bf16_activations_fp32_weights(impl):
    check_policy(impl, "cpu", TOL[torch.bfloat16])


def test_triton_interpreted_dtype_policy():
    check_policy("triton", "cpu", INTERPRETER_TOL[torch.bfloat16])


@pytest.mark.gpu
def test_dtype_policy_on_gpu():
    check_policy("triton", "cuda", TOL[torch.bfloat16])
