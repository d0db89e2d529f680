"""Helpers of ``launch/gpu_check.sh`` (``make gpu-check``): the small Python pieces the shell script needs.

``python3 -m specforge_mcore.gpucheck <command>``:

* ``env``: one ``key=value`` line per fact about this machine (GPU, Python, torch, CUDA, Triton,
  Megatron-Core, Transformer Engine, transformers, setuptools). Never fails: a missing package is
  reported as ``MISSING (<why>)``; the shell script decides what is fatal.
* ``target-config NAME``: a built-in target shape (``smollm2``: SmolLM2-135M's exact config;
  ``qwen3-moe``: a small Qwen3-MoE) as one YAML flow mapping, the value of a config override
  (``target.random.hf_config={...}``).
* ``random-target FAMILY NAME``: write (once) a random target of that family and shape; print
  ``random target: <its directory>``.
* ``csrc-built DEVICE``: exit 1 (with the build hint) unless ``specforge_mcore._C`` has kernels for it.
* ``pytest-counts JUNIT_XML``: ``P passed, F failed, E errors, S skipped`` of a ``pytest --junitxml`` file.
* ``loss-falls METRICS_JSONL``: exit 1 unless the mean loss of the first ``--window`` logged steps is
  above the mean of the last ``--window`` (and every loss is finite); steps with no supervised position
  (loss 0) and skipped steps are left out. Prints the numbers.
* ``bench-summary LOG``: the paths' times of a ``specforge-mcore bench`` log and its ``ratio`` line, on one line.

Only the standard library at module level: ``env`` must run where Megatron-Core (or torch) is missing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import shutil
import sys
import xml.etree.ElementTree as ET

# SmolLM2-135M-Instruct's config.json (the target of the demo): its weights (500+ MB) do not travel to the
# GPU node, a random model of exactly this shape does.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                    rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True)
# A small Qwen3-MoE with more than the test defaults' 4 experts: 16 experts, top-4, GQA 8/4.
QWEN3_MOE_SMALL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                       num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                       num_experts=16, num_experts_per_tok=4, tie_word_embeddings=False)
TARGET_SHAPES = {"smollm2": SMOLLM2_135M, "qwen3-moe": QWEN3_MOE_SMALL}


def _version_of(module_name: str, attribute: str = "__version__") -> str:
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or a broken install raising anything at import
        return f"MISSING ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return str(getattr(module, attribute, "unknown"))


def environment() -> dict[str, str]:
    facts: dict[str, str] = {"python": sys.version.split()[0], "executable": sys.executable}
    try:
        import torch
    except Exception as exc:
        facts["torch"] = f"MISSING ({type(exc).__name__}: {exc})"
        return facts
    facts["torch"] = torch.__version__
    facts["torch_cuda"] = str(torch.version.cuda)
    facts["cuda_available"] = str(torch.cuda.is_available())
    if torch.cuda.is_available():
        facts["device"] = torch.cuda.get_device_name(0)
        major, minor = torch.cuda.get_device_capability(0)
        facts["capability"] = f"{major}.{minor}"
        facts["device_count"] = str(torch.cuda.device_count())
        facts["memory_gib"] = f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f}"
    else:
        facts["device"] = "none (no CUDA device visible)"
    facts["triton"] = _version_of("triton")
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception as exc:
        CUDA_HOME = f"MISSING ({type(exc).__name__})"
    facts["cuda_home"] = str(CUDA_HOME)
    facts["nvcc"] = shutil.which("nvcc") or (os.path.join(CUDA_HOME, "bin", "nvcc")
                                             if CUDA_HOME and os.path.exists(os.path.join(str(CUDA_HOME), "bin", "nvcc"))
                                             else "MISSING")
    from specforge_mcore.platform import has_transformer_engine, quiet_known_warnings

    quiet_known_warnings()
    facts["megatron_core"] = _version_of("megatron.core")
    if not facts["megatron_core"].startswith("MISSING"):
        import megatron.core

        facts["megatron_core_path"] = os.path.dirname(megatron.core.__file__)
    facts["transformer_engine"] = "present" if has_transformer_engine() else "absent (Megatron's local layers)"
    facts["transformers"] = _version_of("transformers")
    facts["safetensors"] = _version_of("safetensors")
    facts["setuptools"] = _version_of("setuptools")
    facts["ninja"] = shutil.which("ninja") or "MISSING"
    try:
        from specforge_mcore.ops import ttt_attention

        facts["csrc_op"] = ", ".join(d for d in ("cpu", "cuda") if ttt_attention.is_built(d)) or "not built"
    except Exception as exc:
        facts["csrc_op"] = f"not importable ({type(exc).__name__}: {exc})"
    return facts


def cmd_env(args: argparse.Namespace) -> int:
    for key, value in environment().items():
        print(f"{key}={value}")
    return 0


def yaml_flow(mapping: dict) -> str:
    """``{key: value, ...}`` that PyYAML reads back with the same types. (JSON would not do: PyYAML reads
    ``1e-05``, which has no dot, as a string.)"""
    def scalar(value):
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            text = repr(value)
            mantissa, e, exponent = text.partition("e")
            return (mantissa if "." in mantissa else mantissa + ".0") + e + exponent
        return str(value)

    return "{" + ", ".join(f"{key}: {scalar(value)}" for key, value in mapping.items()) + "}"


def cmd_target_config(args: argparse.Namespace) -> int:
    print(yaml_flow(TARGET_SHAPES[args.name]))
    return 0


def cmd_random_target(args: argparse.Namespace) -> int:
    from specforge_mcore.target.random import random_target

    print(f"random target: {random_target(args.family, TARGET_SHAPES[args.name], seed=args.seed)}")
    return 0


def cmd_csrc_built(args: argparse.Namespace) -> int:
    from specforge_mcore.ops import ttt_attention

    built = ttt_attention.is_built(args.device)
    print(f'is_built("{args.device}") = {built}')
    if not built:
        print(ttt_attention.build_hint(args.device))
    return 0 if built else 1


def pytest_counts(path: str) -> dict[str, int]:
    """Counts of a JUnit XML report (pytest --junitxml): one <testsuite>, or several under <testsuites>."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def cmd_pytest_counts(args: argparse.Namespace) -> int:
    c = pytest_counts(args.junit_xml)
    print(f"{c['passed']} passed, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped")
    return 0


