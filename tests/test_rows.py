"""The one rule for which rows of a round each rank trains on (specforge_mcore/rows.py)."""

import pytest
import torch

from specforge_mcore.rows import RowShards


@pytest.mark.parametrize("dp,tp,pp", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 2, 1), (2, 1, 2), (2, 2, 2)])
def test_the_ranks_train_every_row_of_a_round_once_in_order(dp, tp, pp):
    rows = torch.randperm(dp * tp * pp * 3, generator=torch.Generator().manual_seed(0))
    ranks = [RowShards(dp, d, tp, pp, t, p) for d in range(dp) for p in range(pp) for t in range(tp)]
    assert sorted(r.index for r in ranks) == list(range(dp * tp * pp))
    assert torch.equal(torch.cat([r.mine(rows) for r in sorted(ranks, key=lambda r: r.index)]), rows)
    for rank in ranks:
        group = rank.group(rows)
        assert torch.equal(rank.mine(rows), group[slice(*rank.bounds(len(group)))])
        for stage in range(pp):  # what the transport sends a peer stage is what that peer trains on
            peer = RowShards(dp, rank.dp_rank, tp, pp, rank.tp_rank, stage)
            assert rank.bounds(len(group), stage) == peer.bounds(len(peer.group(rows)))


def test_a_group_that_does_not_split_over_its_ranks_is_refused():
    with pytest.raises(ValueError, match="cannot be split evenly over its 4 ranks"):
        RowShards(1, 0, 2, 2, 0, 0).bounds(6)
