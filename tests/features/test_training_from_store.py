"""Training from the offline feature store: the first epoch writes it while it runs online, later epochs
(and later runs) read it instead of running the target, with the same losses: bitwise with an fp32 store
on one CPU process, within bf16 rounding with the default bf16 store."""

import json

import pytest
import torch

from specforge_mcore.config import config_to_dict, load_config
from specforge_mcore.parallel import spawn
from specforge_mcore.train.run import train_worker

# 7 packed rows, one step per epoch: every epoch trains on every row.
COMMON = ["train.global_batch_size=7", "train.max_steps=3", "train.eval_every=0", "train.save_every=0", "train.plot=false"]


def train(out, *overrides):
    cfg = load_config("configs/tiny.yaml", [f"train.out_dir={out}", *COMMON, *overrides])
    (result,) = spawn(train_worker, 1, config_to_dict(cfg), str(out), True)
    steps = [r for r in result["history"] if "loss" in r]
    return [r["loss"] for r in steps], [set(r["phases"]) for r in steps], result["weights"]


@pytest.mark.slow
def test_store_written_in_epoch_one_reproduces_the_online_run(tmp_path):
    store = tmp_path / "store"
    online, online_phases, online_weights = train(tmp_path / "online")
    cached, phases, weights = train(tmp_path / "cached", f"data.features={store}", "train.cache_features=true",
                                    "data.features_dtype=float32")
    assert len(online) == 3 and cached == online, "fp32 store: the same losses, bitwise"
    assert all(torch.equal(weights[k], online_weights[k]) for k in online_weights)
    assert "target_forward" in phases[0] and "feature_read" not in phases[0]  # epoch 1 runs the target
    assert all("feature_read" in p and "target_forward" not in p for p in phases[1:])  # epochs 2-3 do not
    index = json.loads((store / "index.json").read_text())
    assert len(index) == 7 and (store / "COMPLETE").exists()
    # A later run reads the complete store from its first step.
    again, phases, _ = train(tmp_path / "again", f"data.features={store}", "data.features_dtype=float32")
    assert again == online and all("target_forward" not in p for p in phases)
    # The store of another run is refused by name.
    with pytest.raises(Exception, match="dumped with dtype='float32', but this run has dtype='bfloat16'"):
        train(tmp_path / "other", f"data.features={store}")


@pytest.mark.slow
def test_bf16_store_trains_within_bf16_rounding(tmp_path):
    online, _, _ = train(tmp_path / "online")
    cached, _, _ = train(tmp_path / "cached", f"data.features={tmp_path / 'store'}", "train.cache_features=true")
    assert cached[0] == online[0]  # epoch 1 is online
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(online), rtol=1e-3, atol=0)


def _dump_worker(rank, world, cfg_tree, work):
    from specforge_mcore.config import config_from_dict
    from specforge_mcore.train.trainer import Trainer

    return Trainer(config_from_dict(cfg_tree), work, quiet=True).dump_features()


@pytest.mark.slow
def test_dumped_at_ep2_on_two_ranks_trained_on_one(tmp_path):
    """dump-features in one layout (EP2, 2 ranks), training from the store in another (1 process): the
    losses of the online 1-process run, to fp32 noise (the EP2 target sums in another order)."""
    store = tmp_path / "store"
    cfg = load_config("configs/tiny.yaml", [f"train.out_dir={tmp_path / 'work'}", *COMMON, "target.ep=2",
                                            "train.global_batch_size=2",
                                            f"data.features={store}", "train.cache_features=true",
                                            "data.features_dtype=float32"])
    summaries = spawn(_dump_worker, 2, config_to_dict(cfg), str(tmp_path / "work"))
    assert summaries[0]["rows"] == 7 and not summaries[0]["already_complete"]
    assert {len(json.loads(line)["rows"]) for ledger in (store / "shards").glob("*.jsonl")
            for line in ledger.read_text().splitlines()} and len(list((store / "shards").glob("*.jsonl"))) == 2
    online, _, _ = train(tmp_path / "online")
    stored, phases, _ = train(tmp_path / "stored", f"data.features={store}", "data.features_dtype=float32")
    assert all("target_forward" not in p for p in phases)
    torch.testing.assert_close(torch.tensor(stored), torch.tensor(online), rtol=1e-5, atol=0)
