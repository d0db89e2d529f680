"""Collectives: one module owns them (specforge_mcore/collectives.py), and they carry whatever device a
tensor is on over whatever backend its group has."""

import ast
import pathlib

import torch

from specforge_mcore import collectives
from specforge_mcore.parallel import spawn

REPO = pathlib.Path(__file__).resolve().parents[1]
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "barrier", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather",
               "scatter", "send", "recv", "isend", "irecv", "batch_isend_irecv", "P2POp", "all_to_all",
               "all_to_all_single", "monitored_barrier", "gather_object", "scatter_object_list"}
OWNER = REPO / "specforge_mcore" / "collectives.py"


def direct_collective_calls(path: pathlib.Path) -> list[str]:
    """``dist.<collective>`` / ``torch.distributed.<collective>`` uses in one file (any alias of the module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "distributed" for a in node.names):
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            hits = [a.name for a in node.names if a.name in COLLECTIVES]
            if hits:
                return [f"{path.relative_to(REPO)}:{node.lineno}: from torch.distributed import {', '.join(hits)}"]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
            base = ast.unparse(node.value)
            if base in aliases:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {base}.{node.attr}")
    return found


def test_no_collective_outside_the_collectives_module():
    files = [p for d in ("specforge_mcore", "kernels") for p in (REPO / d).rglob("*.py") if p != OWNER]
    assert len(files) > 50
    offenders = [hit for p in files for hit in direct_collective_calls(p)]
    assert not offenders, "call specforge_mcore.collectives instead of torch.distributed directly:\n" + "\n".join(offenders)


def test_the_scan_finds_direct_calls(tmp_path):
    sample = REPO / "specforge_mcore" / "_scan_sample_for_test.py"
    sample.write_text("import torch.distributed as d\nfrom torch import distributed\n"
                      "def f(t):\n    d.all_reduce(t)\n    distributed.barrier()\n")
    try:
        hits = direct_collective_calls(sample)
    finally:
        sample.unlink()
    assert [h.split(": ")[1] for h in hits] == ["d.all_reduce", "distributed.barrier"]


def test_init_backend_carries_cpu_and_cuda_where_cuda_exists():
    expected = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    assert collectives.init_backend() == expected


def _worker(rank, world):
    import torch.distributed as dist

    from specforge_mcore.parallel import init_distributed

    init_distributed()
    out = {}
    out["sum"] = collectives.all_reduce(torch.tensor([rank + 1.0])).item()
    out["max"] = collectives.all_reduce(torch.tensor([float(rank)]), op="max").item()
    out["gather"] = [t.item() for t in collectives.all_gather(torch.tensor([rank * 10]))]
    out["broadcast"] = collectives.broadcast(torch.tensor([rank + 5]), src=1).item()
    out["object"] = collectives.broadcast_object({"from": rank}, src=1)
    out["objects"] = collectives.all_gather_object(rank * 2)
    # A group that carries only CUDA tensors (NCCL-like, as Megatron may make them): a CPU tensor must be
    # staged; here the staging rule is checked on the config string without a GPU.
    out["kinds"] = sorted(collectives._device_types(dist.group.WORLD))
    buf = torch.zeros(2)
    peer = 1 - rank
    collectives.exchange([(torch.full((2,), float(rank)), peer)], [(buf, peer)])
    out["exchange"] = buf.tolist()
    collectives.barrier()
    return out


def test_collectives_over_gloo_in_two_processes():
    results = spawn(_worker, 2, threads=1)
    for rank, r in enumerate(results):
        assert r["sum"] == 3.0 and r["max"] == 1.0 and r["gather"] == [0, 10]
        assert r["broadcast"] == 6 and r["object"] == {"from": 1} and r["objects"] == [0, 2]
        assert "cpu" in r["kinds"]  # gloo reports "cpu:gloo,cuda:gloo"
        assert r["exchange"] == [float(1 - rank)] * 2


def test_staging_rule(monkeypatch):
    monkeypatch.setattr(collectives, "_device_types", lambda group: {"cuda"})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert collectives._carrier(torch.zeros(1), None) == torch.device("cuda", 0)
    monkeypatch.setattr(collectives, "_device_types", lambda group: {"cpu", "cuda"})
    assert collectives._carrier(torch.zeros(1), None) is None
