"""The EAGLE-3 draft (docs/design.md §4): ``fc`` over three captured target layers, one Llama decoder layer whose
attention reads ``cat(input_layernorm(embed(token)), hidden_norm(hidden))`` (width 2H), a final norm and
a head over the draft vocabulary.

Parameter names are SGLang's (``fc``, ``midlayer.*``, ``norm``, ``lm_head``, ``d2t``, ``t2d``), so the
state dict is the serving checkpoint up to dtype. The embedding is the target's, frozen, and not part of
the state dict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from specforge_mcore.errors import UserError
from specforge_mcore.rope import RopeTable, rope_parameters


@dataclass
class DraftArch:
    """Every size of the draft, resolved (what a checkpoint records and an export writes)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # the target's
    draft_vocab_size: int
    target_hidden_size: int
    rms_norm_eps: float
    rope: dict  # rope_parameters of the target: rope_theta, rope_type, scaling fields
    max_position_embeddings: int
    capture_layer_ids: list[int]  # output-of-layer convention, 0-based (docs/design.md §4)
    per_layer_norm: bool = False  # EAGLE-3.1: RMSNorm on each captured layer before fc
    torch_dtype: str = "bfloat16"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_target(cls, hf: dict, draft_cfg, capture_layer_ids: list[int], draft_vocab_size: int) -> "DraftArch":
        target_hidden = int(hf["hidden_size"])
        hidden = draft_cfg.hidden_size or target_hidden
        if hidden != target_hidden:
            raise UserError(f"draft.hidden_size={hidden} differs from the target's hidden_size={target_hidden}: the "
                            "draft reads the target's (frozen, not exported) token embedding, which has the "
                            "target's width; keep draft.hidden_size unset or equal to it")
        heads = draft_cfg.num_attention_heads or int(hf["num_attention_heads"])
        return cls(
            hidden_size=hidden,
            intermediate_size=draft_cfg.intermediate_size or int(hf["intermediate_size"]),
            num_attention_heads=heads,
            num_key_value_heads=draft_cfg.num_key_value_heads or int(hf.get("num_key_value_heads") or heads),
            head_dim=draft_cfg.head_dim or int(hf.get("head_dim") or hidden // heads),
            vocab_size=int(hf["vocab_size"]),
            draft_vocab_size=draft_vocab_size,
            target_hidden_size=target_hidden,
            rms_norm_eps=float(draft_cfg.rms_norm_eps or hf.get("rms_norm_eps", 1e-6)),
            rope=rope_parameters(hf),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            capture_layer_ids=list(capture_layer_ids),
            per_layer_norm=bool(draft_cfg.per_layer_norm),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DraftArch":
        return cls(**values)

    def check(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(f"draft: num_attention_heads={self.num_attention_heads} must be a multiple of "
                            f"num_key_value_heads={self.num_key_value_heads}")
        if self.draft_vocab_size > self.vocab_size:
            raise UserError(f"draft_vocab_size={self.draft_vocab_size} exceeds the target vocabulary {self.vocab_size}")


class RMSNorm(nn.Module):
    """Llama's RMSNorm: statistics in fp32, the scale in the input's dtype (the fp32 master weight is cast to
    the compute dtype, as SGLang serves it with bf16 weights; docs/design.md §9)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight.to(x.dtype) * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., heads, D]; cos/sin [..., D] (broadcast over heads)."""
    return (x.float() * cos[..., None, :] + rotate_half(x.float()) * sin[..., None, :]).to(x.dtype)


class DraftAttention(nn.Module):
    def __init__(self, arch: DraftArch):
        super().__init__()
        self.heads, self.kv_heads, self.dim = arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim
        width = 2 * arch.hidden_size  # cat(embedding, hidden)
        self.q_proj = nn.Linear(width, self.heads * self.dim, bias=False)
        self.k_proj = nn.Linear(width, self.kv_heads * self.dim, bias=False)
        self.v_proj = nn.Linear(width, self.kv_heads * self.dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.dim, arch.hidden_size, bias=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [T, 2H] -> q [T, Hq, D], k/v [T, Hkv, D], RoPE applied to q and k."""
        tokens = x.shape[0]
        q = self.q_proj(x).view(tokens, self.heads, self.dim)
        k = self.k_proj(x).view(tokens, self.kv_heads, self.dim)
        v = self.v_proj(x).view(tokens, self.kv_heads, self.dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class DraftMLP(nn.Module):
    def __init__(self, arch: DraftArch):
        super().__init__()
        self.gate_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=False)
        self.up_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    """The one decoder layer ("midlayer" in SGLang's checkpoint)."""

    def __init__(self, arch: DraftArch):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.hidden_norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = DraftAttention(arch)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = DraftMLP(arch)

    def attention_input(self, embedding: torch.Tensor, hidden_normed: torch.Tensor) -> torch.Tensor:
        """cat(input_layernorm(embed(token)), hidden_norm(hidden)): embedding first (docs/design.md §4)."""
        return torch.cat([self.input_layernorm(embedding), hidden_normed], dim=-1)

    def finish(self, residual: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """o_proj + residual, then the MLP block; returns the layer output (pre final norm)."""
        hidden = residual + self.self_attn.o_proj(attention.flatten(-2))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Eagle3Draft(nn.Module):
    def __init__(self, arch: DraftArch):
        super().__init__()
        arch.check()
        self.arch = arch
        self.fc = nn.Linear(3 * arch.target_hidden_size, arch.hidden_size, bias=False)
        # EAGLE-3.1: one norm per captured layer before fc (not in the SGLang EAGLE-3 format).
        self.layer_norms = (nn.ModuleList(RMSNorm(arch.target_hidden_size, arch.rms_norm_eps) for _ in range(3))
                            if arch.per_layer_norm else None)
        self.midlayer = DraftLayer(arch)
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = nn.Linear(arch.hidden_size, arch.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(arch.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", torch.zeros(arch.vocab_size, dtype=torch.bool))
        # The target's token embedding: frozen, shared, never saved with the draft.
        self.register_buffer("embed_tokens", torch.zeros(0, arch.hidden_size), persistent=False)
        self.rope = RopeTable({"rope_parameters": arch.rope, "max_position_embeddings": arch.max_position_embeddings},
                              arch.head_dim)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def set_vocab(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        if d2t.shape != self.d2t.shape or t2d.shape != self.t2d.shape:
            raise UserError(f"vocab mapping of shapes d2t {list(d2t.shape)}, t2d {list(t2d.shape)} does not fit a "
                            f"draft with draft_vocab_size={self.arch.draft_vocab_size}, vocab_size={self.arch.vocab_size}")
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    def set_embedding(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != (self.arch.vocab_size, self.arch.hidden_size):
            raise UserError(f"target embedding has shape {list(weight.shape)}, the draft expects "
                            f"[{self.arch.vocab_size}, {self.arch.hidden_size}]")
        self.embed_tokens = weight.detach().requires_grad_(False)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that is saved/exported: weights plus d2t/t2d (the embedding is the target's)."""
        return {k: v for k, v in self.state_dict().items() if k != "embed_tokens"}

    # ---- the building blocks the TTT unroll and the decoder compose ------------------------------
    def project(self, aux_hidden: list[torch.Tensor], impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """Three captured layers [T, H_t] -> (g [T, H], hidden_norm(g)) without building their concatenation."""
        from specforge_mcore.kernels.projection import fused_projection

        norms = [n.weight for n in self.layer_norms] if self.layer_norms is not None else None
        return fused_projection(aux_hidden, self.fc.weight, self.midlayer.hidden_norm.weight,
                                self.arch.rms_norm_eps, layer_norm_weights=norms, impl=impl)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens.numel() == 0:
            raise RuntimeError("Eagle3Draft.set_embedding(target embedding) was not called")
        return F.embedding(token_ids, self.embed_tokens)

    def logits(self, output: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits of a layer output (materialised: decoding and references only)."""
        return self.lm_head(self.norm(output))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