def loss_trend(path: str, window: int) -> tuple[bool, str]:
    """(falls, description) of the ``loss`` records of a metrics.jsonl."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    return False, f"{path}:{number}: not JSON ({exc})"
    # A step with no supervised position (a random target's argmax outside the draft vocabulary
    # everywhere) logs loss 0, and a skipped (non-finite) step logs nothing usable: neither counts.
    train = [r for r in records if "loss" in r]
    usable = [r for r in train if not r.get("skipped") and sum(r.get("valid") or [1]) > 0]
    losses = [float(r["loss"]) for r in usable]
    left_out = f", {len(train) - len(usable)} without supervised positions left out" if len(usable) < len(train) else ""
    if len(losses) < 2 * window:
        return False, (f"{len(losses)} logged steps with a loss in {path}{left_out}, need at least {2 * window}")
    if not all(math.isfinite(x) for x in losses):
        return False, f"non-finite loss in {path}: {losses}"
    first = sum(losses[:window]) / window
    last = sum(losses[-window:]) / window
    speeds = [float(r["tokens_per_s"]) for r in records if "tokens_per_s" in r][1:]  # the first step warms up
    speed = f", {sorted(speeds)[len(speeds) // 2]:.0f} tok/s" if speeds else ""
    peak = max((int(r.get("peak_memory_bytes", 0)) for r in records), default=0)
    memory = f", peak {peak / 2**30:.2f} GiB" if peak else ""
    verdict = ">" if first > last else "NOT >"
    return first > last, (f"loss {losses[0]:.3f}->{losses[-1]:.3f} over {len(losses)} steps{left_out} "
                          f"(mean first {window} {first:.3f} {verdict} last {window} {last:.3f}){speed}{memory}")


def cmd_loss_falls(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.metrics):
        print(f"{args.metrics} does not exist")
        return 1
    falls, text = loss_trend(args.metrics, args.window)
    print(text)
    return 0 if falls else 1


_ROW = re.compile(r"^(?P<name>\S.*?)\s+(?P<ms>\d+\.\d+)\s+(?P<mib>-?\d+\.\d+)\s*$")


def bench_summary(text: str) -> str:
    """``name time-ms`` of every table row of the LAST table and the last ``ratio`` line, on one line."""
    lines = text.splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("path") and "time ms" in line]
    rows = []
    if headers:
        for line in lines[headers[-1] + 1:]:
            match = _ROW.match(line)
            if not match:
                break
            rows.append(f"{match['name'].strip()} {float(match['ms']):.1f}ms")
    ratios = [line.strip() for line in lines if line.startswith("ratio ")]
    parts = rows + ratios[-1:]
    return "; ".join(parts) if parts else "no bench table in the log"


def cmd_bench_summary(args: argparse.Namespace) -> int:
    with open(args.log, encoding="utf-8", errors="replace") as fh:
        print(bench_summary(fh.read()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specforge_mcore.gpucheck", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env").set_defaults(fn=cmd_env)
    p = sub.add_parser("target-config")
    p.add_argument("name", choices=sorted(TARGET_SHAPES))
    p.set_defaults(fn=cmd_target_config)
    p = sub.add_parser("random-target")
    p.add_argument("family")
    p.add_argument("name", choices=sorted(TARGET_SHAPES))
    p.add_argument("--seed", type=int, default=1234)
    p.set_defaults(fn=cmd_random_target)
    p = sub.add_parser("csrc-built")
    p.add_argument("device", choices=["cpu", "cuda"])
    p.set_defaults(fn=cmd_csrc_built)
    p = sub.add_parser("pytest-counts")
    p.add_argument("junit_xml")
    p.set_defaults(fn=cmd_pytest_counts)
    p = sub.add_parser("loss-falls")
    p.add_argument("metrics")
    p.add_argument("--window", type=int, default=5)
    p.set_defaults(fn=cmd_loss_falls)
    p = sub.add_parser("bench-summary")
    p.add_argument("log")
    p.set_defaults(fn=cmd_bench_summary)
    args = parser.parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
