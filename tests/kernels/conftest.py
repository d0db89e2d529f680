"""Running the Triton kernels under the interpreter, and fixtures of the kernel tests.

Triton chooses compile-or-interpret when a kernel is decorated (at import), so the interpreter tests
(names containing ``interpreted``) run in a child pytest with ``TRITON_INTERPRET=1`` set from the start;
the variable never reaches this process, where other tests import the same kernels compiled. Outside
the child they are skipped here, not lost: each file's ``test_under_triton_interpreter`` runs them.
"""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    here = pathlib.Path(__file__).parent
    for item in items:
        if here not in pathlib.Path(str(item.fspath)).parents:
            continue
        if "interpreted" in item.name and not INTERPRETED:
            item.add_marker(pytest.mark.skip(reason="runs in the TRITON_INTERPRET=1 child pytest"))
        if "under_triton_interpreter" in item.name and INTERPRETED:
            item.add_marker(pytest.mark.skip(reason="already inside the interpreter run"))


@pytest.fixture
def run_interpreted(request):
    """Run this test file's ``interpreted`` tests in a child pytest under TRITON_INTERPRET=1."""

    def run(timeout: float = 900) -> None:
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "pytest", str(request.path), "-k", "interpreted", "-q", "-p", "no:cacheprovider"]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        summary = (proc.stdout.strip().splitlines() or [""])[-1]
        assert proc.returncode == 0, (f"interpreter tests failed ({summary}):\n"
                                      f"{proc.stdout[-8000:]}\n{proc.stderr[-3000:]}")
        assert " passed" in summary and "skipped" not in summary, f"interpreter tests did not all run: {summary}"

    return run


@pytest.fixture
def spawnable(monkeypatch):
    """Lets spawned ranks import the test module by name (importlib mode leaves sys.path alone)."""
    monkeypatch.syspath_prepend(str(REPO))
