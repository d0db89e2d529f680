"""Which packed rows each rank trains on: the one rule the trainer and the feature transport share.

A round's rows are cut into ``dp · R`` equal, contiguous shards, R = TP·PP ranks per model-parallel group.
Data-parallel group d runs the target over its R shards (``group``); within the group, the rank at
pipeline stage pp and tensor rank tp trains the draft on shard k = pp·TP + tp (``bounds``), which the
feature transport (``target/transport.py``) delivers to it. Over the world that is shard d·R + k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class RowShards:
    """One rank's place in the split: data-parallel group ``dp_rank`` of ``dp_groups``, and
    (``pp_rank``, ``tp_rank``) in its ``tp`` × ``pp`` model-parallel group."""

    dp_groups: int
    dp_rank: int
    tp: int
    pp: int
    tp_rank: int
    pp_rank: int

    @property
    def index(self) -> int:
        """This rank's shard over the whole world (of ``dp_groups · tp · pp``)."""
        return self.dp_rank * self.tp * self.pp + self.pp_rank * self.tp + self.tp_rank

    def group(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows of a round that this rank's data-parallel group runs through the target."""
        n = len(rows) // self.dp_groups
        return rows[self.dp_rank * n:(self.dp_rank + 1) * n]

    def bounds(self, num_sequences: int, pp_rank: Optional[int] = None) -> tuple[int, int]:
        """[start, end) within the group's ``num_sequences`` of the shard of the rank at pipeline stage
        ``pp_rank`` (this rank's by default) with this rank's tensor index."""
        shards = self.tp * self.pp
        if num_sequences % shards:
            raise ValueError(f"{num_sequences} sequences per model-parallel group cannot be split evenly over "
                             f"its {shards} ranks (tp*pp); use a multiple of {shards}")
        per = num_sequences // shards
        k = (self.pp_rank if pp_rank is None else pp_rank) * self.tp + self.tp_rank
        return k * per, (k + 1) * per

    def mine(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows of a round that this rank trains the draft on."""
        group = self.group(rows)
        start, end = self.bounds(len(group))
        return group[start:end]
