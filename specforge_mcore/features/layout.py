"""What one stored token costs: the one definition the store's writer, reader and the planner share.

The draft needs, per token, the target's captured layers (its input), the target's final hidden state and
the target's full-vocabulary argmax. The teacher distribution is formed inside the loss from the final
hidden state and the output-layer rows of the draft vocabulary (docs/design.md §4), so no logits are
stored: a token costs ``(captures + 1) * H`` values plus one int32, against ``captures * H`` plus ``Vd`` (or
``V``) values for a store that keeps draft-vocabulary (or full-vocabulary) logits.
"""

from __future__ import annotations

from dataclasses import dataclass

ARGMAX_BYTES = 4  # int32: every vocabulary here is below 2**31


@dataclass(frozen=True)
class StoreLayout:
    hidden_size: int  # the target's hidden size H
    captures: int  # captured layers
    dtype_bytes: int  # storage dtype (bf16 by default: 2)

    @property
    def fields(self) -> dict[str, int]:
        """Bytes per token of each stored tensor."""
        return {"aux_hidden": self.captures * self.hidden_size * self.dtype_bytes,
                "final_hidden": self.hidden_size * self.dtype_bytes, "target_argmax": ARGMAX_BYTES}

    @property
    def bytes_per_token(self) -> int:
        return sum(self.fields.values())

    def logits_store_bytes_per_token(self, vocab: int) -> int:
        """A store that keeps the captured layers and ``vocab`` logits per token instead (what the teacher
        would need without the target's output rows)."""
        return self.captures * self.hidden_size * self.dtype_bytes + vocab * self.dtype_bytes
