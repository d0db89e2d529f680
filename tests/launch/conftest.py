"""Shared by the launcher tests: the tiny run every launcher must reproduce, and how to compare curves.

Each launcher runs ``specforge-mcore train`` on the tiny config in 2 processes (EP=2) as a real job; its
``metrics.jsonl`` must give the same loss curve as the same run started in-process with ``spawn``.
The draft vocabulary is large so that the random target's argmax falls inside it and every step has
supervised positions (a curve of zeros would prove nothing).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specforge_mcore.config import config_to_dict, load_config
from specforge_mcore.parallel import spawn
from specforge_mcore.train.run import train_worker

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
OVERRIDES = ["target.ep=2", "train.max_steps=3", "train.eval_every=0", "train.save_every=0", "train.plot=false",
             "data.max_length=128", "train.global_batch_size=4", "draft.draft_vocab_size=32768"]


def require(*tools: str, modules: tuple[str, ...] = ()) -> None:
    """Skip without the tools on a developer machine; in CI (which installs them) their absence fails."""
    import importlib.util

    missing = [t for t in tools if shutil.which(t) is None]
    missing += [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return
    message = f"{', '.join(missing)} not found (installed by .ci/install-system-deps.sh)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def curve(records: list[dict]) -> list[tuple[int, float, list[int]]]:
    return [(r["step"], r["loss"], r["valid"]) for r in records if "loss" in r]


@pytest.fixture(scope="session")
def plain_curve(tmp_path_factory) -> list[tuple[int, float, list[int]]]:
    """The reference: the same run, started in-process with ``spawn`` (once per session)."""
    out = tmp_path_factory.mktemp("plain")
    cfg = load_config(str(ROOT / "configs/tiny.yaml"), [f"train.out_dir={out}", *OVERRIDES])
    history = spawn(train_worker, WORLD, config_to_dict(cfg), str(out))[0]["history"]
    result = curve(history)
    assert len(result) == 3 and all(loss > 0 for _, loss, _ in result), result
    return result


class Launch:
    """What the launcher tests share (a fixture, because test modules cannot import a conftest)."""

    root, world, overrides = ROOT, WORLD, OVERRIDES

    def __init__(self, request):
        self.request = request  # the reference run starts only when a test first compares with it

    require = staticmethod(require)
    env = staticmethod(lambda **extra: launcher_env(**extra))
    run = staticmethod(lambda cmd, env, log, timeout=900: run_launcher(cmd, env, log, timeout))

    def train_args(self, out_dir) -> list[str]:
        return ["--config", "configs/tiny.yaml", "--out", str(out_dir), *OVERRIDES]

    def assert_same_curve(self, out_dir, launcher: str) -> None:
        assert_same_curve(out_dir, self.request.getfixturevalue("plain_curve"), launcher)


@pytest.fixture
def launch(request) -> Launch:
    return Launch(request)


def launcher_env(**extra: str) -> dict:
    env = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED="1", **extra)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def run_launcher(cmd: list[str], env: dict, log: Path, timeout: int = 900) -> str:
    """Run a launcher from the repository root; fail with the tail of its output when it fails."""
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{text[-4000:]}"
    return text


def assert_same_curve(out_dir: Path, plain: list, launcher: str) -> None:
    with open(out_dir / "metrics.jsonl") as fh:
        launched = curve([json.loads(line) for line in fh if line.strip()])
    assert [s for s, _, _ in launched] == [s for s, _, _ in plain], f"{launcher}: steps differ"
    assert [v for _, _, v in launched] == [v for _, _, v in plain], f"{launcher}: supervised positions differ"
    torch.testing.assert_close(torch.tensor([l for _, l, _ in launched]), torch.tensor([l for _, l, _ in plain]),
                               rtol=1e-6, atol=1e-7, msg=f"{launcher}: loss curve differs from the plain run")
