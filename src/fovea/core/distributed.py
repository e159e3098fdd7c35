"""Process-group setup: none for one device, torchrun (env://) for many."""
from __future__ import annotations

import os
from datetime import timedelta
import re
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Rank layout of this process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where collectives' tensors live (NCCL needs CUDA tensors)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


DEVICE_FORMS = "auto, cpu, cuda, cuda:N"
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def check_device(device_pref: str) -> None:
    """``ValueError`` naming ``train.device`` for a value other than auto | cpu | cuda | cuda:N, or for a
    CUDA device this machine does not have (instead of silently training on the CPU)."""
    if not _DEVICE.match(device_pref):
        raise ValueError(f"train.device: {device_pref!r} is not one of {DEVICE_FORMS}")
    if device_pref.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise ValueError(f"train.device={device_pref}: no CUDA GPU is visible (torch {torch.__version__}, "
                             f"{build}); use train.device=cpu or auto")
        if ":" in device_pref and int(device_pref.split(":")[1]) >= n:
            raise ValueError(f"train.device={device_pref}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")


def init_distributed(device_pref: str = "auto") -> tuple[DistInfo, torch.device]:
    """Initialise a process group only when launched by torchrun with WORLD_SIZE > 1.

    Backend: NCCL on CUDA, gloo on CPU. Returns the rank info and this process's device.
    ``device_pref`` is auto | cpu | cuda | cuda:N (checked by :func:`check_device`).
    """
    check_device(device_pref)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref.startswith("cuda")
    if use_cuda:
        idx = local if device_pref in ("auto", "cuda") else int(device_pref.split(":")[1])
        torch.cuda.set_device(idx)
        device = torch.device("cuda", idx)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if restart > 0 and os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
            # after a torchrun restart the store can still hold the failed round's addresses, which gloo would
            # try to connect to: keep each round's keys apart
            agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # the agent hosts the store
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                  is_master=not agent and rank == 0, timeout=timedelta(minutes=30))
            dist.init_process_group(backend=backend, store=dist.PrefixStore(f"fovea/round_{restart}", store),
                                    rank=rank, world_size=world)
        else:
            dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local, str(device)), device


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average scalars over ranks (identity on one process)."""
    if info.world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return {k: float(v) / info.world for k, v in zip(keys, t.cpu())}


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True when ``flag`` is true on any rank (the flag itself on one process)."""
    return agreed_max(float(flag), info) > 0


def agreed_max(value: float, info: DistInfo) -> float:
    """The largest of every rank's ``value`` (the value itself on one process)."""
    if info.world == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


T = TypeVar("T")


class RankError(ValueError):
    """Raised on the other ranks when the main rank's decision failed (same message)."""


def main_decides(info: DistInfo, fn: Callable[[], T]) -> T:
    """Run ``fn`` on the main rank and hand its result (or its failure) to every rank.

    On one process this is ``fn()``. Under torchrun the other ranks receive the result by broadcast;
    when ``fn`` raises on the main rank, the exception propagates there and the other ranks raise
    :class:`RankError` with the same message, instead of waiting forever at the next collective.
    """
    if info.world == 1:
        return fn()
    box: list = [None]
    err: BaseException | None = None
    if info.is_main:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - re-raised below after the others are told
            err = e
            box[0] = ("error", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0)
    if err is not None:
        raise err
    status, value = box[0]
    if status != "ok":
        raise RankError(f"rank {info.rank}: the main rank failed: {value}")
    return value


def barrier(info: DistInfo) -> None:
    """Synchronise ranks (no-op on one process)."""
    if info.world > 1:
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group if one was created, after a barrier: a rank that tears gloo down while
    another still talks to it can abort at exit ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            try:
                dist.barrier()
            except RuntimeError:  # a peer is already gone: tear down anyway
                pass
        dist.destroy_process_group()
