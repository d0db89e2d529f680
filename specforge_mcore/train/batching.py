"""From packed rows to batches: the global batch of each optimizer step (a seeded order per epoch), its
rounds (gradient accumulation) and micro-batches. Which rows of a round each rank trains on is
``specforge_mcore/rows.py``, shared with the feature transport."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from specforge_mcore.errors import UserError
from specforge_mcore.target.host import MicroBatch


@dataclass
class BatchPlan:
    """How a global batch of rows maps onto rounds, data-parallel groups, micro-batches and shards."""

    global_batch: int
    rounds: int  # gradient accumulation
    dp_groups: int
    micro_batch_size: int
    shards_per_group: int  # tp * pp

    @property
    def rows_per_round(self) -> int:
        return self.global_batch // self.rounds

    def check(self, where: str) -> None:
        g, a, d, m, r = self.global_batch, self.rounds, self.dp_groups, self.micro_batch_size, self.shards_per_group
        unit = a * d * (m * r // math.gcd(m, r))
        if g % unit:
            raise UserError(
                f"{where}: train.global_batch_size={g} does not split evenly: it must be a multiple of "
                f"grad_accum({a}) × data-parallel groups({d}) × lcm(target.micro_batch_size={m}, tp·pp={r}) = {unit} "
                f"(e.g. {unit * max(1, round(g / unit))})")


def epoch_order(num_rows: int, seed: int, epoch: int) -> torch.Tensor:
    """The seeded order of all ``num_rows`` rows in ``epoch``."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_rows, generator=generator)


def step_rows(num_rows: int, global_batch: int, seed: int, step: int) -> torch.Tensor:
    """Row indices of the global batch of optimizer step ``step`` (0-based); an epoch is the whole
    global batches that fit in ``num_rows``."""
    epoch, index = divmod(step, num_rows // global_batch)
    return epoch_order(num_rows, seed, epoch)[index * global_batch:(index + 1) * global_batch]


def micro_batches(data, rows: torch.Tensor, micro_batch_size: int) -> list[MicroBatch]:
    """``rows`` of the packed ``data``, ``micro_batch_size`` at a time, as the target host takes them."""
    m = micro_batch_size
    return [MicroBatch(data.input_ids[rows[i:i + m]], data.position_ids[rows[i:i + m]],
                       data.document_ids[rows[i:i + m]]) for i in range(0, len(rows), m)]
