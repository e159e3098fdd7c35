"""Training checkpoints in two formats, each resumable on any world size and strategy.

- ``full``: one ``last.pt`` (``torch.save``, weights-only loadable) written by rank 0: the model's state dict,
  the optimizer's, and the run state (step, RNG states of every rank, results, config). Under FSDP the model
  and optimizer are gathered to rank 0 first; the optimizer state is then keyed by parameter name.
- ``sharded``: a ``torch.distributed.checkpoint`` folder ``last.dcp`` in which every rank writes its own
  shards (no rank ever holds the whole model), plus ``meta.pt`` with the run state. Loading reshards: 2 ranks
  -> 1 process -> 2 ranks all read the same folder.

Both are written atomically (a temporary file / folder, then a rename) and loaded into the current model
layout (plain, DDP or FSDP) with ``torch.distributed.checkpoint.state_dict``.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fovea.core.checkpoint import load_checkpoint, save_atomic
from fovea.core.distributed import DistInfo, barrier
from fovea.train.sharding import fsdp_modules

FORMATS = ("auto", "full", "sharded")
META = "meta.pt"


def resolve_format(fmt: str, fsdp: bool) -> str:
    """``full`` or ``sharded`` (``auto``: sharded under FSDP, full otherwise)."""
    if fmt not in FORMATS:
        raise ValueError(f"train.checkpoint_format: {fmt!r} is not one of {', '.join(FORMATS)}")
    return ("sharded" if fsdp else "full") if fmt == "auto" else fmt


def _options(full: bool, cpu_offload: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=full, cpu_offload=cpu_offload)


def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def model_and_optimizer_state(method: nn.Module, optimizer: torch.optim.Optimizer, full: bool) -> tuple[dict, dict]:
    """State dicts of ``method`` and of its student's ``optimizer`` (keyed by parameter name), sharded as the
    model is, or gathered to rank 0 on the CPU (``full``: the other ranks get empty dicts)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    opts = _options(full, cpu_offload=full and _dist())
    student = method.student
    return (get_model_state_dict(method, options=opts),
            get_optimizer_state_dict(student, optimizer, options=opts))  # type: ignore[arg-type]


def save_full(method: nn.Module, optimizer: torch.optim.Optimizer, run_state: dict, path: Path,
              info: DistInfo, keep: Path | None) -> None:
    """``last.pt`` (and a copy at ``keep``) from rank 0; under FSDP every rank takes part in the gathering."""
    if fsdp_modules(method):
        model, optim = model_and_optimizer_state(method, optimizer, full=True)
    elif info.is_main:
        model, optim = method.state_dict(), optimizer.state_dict()
    if not info.is_main:
        return
    state = {"model": model, "optimizer": optim, **run_state}
    save_atomic(state, path)
    if keep is not None:
        save_atomic(state, keep)


def save_sharded(method: nn.Module, optimizer: torch.optim.Optimizer, run_state: dict, folder: Path,
                 info: DistInfo, keep: Path | None) -> None:
    """Every rank writes its shards into a temporary folder; rank 0 adds ``meta.pt`` and renames it into place
    (the old folder is removed after the new one is in place; a copy at ``keep`` is made of hard links)."""
    import torch.distributed.checkpoint as dcp
    tmp = folder.with_name(f".{folder.name}.tmp")
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier(info)
    model, optim = model_and_optimizer_state(method, optimizer, full=False)
    dcp.save({"model": model, "optimizer": optim}, checkpoint_id=str(tmp), no_dist=not _dist())
    barrier(info)  # every rank's shards are on disk
    if info.is_main:
        save_atomic({**run_state, "format": "sharded"}, tmp / META)
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)  # a crash between the two renames leaves .last.dcp.old, which resume reads
        shutil.rmtree(old, ignore_errors=True)
        if keep is not None:
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(folder, keep, copy_function=os.link)
    barrier(info)


def read_meta(folder: Path) -> dict:
    """The run state of a sharded checkpoint folder (step, RNG states, results, config, world)."""
    if not (folder / ".metadata").is_file():
        from fovea.core.checkpoint import CheckpointError
        raise CheckpointError(f"{folder} is not a complete sharded checkpoint (no .metadata)")
    return load_checkpoint(folder / META)


def read_full(folder: Path) -> dict:
    """A sharded checkpoint read whole in this process, in the layout of ``last.pt`` without the optimizer:
    ``{"model": full state dict, **run state}`` (for evaluation, export and ``train.init_from``)."""
    import warnings
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
    meta = read_meta(folder)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        model = _load_state_dict_from_keys({"model"}, checkpoint_id=str(folder))["model"]
    return {**meta, "model": model}


def load_sharded(method: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Load a sharded checkpoint folder into the current layout (every rank; resharded by DCP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    model, optim = model_and_optimizer_state(method, optimizer, full=False)
    state = {"model": model, "optimizer": optim}
    dcp.load(state, checkpoint_id=str(folder), no_dist=not _dist())
    set_model_state_dict(method, state["model"], options=_options(False))
    set_optimizer_state_dict(method.student, optimizer, state["optimizer"], options=_options(False))  # type: ignore[arg-type]


def load_full(method: nn.Module, optimizer: torch.optim.Optimizer, ckpt: dict) -> None:
    """Load ``last.pt``'s model and optimizer (every rank holds the file's full tensors)."""
    osd = ckpt["optimizer"]
    by_index = all(isinstance(k, int) for k in osd.get("state", {})) and all(
        all(isinstance(p, int) for p in g["params"]) for g in osd.get("param_groups", []))
    if not fsdp_modules(method) and by_index:
        method.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(osd)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    if fsdp_modules(method):
        set_model_state_dict(method, ckpt["model"], options=_options(True))
    else:
        method.load_state_dict(ckpt["model"])
    student: nn.Module = method.student  # type: ignore[assignment]
    if by_index:
        osd = by_name(osd, student, optimizer)
    set_optimizer_state_dict(student, optimizer, osd, options=_options(True))


def by_name(osd: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """An ``optimizer.state_dict()`` (parameters numbered in the order of the param groups) keyed by the
    parameter names of ``model`` instead, as ``torch.distributed.checkpoint.state_dict`` reads it."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups = []
    for g in osd["param_groups"]:
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [order[i] for i in g["params"]]})
    return {"state": {order[i]: st for i, st in osd["state"].items()}, "param_groups": groups}
