"""Atomic checkpoints (temp file + rename), loaded with ``weights_only=True``, and RNG state capture."""
from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, public_mode())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, damaged, not a checkpoint)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose unpickling would import or call arbitrary code: refused, nothing executed."""


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely: ``weights_only=True`` (tensors and plain containers only).

    Raises :class:`UnsafeCheckpointError` (one line, naming the file and the refused global) for a
    file that would execute code on load, :class:`CheckpointError` for a truncated or damaged one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg:
            m = _GLOBAL.search(msg)
            what = f"it imports {m.group(1)}" if m else "it holds objects other than tensors and plain containers"
            raise UnsafeCheckpointError(f"refused to load {path}: {what}, which would run code on load "
                                        "(only weights-only checkpoints are read)") from None
        raise CheckpointError(f"cannot read checkpoint {path}: {msg.splitlines()[0] if msg else type(e).__name__}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        first = (str(e).splitlines()[0].split(". ")[0] if str(e) else "") or type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or damaged?): {first}") from None


def public_mode() -> int:
    """The mode of an ordinary new file under the current umask (0644 with the usual umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states, as weights_only-loadable objects."""
    np_state = cast(tuple, np.random.get_state(legacy=True))
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return tuple(_tuplify(v) for v in x)
    return x
