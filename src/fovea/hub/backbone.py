"""Export and load portable backbones: ``backbone.safetensors`` + ``backbone.yaml`` (its ViTConfig)."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from fovea.models.vit import ViTConfig, VisionTransformer
from fovea.core.checkpoint import public_mode


def export_backbone(backbone: VisionTransformer, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write ``backbone.safetensors`` and ``backbone.yaml`` into ``out_dir``; returns the weights path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    path = out / "backbone.safetensors"
    tmp = out / ".backbone.safetensors.tmp"
    save_file(state, str(tmp))
    os.chmod(tmp, public_mode())  # group/other-readable like every other output (umask permitting)
    tmp.replace(path)
    meta = {"model": dataclasses.asdict(backbone.cfg), **(extra or {})}
    (out / "backbone.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return path


def _vit_from_dict(d: dict) -> VisionTransformer:
    names = {f.name for f in dataclasses.fields(ViTConfig)}
    d = dict(d)
    if d.get("pos_embed") == "sincos" and "sincos_layout" not in d:
        d["sincos_layout"] = "row_col"  # written before the layout was recorded: rows were first then
    return VisionTransformer(ViTConfig(**{k: v for k, v in d.items() if k in names}))


def load_backbone(path: str | Path, which: str = "teacher") -> tuple[VisionTransformer, dict]:
    """Load a backbone from a run folder, an imported folder, a training checkpoint (.pt), an exported
    .safetensors, or a released DINOv2 / Franca / DINO / I-JEPA / DINOv3 file (read as ``fovea import`` does).

    Returns (backbone in eval mode, metadata dict with at least ``model`` and, when known,
    ``crops``/``data`` sections of the run config). ``which`` picks the teacher or student of a
    training checkpoint.
    """
    p = Path(path)
    if p.is_dir() and p.suffix != ".dcp":
        for cand in (p / "checkpoints" / "last.pt", p / "checkpoints" / "last.dcp", p / "backbone.safetensors"):
            if cand.exists():
                p = cand
                break
        else:
            raise FileNotFoundError(f"{path}: no checkpoints/last.pt, checkpoints/last.dcp or backbone.safetensors "
                                    "in this folder")
    if p.suffix == ".safetensors":
        meta_path = p.with_suffix(".yaml")
        if not meta_path.exists():
            raise FileNotFoundError(f"{p}: missing {meta_path.name} (the backbone config written next to it)")
        meta = yaml.safe_load(meta_path.read_text())
        model = _vit_from_dict(meta["model"])
        model.load_state_dict(load_file(str(p)))
        return model.eval(), meta
    from fovea.hub.released import IMAGENET_MEAN, IMAGENET_STD, read_released
    ckpt = read_checkpoint(p)
    if not (isinstance(ckpt, dict) and "config" in ckpt and "model" in ckpt):  # a released file: import it
        imp = read_released(p, which=which)
        model = VisionTransformer(imp.cfg)
        model.load_state_dict(imp.backbone)
        return model.eval(), {"model": dataclasses.asdict(imp.cfg), "imported": {"layout": imp.layout, "file": str(p)},
                              "crops": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "global_size": 224}}
    cfg = ckpt["config"]
    model = _vit_from_dict(cfg["model"])
    prefix = f"{which}.backbone."
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{p}: no '{which}' backbone weights in this checkpoint")
    model.load_state_dict(state)
    return model.eval(), cfg


def read_checkpoint(p: Path) -> Any:
    """A file as :func:`fovea.hub.released.read_file` reads it, or a sharded training checkpoint folder
    (``last.dcp``) read whole."""
    if p.is_dir():
        from fovea.train.ckptio import read_full
        return read_full(p)
    from fovea.hub.released import read_file
    return read_file(p)


def state_dict_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """True when both state dicts have the same keys and identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def load_head_states(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict | None]:
    """The DINO / iBOT heads that come with a backbone: ``({"dino_head": sd, "ibot_head": sd}, run config)``.

    Found in ``heads.safetensors`` beside an imported or exported backbone, in a fovea run's (or training
    checkpoint's) teacher heads (the run's config is returned with them: it says how to build the heads), or
    in a released file that has heads (a DINOv2 training teacher checkpoint, a DINO v1 full checkpoint).
    ``({}, None)`` when there are none.
    """
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    heads: dict[str, dict[str, torch.Tensor]] = {}
    if (p.is_dir() or p.suffix == ".safetensors") and (folder / "heads.safetensors").exists():
        flat = load_file(str(folder / "heads.safetensors"))
        for h in ("dino_head", "ibot_head"):
            sd = {k[len(h) + 1:]: v for k, v in flat.items() if k.startswith(h + ".")}
            if sd:
                heads[h] = sd
        return heads, None
    if p.is_dir() and p.suffix != ".dcp":
        p = next((c for c in (folder / "checkpoints" / "last.pt", folder / "checkpoints" / "last.dcp") if c.exists()),
                 folder / "checkpoints" / "last.pt")
    if p.suffix == ".safetensors" or not p.exists():
        return heads, None
    from fovea.hub.released import ReleasedFileError, read_released
    ckpt = read_checkpoint(p)
    if isinstance(ckpt, dict) and "config" in ckpt and "model" in ckpt:  # a fovea training checkpoint
        for h, name in (("dino_head", "teacher.head."), ("ibot_head", "teacher.patch_head.")):
            sd = {k[len(name):]: v for k, v in ckpt["model"].items() if k.startswith(name)}
            if sd:
                heads[h] = sd
        return heads, ckpt["config"]
    try:
        return dict(read_released(p).heads), None
    except ReleasedFileError:
        return heads, None
