"""The TTT loss against a naive reference written here from docs/design.md §4 alone: explicit loops over steps
and positions, explicit visibility and validity rules, plain tensor ops on the draft's parameter
values (no code shared with specforge_mcore.draft). Loss and every parameter gradient must agree."""

import math

import pytest
import torch

from specforge_mcore.config import DraftConfig
from specforge_mcore.draft.attention import select_attention_backend
from specforge_mcore.draft.model import DraftArch, Eagle3Draft
from specforge_mcore.draft.ttt import (DraftBatch, decoding_walk, position_masks, step_weights, ttt_unroll,
                                      walk_roots)

H, HEADS, KV, D, V, VD, HT = 32, 4, 2, 8, 97, 23, 32


def _rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta):
    # x [heads, D] at integer position pos; rotate-half convention
    half = D // 2
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = (pos * inv).float()
    cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


def naive_ttt_loss(p, batch, t2d, steps, decay, teacher_w, theta):
    """p: dict of the draft's parameter tensors. Returns (total loss, per-step (sum, count, correct), and
    per step the set of positions counted and the set where the draft was right)."""
    ids = batch.input_ids.reshape(-1).tolist()
    pos = batch.position_ids.reshape(-1).tolist()
    n, s = batch.input_ids.shape
    doc = [(r, int(batch.document_ids[r, c])) for r in range(n) for c in range(s)]
    asst = batch.assistant_mask.reshape(-1).tolist()
    tgt = batch.target_argmax.reshape(-1).tolist()
    fin = batch.final_hidden.reshape(n * s, -1)
    aux = [a.reshape(n * s, -1) for a in batch.aux_hidden]
    T = n * s
    emb_w = p["embed"]
    hidden = [torch.cat([aux[0][t], aux[1][t], aux[2][t]]) @ p["fc"].T for t in range(T)]
    keys = {}  # (step, t) -> (k [KV, D], v [KV, D])
    total, per_step, counted, right = 0.0, [], [], []
    for i in range(steps):
        queries, outs = {}, []
        for t in range(T):
            tok = ids[t + 1 + i] if t + 1 + i < T else 0
            x = torch.cat([_rms(emb_w[tok], p["in_norm"]), _rms(hidden[t], p["hid_norm"])])
            q = _rope((x @ p["q"].T).view(HEADS, D), pos[t] + i, theta)
            k = _rope((x @ p["k"].T).view(KV, D), pos[t] + i, theta)
            v = (x @ p["v"].T).view(KV, D)
            queries[t] = q
            keys[(i, t)] = (k, v)
        for t in range(T):
            visible = [keys[(0, u)] for u in range(t + 1) if doc[u] == doc[t]]
            visible += [keys[(j, t)] for j in range(1, i + 1)]
            heads = []
            for h in range(HEADS):
                g = h // (HEADS // KV)
                scores = torch.stack([queries[t][h] @ k[g] for k, _ in visible]) / math.sqrt(D)
                probs = torch.softmax(scores, 0)
                heads.append(sum(pr * v[g] for pr, (_, v) in zip(probs, visible)))
            attn = torch.cat(heads)
            h1 = hidden[t] + attn @ p["o"].T
            mlp_in = _rms(h1, p["post_norm"])
            outs.append(h1 + (torch.nn.functional.silu(mlp_in @ p["gate"].T) * (mlp_in @ p["up"].T)) @ p["down"].T)
        loss_sum, count, correct = 0.0, 0, 0
        counted.append(set())
        right.append(set())
        for t in range(T):
            nxt = t + 2 + i
            if nxt >= T or doc[nxt] != doc[t] or not asst[nxt] or not bool(t2d[tgt[t + 1 + i]]):
                continue
            z = _rms(outs[t], p["norm"]) @ p["lm_head"].T
            zt = fin[t + 1 + i] @ teacher_w.T
            loss_sum = loss_sum - (torch.softmax(zt, -1) * torch.log_softmax(z, -1)).sum()
            count += 1
            correct += int(z.argmax() == zt.argmax())
            counted[-1].add(t)
            if z.argmax() == zt.argmax():
                right[-1].add(t)
        if count:
            total = total + decay ** i * loss_sum / count
        per_step.append((loss_sum, count, correct))
        hidden = outs
    return total, per_step, counted, right


