"""Learning on the real SmolLM2 target: a short CPU run must lift the draft's held-out step-0 accuracy
far above the untrained draft's. A broken alignment (features of the wrong position, the mask on the
wrong token, a wrong teacher shift) leaves the draft near its starting accuracy. It runs in fp32 and in
the production policy (bf16 target, bf16 draft compute over fp32 master weights), which must learn as
well: the same thresholds hold for both."""

import json
import os

import pytest

from specforge_mcore.config import config_to_dict, load_config
from specforge_mcore.parallel import spawn
from specforge_mcore.target.prepare import DEFAULT_SMOLLM2_DIR, require_prepared
from specforge_mcore.train.run import train_worker


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_short_run_lifts_held_out_accuracy(tmp_path, dtype):
    require_prepared(DEFAULT_SMOLLM2_DIR)
    cfg = load_config("configs/demo-smollm2.yaml", [
        f"train.out_dir={tmp_path}", "data.train_files=[sharegpt]", "data.features=null", "data.max_samples=200", "data.max_length=96", "data.eval_fraction=0.1",
        "draft.draft_vocab_size=1024", "draft.ttt_steps=3", "train.global_batch_size=8", "train.max_steps=16",
        "train.eval_every=0", "train.eval_batches=2", "train.save_every=0", "train.plot=false", "optim.lr=4e-3",
        "optim.warmup_steps=2", f"target.dtype={dtype}", f"draft.dtype={dtype}", "train.eval_spec_prompts=4",
        "train.eval_spec_max_new_tokens=24"])
    (result,) = spawn(train_worker, 1, config_to_dict(cfg), str(tmp_path), False, True)
    before = result["eval_before"]["eval_acc"][0]
    after = [r for r in result["history"] if "eval_acc" in r][-1]["eval_acc"][0]
    losses = [r["loss"] for r in result["history"] if "loss" in r]
    print(f"{dtype}: held-out step-0 accuracy: untrained {before:.3f} -> trained {after:.3f}; loss {losses[0]:.2f} -> {losses[-1]:.2f}")
    assert losses[-1] < 0.7 * losses[0]
    assert after > before + 0.12, f"step-0 accuracy only went from {before:.3f} to {after:.3f}"
    # The held-out acceptance-length estimates rise with it (the chained product, which ignores that easy
    # positions come in runs, by far more than the decoding replay), and the best checkpoint is named.
    last = [r for r in result["history"] if "eval_sim_al" in r][-1]
    al_before, al_after = result["eval_before"]["eval_sim_al"], last["eval_sim_al"]
    chain_before, chain_after = result["eval_before"]["eval_chain_al"], last["eval_chain_al"]
    print(f"{dtype}: held-out acceptance length, decoding replay {al_before:.3f} -> {al_after:.3f}, "
          f"chained product {chain_before:.3f} -> {chain_after:.3f}")
    assert chain_after > chain_before + 0.1
    assert al_after > al_before + 0.01 and al_after < chain_after
    # Real speculative decoding on 4 held-out prompts (train.eval_spec_prompts), before and after: lossless,
    # and the trained draft gets more tokens accepted than the untrained one (which gets none).
    final = [r for r in result["history"] if "eval_spec_al" in r][-1]
    spec_before = result["eval_before"]["eval_spec_al"]
    print(f"{dtype}: speculative decoding on 4 held-out prompts: acceptance length {spec_before:.3f} -> "
          f"{final['eval_spec_al']:.3f} (estimate {al_after:.3f})")
    assert final["eval_spec_lossless"] and result["eval_before"]["eval_spec_lossless"]
    assert final["eval_spec_al"] > spec_before
    best = json.load(open(tmp_path / "best.json"))
    assert best["eval_sim_al"] == pytest.approx(al_after) and os.path.isdir(best["checkpoint"])
