"""Process-group setup: none for one device, torchrun (env://) for many."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Rank layout of this process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str = "auto") -> tuple[DistInfo, torch.device]:
    """Initialise a process group only when launched by torchrun with WORLD_SIZE > 1.

    Backend: NCCL on CUDA, gloo on CPU. Returns the rank info and this process's device.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={device_pref!r} but CUDA is not available")
    if use_cuda:
        idx = local if device_pref in ("auto", "cuda") else int(device_pref.split(":")[1])
        torch.cuda.set_device(idx)
        device = torch.device("cuda", idx)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local), device


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average scalars over ranks (identity on one process)."""
    if info.world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / info.world for k, v in zip(keys, t)}


def barrier(info: DistInfo) -> None:
    """Synchronise ranks (no-op on one process)."""
    if info.world > 1:
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group if one was created."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