def _setup(seed=0):
    torch.manual_seed(seed)
    hf = dict(hidden_size=H, intermediate_size=48, num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=D,
              vocab_size=V, rms_norm_eps=1e-6, rope_theta=10000.0)
    draft = Eagle3Draft(DraftArch.from_target(hf, DraftConfig(), [1, 2, 3], VD))
    with torch.no_grad():
        for prm in draft.parameters():
            prm.add_(torch.randn_like(prm) * 0.2)  # random norms too
    draft_ids = torch.randperm(V)[:VD].sort().values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[draft_ids] = True
    draft.set_vocab(draft_ids - torch.arange(VD), t2d)
    draft.set_embedding(torch.randn(V, H))
    # two packed rows: docs of lengths [5, 1, 7, 3(pad)] and [9, 7(pad)]
    n, s = 2, 16
    docs = torch.tensor([[0] * 5 + [1] + [2] * 7 + [3] * 3, [0] * 9 + [1] * 7], dtype=torch.int32)
    pos = torch.cat([torch.cat([torch.arange(5), torch.arange(1), torch.arange(7), torch.arange(3)]),
                     torch.cat([torch.arange(9), torch.arange(7)])]).view(n, s)
    assistant = torch.rand(n, s) > 0.3
    assistant[0, 13:] = False  # padding
    assistant[1, 9:] = False
    argmax = torch.where(torch.rand(n, s) < 0.8, draft_ids[torch.randint(0, VD, (n, s))], torch.randint(0, V, (n, s)))
    batch = DraftBatch(torch.randint(0, V, (n, s)), pos, docs, assistant, [torch.randn(n, s, HT) for _ in range(3)],
                       torch.randn(n, s, HT), argmax)
    return draft, batch, torch.randn(VD, HT)


@pytest.mark.parametrize("backend,loss_impl,steps", [("reference", "reference", 7), ("csrc", "chunked", 7),
                                                     ("reference", "chunked", 1), ("csrc", "auto", 3)])
def test_ttt_matches_naive_reference(backend, loss_impl, steps):
    draft, batch, teacher_w = _setup()
    decay = 0.8
    masks = position_masks(batch, draft.t2d, steps)
    weights = step_weights(torch.stack([m.sum() for m in masks]), decay)
    out = ttt_unroll(draft, batch, masks, weights, select_attention_backend(backend, torch.device("cpu")), teacher_w,
                     loss_impl=loss_impl, projection_impl="chunked" if loss_impl != "reference" else "reference",
                     chain_stats=True)
    out.loss.backward()
    ours = {n: prm.grad.clone() for n, prm in draft.named_parameters()}
    draft.zero_grad()

    names = {"fc": "fc.weight", "in_norm": "midlayer.input_layernorm.weight", "hid_norm": "midlayer.hidden_norm.weight",
             "q": "midlayer.self_attn.q_proj.weight", "k": "midlayer.self_attn.k_proj.weight",
             "v": "midlayer.self_attn.v_proj.weight", "o": "midlayer.self_attn.o_proj.weight",
             "post_norm": "midlayer.post_attention_layernorm.weight", "gate": "midlayer.mlp.gate_proj.weight",
             "up": "midlayer.mlp.up_proj.weight", "down": "midlayer.mlp.down_proj.weight", "norm": "norm.weight",
             "lm_head": "lm_head.weight"}
    params = dict(draft.named_parameters())
    p = {short: params[full] for short, full in names.items()}
    p["embed"] = draft.embed_tokens
    total, per_step, counted, right = naive_ttt_loss(p, batch, draft.t2d, steps, decay, teacher_w, 10000.0)
    total.backward()

    assert sum(c for _, c, _ in per_step) >= 8, "the batch must have enough supervised positions to test anything"
    assert out.valid.tolist() == [c for _, c, _ in per_step], "position masks differ from the reference rule"
    assert out.correct.tolist() == [c for _, _, c in per_step]
    # The chain rooted at position t reaches step i when steps < i were all right at t and step i counts there.
    all_right, reached, accepted = set(range(batch.num_tokens)), [], []
    for i in range(steps):
        reached.append(len(counted[i] & all_right))
        all_right &= right[i]
        accepted.append(len(all_right))
    assert out.chain.tolist() == [reached, accepted], "chained acceptance counts"
    torch.testing.assert_close(out.loss, total.detach(), rtol=1e-5, atol=1e-5)
    for short, full in names.items():
        torch.testing.assert_close(ours[full], params[full].grad, rtol=1e-4, atol=1e-5, msg=f"grad of {full}")


