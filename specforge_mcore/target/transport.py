"""Carry captured features from the pipeline stages that own them to the ranks that train the draft.

A model-parallel group (TP × PP ranks) runs the target over N sequences. Every one of its R = TP·PP ranks
trains the draft on a distinct, contiguous shard of n = N / R of them; which one is decided by
``specforge_mcore/rows.py`` (``RowShards``), the rule the trainer slices its rows with too: rank (pp, tp)
gets shard k = pp·TP + tp, sequences [k·n, (k+1)·n). Each captured tensor lives on one stage (after the
SP gather, identically on all its TP ranks), so shard k's pieces travel inside the pipeline group of its
TP index: stage o sends rank (p, tp) its slice with point-to-point ops; nothing is broadcast, and a stage
keeps its own slice without a copy over the wire.

Across model-parallel groups (data parallelism) the groups already see different sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from specforge_mcore import collectives
from specforge_mcore.rows import RowShards
from specforge_mcore.target.host import StageCapture, TargetHost


@dataclass
class FeatureShard:
    """What one rank's draft trains on: n sequences of length s."""

    aux_hidden: list[torch.Tensor]  # three [n, s, H], in capture_layer_ids order (low, mid, high)
    final_hidden: torch.Tensor  # [n, s, H]: target's last hidden state, after the final norm
    target_argmax: torch.Tensor  # [n, s] int64: target's argmax over the full vocabulary


def row_shards(host: TargetHost) -> RowShards:
    """This rank's place in the split of a round's rows (``specforge_mcore/rows.py``)."""
    from megatron.core import parallel_state as ps

    return RowShards(ps.get_data_parallel_world_size(), ps.get_data_parallel_rank(), host.layout.tp, host.layout.pp,
                     host.tp_rank, host.pp_rank)


def scatter_features(host: TargetHost, captures: list[StageCapture], micro_batch_size: int, seq_len: int,
                     shards: RowShards) -> FeatureShard:
    """Redistribute this group's captured tensors so each rank holds its own shard (``shards``, this
    rank's ``row_shards``; see module doc)."""
    pp = host.layout.pp
    num_sequences = len(captures) * micro_batch_size
    lo, hi = shards.bounds(num_sequences)
    device = next(host.model.parameters()).device

    owner: dict[str, int] = {f"aux{i}": host.owner_stage(c) for i, c in enumerate(host.capture_layer_ids)}
    owner["final_hidden"] = owner["target_argmax"] = pp - 1
    local: dict[str, torch.Tensor] = {}
    for i, capture_id in enumerate(host.capture_layer_ids):
        if owner[f"aux{i}"] == host.pp_rank:
            local[f"aux{i}"] = torch.cat([c.layers[capture_id] for c in captures])
    if host.is_last_stage:
        local["final_hidden"] = torch.cat([c.final_hidden for c in captures])
        local["target_argmax"] = torch.cat([c.target_argmax for c in captures])

    pp_ranks = dist.get_process_group_ranks(host.pp_group) if pp > 1 else [dist.get_rank()]
    received: dict[str, torch.Tensor] = {}
    sends, recvs = [], []
    for name, stage in owner.items():
        if stage == host.pp_rank:
            received[name] = local[name][lo:hi]
            for dest_stage in range(pp):
                if dest_stage != host.pp_rank:
                    d_lo, d_hi = shards.bounds(num_sequences, dest_stage)
                    sends.append((local[name][d_lo:d_hi], pp_ranks[dest_stage]))
        else:
            is_ids = name == "target_argmax"
            shape = (hi - lo, seq_len) if is_ids else (hi - lo, seq_len, host.model.config.hidden_size)
            received[name] = torch.empty(shape, dtype=torch.int64 if is_ids else host.dtype, device=device)
            recvs.append((received[name], pp_ranks[stage]))
    collectives.exchange(sends, recvs)
    return FeatureShard(
        aux_hidden=[received[f"aux{i}"] for i in range(len(host.capture_layer_ids))],
        final_hidden=received["final_hidden"],
        target_argmax=received["target_argmax"],
    )
