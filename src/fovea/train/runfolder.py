"""The run's inputs and folder guards: every data source probed before work, one run at a time (a lock
file), which checkpoint to resume from, and whether a checkpoint's config allows resuming with the new one."""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from fovea.config.schema import RunConfig
from fovea.data.base import ImageSource
from fovea.data.sources import build_source, probe_source
from fovea.core.checkpoint import CheckpointError, UnsafeCheckpointError, load_checkpoint

LOCK_NAME = "run.lock"


def evaluates(cfg: RunConfig) -> bool:
    """True when the run will compute k-NN (start, periodic, end) or run ``eval.final`` protocols."""
    e = cfg.eval
    return bool(e.at_start or e.at_end or e.every_epochs > 0 or e.every_steps > 0 or e.final)


def open_run_sources(cfg: RunConfig) -> dict[str, ImageSource]:
    """Open and probe every data source the run will read, before any training.

    ``data.train`` always; ``data.eval_train`` / ``data.eval_test`` when they are set and the run
    evaluates (both are then required, labelled). A bad path, kind or unreadable source raises
    ``ValueError`` naming the config key, e.g. ``data.eval_test: ... does not exist``.
    """
    want = [("data.train", cfg.data.train)]
    pair = [("data.eval_train", cfg.data.eval_train), ("data.eval_test", cfg.data.eval_test)]
    if evaluates(cfg):
        given = [k for k, v in pair if v is not None]
        if cfg.eval.final and len(given) < 2:
            missing = [k for k, v in pair if v is None]
            raise ValueError(f"eval.final={cfg.eval.final} needs labelled splits: set {' and '.join(missing)}")
        if len(given) == 1:
            absent = next(k for k, v in pair if v is None)
            raise ValueError(f"{given[0]} is set but {absent} is not: k-NN needs both (set {absent}, or "
                             f"{given[0]}=null to train without evaluation)")
        want += [(k, v) for k, v in pair if v is not None]
    out: dict[str, ImageSource] = {}
    for key, sc in want:
        try:
            src = build_source(sc)
            probe_source(src)
        except (OSError, ValueError) as e:
            raise ValueError(f"{key}: {e}") from None
        if key != "data.train" and not (src.labels >= 0).any():
            raise ValueError(f"{key}: {src.name} has no labels (k-NN needs labelled images: class sub-folders, "
                             "a label column, or a labelled data set)")
        out[key] = src
    return out


def warn(msg: str) -> None:
    """One ``[fovea] warning: ...`` line on stderr."""
    print(f"[fovea] warning: {msg}", file=sys.stderr, flush=True)


