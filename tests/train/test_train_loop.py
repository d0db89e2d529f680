"""The training loop on the tiny config: resume is bitwise, layouts agree, checkpoints are complete."""

import json
import os

import pytest
import torch

from specforge_mcore.config import config_to_dict, load_config
from specforge_mcore.parallel import spawn
from specforge_mcore.train.run import train_worker

TINY = "configs/tiny.yaml"


def tiny_tree(out_dir, *overrides):
    cfg = load_config(TINY, [f"train.out_dir={out_dir}", "train.plot=false", *overrides])
    return config_to_dict(cfg)


def run(world, out_dir, *overrides):
    results = spawn(train_worker, world, tiny_tree(out_dir, *overrides), str(out_dir))
    return results[0]


def losses(history):
    return [r["loss"] for r in history if "loss" in r]


def test_resume_continues_bitwise(tmp_path):
    common = ["train.max_steps=4", "train.save_every=2", "train.eval_every=0", "train.keep_checkpoints=5"]
    straight = run(1, tmp_path / "straight", *common)
    first = run(1, tmp_path / "resumed", "train.exit_after_step=2", *common)
    second = run(1, tmp_path / "resumed", "train.resume=true", *common)
    assert losses(first["history"]) + losses(second["history"]) == losses(straight["history"])
    for key, value in straight["weights"].items():
        assert torch.equal(value, second["weights"][key]), f"{key} differs after resume"
    state = json.load(open(tmp_path / "resumed" / "checkpoints" / "step_4" / "trainer_state.json"))
    assert state["step"] == 4 and state["rows_consumed"] == 4 * state["global_batch_size"]
    ckpt = tmp_path / "resumed" / "checkpoints" / "step_2"
    assert sorted(os.listdir(ckpt)) == sorted(["COMPLETE", "MANIFEST.json", "config.yaml", "draft.safetensors", "draft_arch.json",
                                               "optimizer.pt", "rng", "trainer_state.json", "vocab.safetensors"])


@pytest.mark.slow
def test_same_loss_curve_in_every_layout(tmp_path):
    common = ["data.max_length=128", "train.global_batch_size=8", "train.max_steps=3", "train.eval_every=0",
              "train.save_every=0"]
    reference = losses(run(1, tmp_path / "single", *common)["history"])
    assert len(reference) == 3 and all(l > 0 for l in reference)
    layouts = {
        "tp2": (2, ["target.tp=2"]),
        "pp2": (2, ["target.pp=2"]),
        "ep2": (2, ["target.ep=2"]),
        "tp2_ep2_pp2": (8, ["target.tp=2", "target.ep=2", "target.pp=2", "target.sp=true"]),
    }
    for name, (world, extra) in layouts.items():
        curve = losses(run(world, tmp_path / name, *common, *extra)["history"])
        torch.testing.assert_close(torch.tensor(curve), torch.tensor(reference), rtol=2e-4, atol=1e-5,
                                   msg=f"layout {name} diverges from the single-process loss curve")
