"""Every ``torch.distributed`` collective of the project goes through this module (a test enforces it).

Why one place: NCCL carries only CUDA tensors and gloo only CPU ones (for most collectives). On a GPU
cluster the default group is created as ``cpu:gloo,cuda:nccl`` (``init_backend``), so both kinds of
tensor have a backend; a group that still cannot carry a tensor's device (a Megatron group made
NCCL-only, say) gets the tensor moved to a device it can carry and the result copied back. Callers never
think about which backend a group has.

Every function names the group it runs on (``None`` is the world group, chosen on purpose).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def init_backend() -> str:
    """The backend string for the default group: both CPU (gloo) and CUDA (NCCL) tensors where CUDA exists."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def _device_types(group) -> set[str]:
    """Device types the group's backend carries: from its config (e.g. ``cpu:gloo,cuda:nccl``)."""
    config = str(dist.get_backend_config(group)) if hasattr(dist, "get_backend_config") else dist.get_backend(group)
    if ":" in config:
        return {part.split(":")[0].strip() for part in config.split(",")}
    return {"cuda"} if config.strip() == "nccl" else {"cpu"}


def _carrier(tensor: torch.Tensor, group) -> Optional[torch.device]:
    """None when the group carries ``tensor`` where it is; else the device to stage it on."""
    kinds = _device_types(group)
    if tensor.device.type in kinds:
        return None
    if "cuda" in kinds:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In place over ``group``; returns ``tensor``."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return tensor
    stage = _carrier(tensor, group)
    if stage is None:
        dist.all_reduce(tensor, op=_OPS[op], group=group)
    else:
        staged = tensor.to(stage)
        dist.all_reduce(staged, op=_OPS[op], group=group)
        tensor.copy_(staged)
    return tensor


def all_gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all ranks), in rank order of ``group``, on tensor's device."""
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if world == 1:
        return [tensor]
    stage = _carrier(tensor, group)
    source = tensor.contiguous() if stage is None else tensor.to(stage).contiguous()
    pieces = [torch.empty_like(source) for _ in range(world)]
    dist.all_gather(pieces, source, group=group)
    return pieces if stage is None else [p.to(tensor.device) for p in pieces]


def broadcast(tensor: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:
    """In place from global rank ``src``; returns ``tensor``."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return tensor
    stage = _carrier(tensor, group)
    if stage is None:
        dist.broadcast(tensor, src=src, group=group)
    else:
        staged = tensor.to(stage)
        dist.broadcast(staged, src=src, group=group)
        tensor.copy_(staged)
    return tensor


def barrier(group=None) -> None:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.barrier(group=group)


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """A picklable object from rank ``src`` (our own values only: never a user-supplied file)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=group)
    return holder[0]


def all_gather_object(obj: Any, group=None) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [obj]
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, obj, group=group)
    return everyone


def exchange(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]], group=None) -> None:
    """Point-to-point: post every send ``(tensor, global dest rank)`` and receive ``(buffer, global src rank)``
    as one batch, and wait for all of them. Buffers must be on a device the group carries."""
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer, group=group) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, peer, group=group) for t, peer in recvs]
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
