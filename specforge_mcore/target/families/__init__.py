"""Target families: one file each (config translation + HF tensor names), found by architecture."""

from __future__ import annotations

from specforge_mcore.errors import UserError
from specforge_mcore.target.families.base import Family
from specforge_mcore.target.families.deepseek_v3 import DeepseekV3
from specforge_mcore.target.families.gpt_oss import GptOss
from specforge_mcore.target.families.llama import Llama
from specforge_mcore.target.families.mixtral import Mixtral
from specforge_mcore.target.families.qwen3 import Qwen3
from specforge_mcore.target.families.qwen3_moe import Qwen3Moe

FAMILIES: tuple[type[Family], ...] = (Llama, Qwen3, Qwen3Moe, Mixtral, DeepseekV3, GptOss)
# Architectures we know and refuse, with the reason (never build a different model silently).
UNSUPPORTED: dict[str, str] = {}


def family_for(hf: dict, where: str = "config.json") -> Family:
    architectures = hf.get("architectures") or []
    model_type = hf.get("model_type")
    for cls in FAMILIES:
        if any(a in cls.architectures for a in architectures) or (not architectures and model_type in cls.model_types):
            return cls()
    for arch in architectures:
        if arch in UNSUPPORTED:
            raise UserError(f"{where}: {arch} cannot be hosted: {UNSUPPORTED[arch]}")
    known = sorted(a for cls in FAMILIES for a in cls.architectures)
    raise UserError(f"{where}: unknown architecture {architectures or model_type!r}; supported: {', '.join(known)}")


__all__ = ["FAMILIES", "Family", "family_for"]
