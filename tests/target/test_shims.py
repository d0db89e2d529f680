"""Megatron shims are chosen by the missing capability, not by the device (specforge_mcore/platform.py).

Each case runs in a fresh interpreter with the capability probes replaced, so no patch leaks into
this process or another test.
"""

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from specforge_mcore import platform

    cuda, te, delete = json.loads(sys.argv[1])
    platform.has_cuda = lambda: cuda
    platform.has_transformer_engine = lambda: te
    originals = dict(current_device=torch.cuda.current_device, synchronize=torch.cuda.synchronize,
                     Stream=torch.cuda.Stream)
    if delete:  # a Megatron-Core version without this shim's target
        import importlib
        module, attribute = delete
        delattr(importlib.import_module(module), attribute)
    platform.apply_platform_shims()
    report = platform.shim_report()
    platform.has_cuda = lambda: not cuda  # idempotent: a second call changes nothing
    platform.apply_platform_shims()
    assert platform.shim_report() == report

    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils
    print(json.dumps(dict(
        report=report,
        current_device_patched=torch.cuda.current_device is not originals["current_device"],
        synchronize_patched=torch.cuda.synchronize is not originals["synchronize"],
        stream_patched=torch.cuda.Stream is not originals["Stream"],
        schedules_torch_patched=schedules.torch is not torch,
        te_general_gemm=repr(getattr(moe_utils, "te_general_gemm", "<unbound>")),
        mla_have_te=getattr(multi_latent_attention, "HAVE_TE", "<unbound>"),
    )))
""")

CUDA_SHIMS = ("current_device", "streams_and_events", "synchronize", "schedules_device", "split_sizes_to_numpy",
              "tied_embedding_sync", "uneven_tp_collectives")
TE_SHIMS = ("router_te_general_gemm", "mla_have_te")


def run_with(cuda: bool, te: bool, delete=None) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps([cuda, te, delete])],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_te_shims_apply_on_a_gpu_without_transformer_engine():
    """CUDA present, TE absent: the router's te_general_gemm and MLA's HAVE_TE are shimmed (the NameError
    of Megatron-Core 0.16.1 happens on GPUs too); no CUDA shim is applied."""
    got = run_with(cuda=True, te=False)
    report = got["report"]
    for name in CUDA_SHIMS:
        assert report[name] == "not needed: cuda present", (name, report)
    assert not got["current_device_patched"] and not got["synchronize_patched"] and not got["stream_patched"]
    assert not got["schedules_torch_patched"]
    for name in TE_SHIMS:
        assert report[name] == "applied", (name, report)
    assert got["te_general_gemm"] == "None"
    assert got["mla_have_te"] is False


def test_cuda_shims_apply_without_cuda_and_a_missing_target_is_skipped():
    """CUDA absent, TE present: only the CUDA shims apply; one whose target this Megatron-Core lacks is
    skipped with the reason, not a crash."""
    got = run_with(cuda=False, te=True,
                   delete=["megatron.core.tensor_parallel.mappings", "_reduce_scatter_along_first_dim"])
    report = got["report"]
    for name in set(CUDA_SHIMS) - {"uneven_tp_collectives"}:
        assert report[name] == "applied", (name, report)
    assert report["uneven_tp_collectives"].startswith("skipped:")
    assert "_reduce_scatter_along_first_dim" in report["uneven_tp_collectives"]
    assert got["current_device_patched"] and got["synchronize_patched"] and got["stream_patched"]
    assert got["schedules_torch_patched"]
    for name in TE_SHIMS:
        assert report[name] == "not needed: transformer_engine present", (name, report)
    assert got["mla_have_te"] is True  # 0.16.1 sets it from an import that succeeds without TE
