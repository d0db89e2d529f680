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
        raise UserError(f"rope_type={kind!r} is not supported (supported: default, linear, llama3)")
    return inv_freq.float()


class RopeTable:
    """Rotary angles for arbitrary position ids."""

    def __init__(self, hf: dict, head_dim: int, device: Optional[torch.device] = None):
        self.inv_freq = inverse_frequencies(hf, head_dim).to(device or "cpu")

    def freqs(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Megatron's layout: [s, b, 1, head_dim] angles (the half-rotation repeated)."""
        angles = position_ids.transpose(0, 1).float()[..., None] * self.inv_freq.to(position_ids.device)
        return torch.cat([angles, angles], dim=-1)[:, :, None, :]

    def cos_sin(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """HF's layout: cos, sin of shape [..., head_dim] for position_ids [...]."""
        angles = position_ids.float()[..., None] * self.inv_freq.to(position_ids.device)
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos(), emb.sin()
