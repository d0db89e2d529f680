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


@pytest.mark.slow
def test_dumped_at_ep2_on_two_ranks_trained_on_one(tmp_path):
    """dump-features in one layout (EP2, 2 ranks), training from the store in another (1 process): the
    losses of the online 1-process run, to fp32 noise (the EP2 target sums in another order)."""
    store = tmp_path / "store"
    cfg = load_config("configs/tiny.yaml", [f"train.out_dir={tmp_path / 'work'}", *COMMON, "target.ep=2",
                                            "train.global_batch_size=2",
                                            f"data.features={store}", "train.cache_features=true",
                                            "data.features_dtype=float32"])
    from specforge_mcore.features.dump import dump_worker  # a module-level function the ranks import

    summaries = spawn(dump_worker, 2, config_to_dict(cfg), str(tmp_path / "work"))
    assert summaries[0]["rows"] == 7 and not summaries[0]["already_complete"]
    assert {len(json.loads(line)["rows"]) for ledger in (store / "shards").glob("*.jsonl")
            for line in ledger.read_text().splitlines()} and len(list((store / "shards").glob("*.jsonl"))) == 2
    online, _, _ = train(tmp_path / "online")
    stored, phases, _ = train(tmp_path / "stored", f"data.features={store}", "data.features_dtype=float32")
    assert all("target_forward" not in p for p in phases)
    torch.testing.assert_close(torch.tensor(stored), torch.tensor(online), rtol=1e-5, atol=0)


def _run(out, *overrides):
    cfg = load_config("configs/tiny.yaml", [f"train.out_dir={out}", "train.global_batch_size=1", "train.max_steps=3",
                                            "train.eval_every=1", "train.eval_batches=1", "train.save_every=0",
                                            "train.plot=false", "data.features_dtype=float32", *overrides])
    (result,) = spawn(train_worker, 1, config_to_dict(cfg), str(out), True)
    return cfg, result


def _trained(result):
    steps = [r for r in result["history"] if "loss" in r]
    evals = [r["eval_loss"] for r in result["history"] if "eval_loss" in r]
    return [r["loss"] for r in steps], evals, [set(r["phases"]) for r in steps]


@pytest.mark.slow
def test_a_complete_store_trains_without_loading_the_target(tmp_path):
    """dump-features stores the training and the held-out rows; a run that reads only stored rows never
    builds the target and gives the online run's losses and held-out losses, bitwise (fp32 store)."""
    _, online = _run(tmp_path / "online")
    online_losses, online_evals, _ = _trained(online)
    assert online["target_loaded"] and len(online_evals) == 4  # after steps 1-3 and the final one

    store = tmp_path / "store"
    from specforge_mcore.features.dump import dump_worker

    (summary,) = spawn(dump_worker, 1, config_to_dict(load_config(
        "configs/tiny.yaml", [f"train.out_dir={tmp_path / 'work'}", "train.global_batch_size=1", "train.eval_batches=1",
                              f"data.features={store}", "train.cache_features=true", "data.features_dtype=float32"])),
        str(tmp_path / "work"))
    assert summary["rows"] == 7 and summary["heldout_rows"] >= 1
    assert (store / "heldout" / "COMPLETE").exists()
    manifest = json.loads((store / "MANIFEST.json").read_text())["files"]
    assert not [f for f in manifest if f.startswith("heldout/")], "the held-out store is not part of the training store"

    _, stored = _run(tmp_path / "stored", f"data.features={store}")
    losses, evals, phases = _trained(stored)
    assert not stored["target_loaded"]
    assert losses == online_losses and evals == online_evals
    assert all("target_forward" not in p for p in phases)
    assert all(torch.equal(stored["weights"][k], online["weights"][k]) for k in online["weights"])


@pytest.mark.slow
def test_a_caching_run_stores_its_held_out_rows_for_the_next_run(tmp_path):
    """With train.cache_features the first evaluation writes the held-out rows' features; the epoch writes
    the training rows'; the next run on that store does not load the target."""
    store = tmp_path / "store"
    _, first = _run(tmp_path / "first", f"data.features={store}", "train.cache_features=true", "train.max_steps=8")
    assert first["target_loaded"] and (store / "COMPLETE").exists() and (store / "heldout" / "COMPLETE").exists()
    _, second = _run(tmp_path / "second", f"data.features={store}")
    assert not second["target_loaded"]
    assert _trained(second)[1][0] == [r["eval_loss"] for r in first["history"] if "eval_loss" in r][0]


@pytest.mark.slow
def test_rows_the_first_epoch_left_out_are_stored_at_its_end(tmp_path):
    """7 rows in batches of 2: an epoch trains on 6 and leaves one out (another one each epoch). The end of
    epoch 1 runs the target over the left-out row too, so the store is complete, no later step runs the
    target, and the next run does not load it."""
    store = tmp_path / "store"
    cfg = load_config("configs/tiny.yaml", [f"train.out_dir={tmp_path / 'first'}", "train.global_batch_size=2",
                                            "train.max_steps=9", "train.eval_every=0", "train.save_every=0",
                                            "train.plot=false", f"data.features={store}", "train.cache_features=true",
                                            "data.features_dtype=float32"])
    (first,) = spawn(train_worker, 1, config_to_dict(cfg), str(tmp_path / "first"), True)
    steps = [r for r in first["history"] if "loss" in r]
    assert len(steps) == 9 and first["target_loaded"]
    epoch_rows = {r for s in steps[:3] for r in s["rows"]}
    assert len(epoch_rows) == 6, "the first epoch trains on 6 of the 7 rows"
    assert "store_completion" in steps[2]["phases"] and "store_completion" not in steps[1]["phases"]
    assert sorted(int(r) for r in json.loads((store / "index.json").read_text())) == list(range(7))
    assert all("target_forward" not in s["phases"] and "feature_read" in s["phases"] for s in steps[3:])
    (second,) = spawn(train_worker, 1, config_to_dict(load_config("configs/tiny.yaml", [
        f"train.out_dir={tmp_path / 'second'}", "train.global_batch_size=2", "train.max_steps=3", "train.eval_every=0",
        "train.save_every=0", "train.plot=false", f"data.features={store}", "data.features_dtype=float32"])),
        str(tmp_path / "second"), True)
    assert not second["target_loaded"]