class RunFolderBusy(RuntimeError):
    """Another live run holds the output folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``RUN/run.lock`` holding {pid, host, start} of the run that owns the folder.

    :meth:`acquire` creates it atomically (``O_EXCL``). A lock of a live process on this host, or of
    any process on another host (its liveness cannot be checked from here), refuses the new run with
    :class:`RunFolderBusy`; a lock whose process is dead is taken over with a warning.
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.held = False

    def read(self) -> dict[str, Any] | None:
        """The lock's contents (None when absent; {} when unreadable)."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "start": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self.read()
                if other is None:
                    continue  # released meanwhile: try again
                pid, host = int(other.get("pid", -1) or -1), str(other.get("host", ""))
                if other and pid > 0 and (host != me["host"] or _alive(pid)) and pid != me["pid"]:
                    where = "on this host" if host == me["host"] else f"on host {host!r}"
                    raise RunFolderBusy(
                        f"output folder {self.path.parent} is in use by another run (pid {pid} {where}, started "
                        f"{other.get('start', '?')}; lock file {self.path}). Wait for it to finish, stop it, or "
                        f"choose another output_dir=...; if that run is dead, delete the lock file.")
                warn(f"taking over the lock {self.path} left by a process that is no longer running "
                     f"({other or 'unreadable lock file'})")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise RunFolderBusy(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            other = self.read()
            if other is not None and other.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False


def step_checkpoints(ckpt_dir: Path) -> list[Path]:
    """``step_*.pt`` files and ``step_*.dcp`` folders of a run, newest (highest step) first."""
    return sorted([*ckpt_dir.glob("step_*.pt"), *ckpt_dir.glob("step_*.dcp")],
                  key=lambda p: (p.stem, p.suffix == ".dcp"), reverse=True)


def last_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The run's ``last`` checkpoints that exist: ``last.pt`` and ``last.dcp`` (or ``.last.dcp.old``, left by
    a crash between the two renames of a sharded save)."""
    dcp = ckpt_dir / "last.dcp"
    old = ckpt_dir / ".last.dcp.old"
    return [p for p in (ckpt_dir / "last.pt", dcp if dcp.exists() or not old.exists() else old) if p.exists()]


def _read(path: Path) -> dict:
    """A full checkpoint, or the run state (``meta.pt``) of a sharded one (``"format": "sharded"``)."""
    if path.is_dir():  # last.dcp, step_*.dcp, .last.dcp.old
        from fovea.train.ckptio import read_meta
        return read_meta(path)
    return load_checkpoint(path)


def load_resume_checkpoint(ckpt_dir: Path) -> tuple[dict | None, Path | None]:
    """The newest readable checkpoint: the newer of ``last.pt`` and ``last.dcp``, else the newest readable
    ``step_*`` one (with a warning naming both). Returns (None, None) when the run has no checkpoint yet. For a
    sharded checkpoint the dict is its run state only (the weights are read by every rank, resharded).

    A truncated or damaged file is skipped; one that would execute code on load is refused at once
    (:class:`UnsafeCheckpointError`); when files exist but none is readable, :class:`CheckpointError`.
    """
    lasts, steps = last_checkpoints(ckpt_dir), step_checkpoints(ckpt_dir)
    if not lasts and not steps:
        return None, None
    bad: list[str] = []
    found: list[tuple[dict, Path]] = []
    for group in (lasts, steps):
        for path in group:
            try:
                ckpt = _read(path)
            except UnsafeCheckpointError:
                raise
            except CheckpointError as e:
                bad.append(str(path))
                warn(str(e))
                continue
            if not isinstance(ckpt, dict) or "step" not in ckpt or ("model" not in ckpt and "format" not in ckpt):
                bad.append(str(path))
                warn(f"{path} is not a fovea training checkpoint")
                continue
            found.append((ckpt, path))
            if group is steps:
                break  # the newest readable step checkpoint
        if found:
            break
    if not found:
        raise CheckpointError(f"no readable checkpoint in {ckpt_dir} (tried {', '.join(bad)}); delete them or "
                              "start over with train.resume=false")
    ckpt, path = max(found, key=lambda f: int(f[0]["step"]))  # last.pt and last.dcp: the newer one
    if bad:
        warn(f"{bad[0]} is unreadable: resuming from {path} (step {int(ckpt['step'])}) instead")
    return ckpt, path


#: config keys (prefixes) that do not change the training trajectory: they may differ on resume
FREE_KEYS = ("name", "description", "output_dir", "eval.", "data.eval_train", "data.eval_test", "data.eval_size",
             "data.num_workers", "train.progress", "train.log_every_steps", "train.checkpoint_every_steps",
             "train.keep_checkpoints", "train.resume", "train.resume_force", "train.threads", "train.device",
             "train.strategy", "train.checkpoint_format", "train.activation_checkpointing", "train.max_minutes",
             "train.budget_")


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": leaf}."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out if d or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: d}


#: keys whose product with the world size is the global batch: they may change together with it
LAYOUT_KEYS = ("data.batch_size", "train.accumulate")


def global_batch(flat: dict[str, Any], world: int) -> int:
    return int(flat.get("data.batch_size", 0) or 0) * world * int(flat.get("train.accumulate", 1) or 1)


def trajectory_diff(old: dict, new: dict, old_world: int | None = None, new_world: int = 1) -> list[str]:
    """Lines ``key: old -> new`` for every key that changes the trajectory (all but :data:`FREE_KEYS`),
    plus the world size when both are known. The layout of the global batch (ranks x ``data.batch_size`` x
    ``train.accumulate``) may change when the global batch stays the same. An old config's ``0 = auto``
    values count as today's ``None``."""
    from fovea.config.loader import legacy_tree, to_dict
    a, b = flatten(legacy_tree(RunConfig, old)), flatten(legacy_tree(RunConfig, new))
    defaults = flatten(to_dict(RunConfig()))  # a key added since the old run was made ran as its default
    a, b = {**defaults, **a}, {**defaults, **b}
    same_batch = old_world is None or global_batch(a, old_world) == global_batch(b, new_world)
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if key.startswith(FREE_KEYS) or va == vb or (key in LAYOUT_KEYS and same_batch and old_world is not None):
            continue
        out.append(f"{key}: {va!r} -> {vb!r}")
    if old_world is not None and old_world != new_world and not same_batch:
        out.append(f"world size (ranks): {old_world} -> {new_world}")
    return out
