"""RoPE from an HF config, shared by the target host and the draft.

Reads the base and scaling from whichever field the config has (transformers 5.x ``rope_parameters`` or
the legacy ``rope_theta`` / ``rope_scaling``: reading only ``config.rope_theta`` silently falls back to
10000 on new configs). Frequencies are built from explicit position ids, so packed documents each
start at position 0.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from specforge_mcore.errors import UserError


def rope_parameters(hf: dict) -> dict:
    """``{"rope_theta": float, "rope_type": str, ...scaling fields}`` from either config style."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    for key, value in legacy.items():
        params.setdefault(key, value)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    if "rope_theta" not in params:
        params["rope_theta"] = float(hf.get("rope_theta", 10000.0))
    return params


def inverse_frequencies(hf: dict, head_dim: int) -> torch.Tensor:
    """inv_freq [head_dim // 2] (fp32) for the config's RoPE type."""
    params = rope_parameters(hf)
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = params["rope_type"]
    if kind == "default":
        pass
    elif kind == "linear":
        inv_freq = inv_freq / float(params["factor"])
    elif kind == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_context = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    else:
        raise UserError(f"rope_type={kind!r} is not supported (supported: default, linear, llama3, yarn)")
    return inv_freq.float()


class RopeTable:
    """Rotary angles for arbitrary position ids. For YaRN, ``attention_factor`` is the cos/sin multiplier
    (HF's and SGLang's); ``cos_sin`` applies it, ``freqs`` (Megatron's layout) leaves it to the caller,
    as Megatron's own YaRN module does. Every other RoPE type has factor 1."""

    def __init__(self, hf: dict, head_dim: int, device: Optional[torch.device] = None):
        if rope_parameters(hf)["rope_type"] == "yarn":
            inv_freq, self.attention_factor = yarn_inverse_frequencies(hf, head_dim)
        else:
            inv_freq, self.attention_factor = inverse_frequencies(hf, head_dim), 1.0
        self.inv_freq = inv_freq.to(device or "cpu")

    def freqs(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Megatron's layout: [s, b, 1, head_dim] angles (the half-rotation repeated)."""
        angles = position_ids.transpose(0, 1).float()[..., None] * self.inv_freq.to(position_ids.device)
        return torch.cat([angles, angles], dim=-1)[:, :, None, :]

    def cos_sin(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """HF's layout: cos, sin of shape [..., head_dim] for position_ids [...]."""
        angles = position_ids.float()[..., None] * self.inv_freq.to(position_ids.device)
        emb = torch.cat([angles, angles], dim=-1)
        if self.attention_factor == 1.0:
            return emb.cos(), emb.sin()
        return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor


def yarn_inverse_frequencies(hf: dict, head_dim: int) -> tuple[torch.Tensor, float]:
    """YaRN (rope_type "yarn"): inv_freq [head_dim // 2] (fp32) and the attention factor by which HF
    multiplies cos and sin (DeepSeek-V3, GPT-OSS). Follows transformers' definition: ``truncate``
    (default true) rounds the correction range, and the attention factor comes from
    ``attention_factor``, else from ``mscale`` / ``mscale_all_dim`` when both are set, else from
    ``factor`` alone."""
    params = rope_parameters(hf)
    if params["rope_type"] != "yarn" or not params.get("factor"):
        raise UserError(f"rope_parameters={params}: expected rope_type 'yarn' with a factor")
    base, factor = float(params["rope_theta"]), float(params["factor"])
    original = float(params.get("original_max_position_embeddings") or hf["max_position_embeddings"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast = float(params.get("beta_fast") or 32)
    beta_slow = float(params.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a single-point ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate by `factor`
    pos_freqs = base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention_factor)
