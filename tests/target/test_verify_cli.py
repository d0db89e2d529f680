"""``verify-target`` as a new user runs it, on the real SmolLM2 target that ``make setup`` prepares: its
hidden states reach hundreds, where an absolute 1e-4 would fail on fp32 summation order alone; the
scaled difference must pass, and the draft shards must reassemble the batch."""

import os
import subprocess
import sys

import pytest

from specforge_mcore.target.prepare import DEFAULT_SMOLLM2_DIR, require_prepared

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_verify_target_passes_on_smollm2():
    require_prepared(DEFAULT_SMOLLM2_DIR)
    proc = subprocess.run([sys.executable, "-m", "specforge_mcore.cli", "verify-target", "--hf-dir", DEFAULT_SMOLLM2_DIR,
                           "--seq-len", "128"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    row = [line for line in proc.stdout.splitlines() if line.startswith("TP1 ")]
    assert row and " ok " in row[0], proc.stdout
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("max_scaled_diff logits=")
    logits, features = (float(part.split("=")[1]) for part in last.split()[1:])
    assert logits < 1e-4 and features < 1e-4, last
