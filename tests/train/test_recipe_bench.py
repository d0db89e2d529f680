"""``bench recipe``: variants parsed as overrides, every run trained and scored on held-out data."""

import json

import pytest

from specforge_mcore.bench.recipe import parse_variant
from specforge_mcore.cli import main as cli_main
from specforge_mcore.errors import UserError


def test_variants_are_overrides_with_the_base_learning_rate():
    assert parse_variant("base:", 4e-3) == ("base", [])
    assert parse_variant("lr/4: optim.lr=LR/4 draft.ttt_steps=7", 4e-3) == ("lr/4", ["optim.lr=0.001", "draft.ttt_steps=7"])
    assert parse_variant("x: optim.lr=LR*2.5", 2e-3) == ("x", ["optim.lr=0.005"])
    for bad, pattern in [("no colon", "expected 'NAME: KEY=VALUE"), ("a: lr", "'lr' is not KEY=VALUE"),
                         ("a: optim.lr=LR+1", "expected LR, LR\\*X or LR/X")]:
        with pytest.raises(UserError, match=pattern):
            parse_variant(bad, 1e-3)


@pytest.mark.slow
def test_two_variants_train_and_are_scored(tmp_path, capsys):
    out = tmp_path / "recipe"
    rc = cli_main(["bench", "recipe", "--config", "configs/tiny.yaml", "--out", str(out),
                   "--set", "train.max_steps=2", "train.eval_every=2", "data.eval_fraction=0.2", "draft.ttt_steps=2",
                   "--variant", "base:", "--variant", "lk: draft.objective=lk_alpha"])
    assert rc == 0
    runs = json.loads((out / "recipe.json").read_text())["runs"]
    assert list(runs) == ["base", "lk"] and runs["lk"]["overrides"] == ["draft.objective=lk_alpha"]
    for run in runs.values():
        assert run["steps"] == 2 and len(run["after"]["accept"]) == 2 and run["after"]["sim_al"] >= 1.0
        assert (out / "base" / "metrics.jsonl").exists()
    # The variant really changed the objective: the training losses differ from the first step.
    assert len(runs["lk"]["train_loss"]) == 2 and runs["base"]["train_loss"][0] != runs["lk"]["train_loss"][0]
    table = capsys.readouterr().out
    assert "| lk | `draft.objective=lk_alpha` |" in table and "best by the 3-step chained estimate" in table