def test_mask_refers_to_the_predicted_token():
    """Step i at t counts iff token t+2+i is an assistant token of t's document (docs/design.md §4)."""
    draft, batch, _ = _setup()
    batch.assistant_mask[:] = False
    batch.target_argmax[:] = (draft.d2t + torch.arange(VD))[0]  # always in the draft vocab
    batch.assistant_mask[0, 10] = True  # row 0, document 2 spans columns 6..12
    masks = position_masks(batch, draft.t2d, 3)
    assert masks[0].nonzero().flatten().tolist() == [8]
    assert masks[1].nonzero().flatten().tolist() == [7]
    assert masks[2].nonzero().flatten().tolist() == [6]
    batch.assistant_mask[0, 10] = False
    batch.assistant_mask[0, 14] = True  # in the next (padding) document: never supervised from document 2
    assert all(int(m.sum()) == 0 for m in position_masks(batch, draft.t2d, 3))


def test_chained_acceptance_length_formula():
    from specforge_mcore.draft.ttt import chained_acceptance_length

    rates, length = chained_acceptance_length([100, 40, 10], [40, 10, 5])
    assert rates == [0.4, 0.25, 0.5]
    assert length == pytest.approx(1 + 0.4 + 0.4 * 0.25 + 0.4 * 0.25 * 0.5)
    assert chained_acceptance_length([10, 0, 0], [0, 0, 0]) == ([0.0, 0.0, 0.0], 1.0)


def test_chain_counts_follow_each_position_through_the_steps(monkeypatch):
    """With designed per-position hits (the draft is rarely right by chance), the chain counts are the
    chains that reach each step (all earlier steps right there, this step counted) and pass it."""
    import specforge_mcore.kernels.ttt_loss as ttt_loss

    draft, batch, teacher_w = _setup()
    steps = 4
    masks = position_masks(batch, draft.t2d, steps)
    gen = torch.Generator().manual_seed(3)
    designed = [torch.rand(batch.num_tokens, generator=gen) < 0.7 for _ in range(steps)]
    calls = []

    def fake_loss(o, *args, position_mask, return_hits=False, **kwargs):
        hits = designed[len(calls)] & position_mask
        calls.append(1)
        return (o * 0).sum(), (hits if return_hits else hits.sum())

    monkeypatch.setattr(ttt_loss, "fused_ttt_step_loss",
                        lambda o, nw, hw, eps, mask, weight, **k: fake_loss(o, position_mask=mask, **k))
    out = ttt_unroll(draft, batch, masks, step_weights(torch.stack([m.sum() for m in masks]), 0.8),
                     select_attention_backend("reference", torch.device("cpu")), teacher_w, chain_stats=True)
    all_right, reached, accepted = torch.ones(batch.num_tokens, dtype=torch.bool), [], []
    for i in range(steps):
        reached.append(int((masks[i] & all_right).sum()))
        all_right = all_right & designed[i] & masks[i]
        accepted.append(int(all_right.sum()))
    assert out.chain.tolist() == [reached, accepted]
    assert accepted[1] > 0 and reached[1] > accepted[1], "the design must exercise partial chains"
    # The decoding replay: each root's chain length is its leading run of right steps.
    lengths = torch.zeros(batch.num_tokens, dtype=torch.long)
    for t in range(batch.num_tokens):
        while lengths[t] < steps and bool((designed[int(lengths[t])] & masks[int(lengths[t])])[t]):
            lengths[t] += 1
    expected = decoding_walk(lengths, walk_roots(batch), batch.input_ids.shape[1], steps)
    assert out.walk.tolist() == expected.tolist() and expected[1] > 0
