"""``train --profile``: a Chrome trace per rank, the phase table with every phase, the PNG beside them."""

import json

import pytest

from specforge_mcore.config import config_to_dict, load_config
from specforge_mcore.errors import UserError
from specforge_mcore.parallel import spawn
from specforge_mcore.train.profile import PHASES, parse_profile_steps
from specforge_mcore.train.run import train_worker


def test_profile_steps_are_checked():
    assert parse_profile_steps("2:4", 6) == (2, 4)
    assert parse_profile_steps("3:3", 3) == (3, 3)
    for bad in ("2-4", "0:2", "4:2", "x:y"):
        with pytest.raises(UserError, match="profile_steps"):
            parse_profile_steps(bad, 6)
    with pytest.raises(UserError, match="only 6 steps"):
        parse_profile_steps("2:7", 6)


@pytest.mark.slow
def test_profile_writes_traces_table_and_plot(tmp_path):
    # PP=2: the two ranks hold different stages, so transport and the (last-stage) teacher both show.
    cfg = load_config("configs/tiny.yaml", [
        f"train.out_dir={tmp_path}", "target.pp=2", "data.max_length=128", "train.global_batch_size=2",
        "train.max_steps=3", "train.eval_every=0", "train.save_every=0", "train.plot=false",
        "train.profile=true", "train.profile_steps='2:3'"])
    spawn(train_worker, 2, config_to_dict(cfg), str(tmp_path))
    profile = tmp_path / "profile"
    for rank in range(2):
        trace = json.loads((profile / f"trace_rank{rank}.json").read_text())
        names = {event.get("name") for event in trace["traceEvents"]}
        missing = {"target_forward", "feature_transport", "draft_forward", "draft_backward", "grad_reduce",
                   "optimizer"} - names
        assert not missing, f"rank {rank} trace lacks the ranges {missing}"
    assert "teacher" in {e.get("name") for e in json.loads((profile / "trace_rank1.json").read_text())["traceEvents"]}
    table = (profile / "phases.txt").read_text()
    rows = {line.split()[0] for line in table.splitlines()[2:]}
    assert set(PHASES) | {"step"} <= rows, table
    assert "rank 0" in table and "rank 1" in table, table
    per_rank = json.loads((profile / "phases.json").read_text())["ms_per_step"]
    assert per_rank[1]["teacher"] > 0 and per_rank[0]["teacher"] == 0, per_rank  # the last stage computes it
    for ms in per_rank:
        assert sum(ms[p] for p in PHASES) == pytest.approx(ms["step"], rel=1e-6)
    assert (profile / "phases.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
