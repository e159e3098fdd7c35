"""Readers of the released checkpoint layouts (METHODS.md section 5c; ``shared/data/weights/README.md``).

One reader per layout turns a released file into a fovea backbone state dict, its :class:`ViTConfig`
and, when the file has them, DINO-style heads. Supported here: DINOv2 hub backbones (plain, with
registers, SwiGLU ViT-g), DINOv2 training teacher checkpoints (chunked blocks, DINO and iBOT heads),
Franca releases (DINOv2 layout, chunked) and DINO v1 backbones and full checkpoints. The source is
detected from the keys; every key the file has is either imported or reported by name.

Files are read with ``weights_only=True``; the only extra type allowed is ``argparse.Namespace`` (the
``args`` entry of DINO v1 full checkpoints). Anything else is refused without executing it.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fovea.models.vit import ARCHS, ViTConfig, swiglu_hidden
from fovea.train.checkpoint import load_checkpoint

SOURCES = ("dinov2", "franca", "dino")
HEAD_DIM = 64  # every released DINO / DINOv2 / DINOv3 / Franca size


class ReleasedFileError(ValueError):
    """A released file that cannot be imported as asked (named keys, contradictions)."""


@dataclass
class Imported:
    """The result of reading a released file."""

    source: str  # dinov2 | franca | dino
    layout: str  # e.g. "DINOv2 hub backbone", "DINOv2 training teacher checkpoint"
    cfg: ViTConfig
    backbone: dict[str, Tensor]
    heads: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # name -> DINOHead state dict
    head_shapes: dict[str, dict[str, int]] = field(default_factory=dict)
    extra: dict[str, Tensor] = field(default_factory=dict)  # e.g. the DINO v1 centre
    notes: list[str] = field(default_factory=list)  # what was not imported, or filled in, by name


def read_file(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` with ``argparse.Namespace`` allowed (DINO v1 full checkpoints)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return load_checkpoint(path)


_CHUNK = re.compile(r"^blocks\.(\d+)\.(\d+)\.")


def strip(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries under ``prefix`` with it removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def unchunk(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], bool]:
    """``blocks.<chunk>.<i>.*`` (DINOv2 / Franca ``block_chunks``; i is the global block index) ->
    ``blocks.<i>.*``. Returns the new dict and whether the file was chunked."""
    if not any(_CHUNK.match(k) for k in sd):
        return sd, False
    out = {}
    for k, v in sd.items():
        m = _CHUNK.match(k)
        out[f"blocks.{m.group(2)}.{k[m.end():]}" if m else k] = v
    return out, True


def detect(obj: Any) -> str:
    """``dinov2`` | ``franca`` | ``dino`` from the top-level keys of a loaded file."""
    if not isinstance(obj, dict):
        raise ReleasedFileError(f"not a state dict or checkpoint dict (a {type(obj).__name__})")
    keys = set(obj)
    if {"student", "teacher", "args"} <= keys:
        return "dino"  # DINO v1 full checkpoint
    if "teacher" in keys and isinstance(obj["teacher"], dict):
        sd = obj["teacher"]
        heads = any(k.startswith(("dino_head.", "ibot_head.")) for k in sd)
        return "dinov2" if heads else "franca"  # the Franca release is "backbone only"
    if {"encoder", "predictor", "target_encoder"} <= keys:
        raise ReleasedFileError("an I-JEPA checkpoint: its reader is not implemented yet (see issue 14)")
    if "storage_tokens" in keys or any(k.startswith("rope_embed.") for k in keys):
        raise ReleasedFileError("a DINOv3 backbone: its reader (RoPE, storage tokens) is not implemented yet")
    if "cls_token" in keys and "pos_embed" in keys:
        return "dinov2" if "mask_token" in keys else "dino"  # DINO v1 files have no mask token
    raise ReleasedFileError(f"unrecognised layout (top-level keys: {sorted(keys)[:8]})")


def infer_config(sd: dict[str, Tensor], offset: float, antialias: bool, arch: str | None = None,
                 num_heads: int | None = None, norm_eps: float = 1e-6) -> ViTConfig:
    """The :class:`ViTConfig` of a DINOv2-layout backbone state dict (no prefix, blocks unchunked).

    Width, depth, patch size, stored grid, registers, LayerScale, FFN kind and width come from the
    tensors; the number of heads (no file stores it) from ``num_heads``, else ``arch``, else D / 64.
    """
    d = int(sd["patch_embed.proj.weight"].shape[0])
    p = int(sd["patch_embed.proj.weight"].shape[-1])
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    n_pos = int(sd["pos_embed"].shape[1]) - 1
    grid = int(round(n_pos ** 0.5))
    if grid * grid != n_pos:
        raise ReleasedFileError(f"pos_embed has {n_pos} patch positions: not a square grid")
    heads_from_arch = None
    if arch is not None:
        if arch not in ARCHS:
            raise ReleasedFileError(f"--arch {arch!r}: choose one of {', '.join(ARCHS)}")
        if ARCHS[arch][0] != d:
            raise ReleasedFileError(f"--arch {arch} has width {ARCHS[arch][0]} but the file's width is {d}")
        heads_from_arch = ARCHS[arch][2]
    if num_heads and heads_from_arch and num_heads != heads_from_arch:
        raise ReleasedFileError(f"--num-heads {num_heads} contradicts --arch {arch} ({heads_from_arch} heads)")
    heads = num_heads or heads_from_arch or d // HEAD_DIM
    if heads <= 0 or d % heads:
        raise ReleasedFileError(f"width {d} is not divisible into {heads} heads; give --num-heads")
    swiglu = "blocks.0.mlp.w12.weight" in sd
    if swiglu:
        hidden = int(sd["blocks.0.mlp.w3.weight"].shape[1])
        ratio = 4.0
        if swiglu_hidden(d, ratio) != hidden:
            raise ReleasedFileError(f"SwiGLU hidden width {hidden} is not DINOv2's rule for width {d} "
                               f"({swiglu_hidden(d, ratio)})")
    else:
        ratio = int(sd["blocks.0.mlp.fc1.weight"].shape[0]) / d
    regs = int(sd["register_tokens"].shape[1]) if "register_tokens" in sd else 0
    name = arch or next((a for a, v in ARCHS.items() if v[0] == d), "vit_small")
    return ViTConfig(arch=name, patch_size=p, img_size=grid * p, num_register_tokens=regs, drop_path_rate=0.0,
                     ffn="swiglu" if swiglu else "mlp", layerscale_init=1e-5 if "blocks.0.ls1.gamma" in sd else 0.0,
                     qkv_bias="blocks.0.attn.qkv.bias" in sd, norm_eps=norm_eps, embed_dim=d, depth=depth,
                     num_heads=heads, mlp_ratio=ratio, interpolate_offset=offset, interpolate_antialias=antialias)


def head_shape(sd: dict[str, Tensor]) -> dict[str, int]:
    """in/hidden/bottleneck/prototypes/layers of a DINO head state dict (``mlp.<i>``, ``last_layer``)."""
    lins = sorted(int(k.split(".")[1]) for k in sd if k.startswith("mlp.") and k.endswith(".weight"))
    if not lins or "last_layer.weight_v" not in sd:
        raise ReleasedFileError(f"unrecognised head keys {sorted(sd)[:6]}")
    first, last = sd[f"mlp.{lins[0]}.weight"], sd[f"mlp.{lins[-1]}.weight"]
    if any(sd[f"mlp.{i}.weight"].ndim != 2 for i in lins) or any(i % 2 for i in lins):
        raise ReleasedFileError("heads with BatchNorm layers are not supported by the importer yet")
    return {"in_dim": int(first.shape[1]), "hidden_dim": int(first.shape[0]) if len(lins) > 1 else 0,
            "bottleneck_dim": int(last.shape[0]), "out_dim": int(sd["last_layer.weight_v"].shape[0]),
            "nlayers": len(lins)}


def _backbone(sd: dict[str, Tensor], notes: list[str], offset: float, antialias: bool, arch: str | None,
              num_heads: int | None) -> tuple[ViTConfig, dict[str, Tensor]]:
    """Config + state dict in fovea's names; a missing mask token is filled with zeros (noted)."""
    sd, chunked = unchunk(sd)
    if chunked:
        notes.append("blocks.<chunk>.<i> (block_chunks) remapped to blocks.<i>")
    if "mask_token" not in sd:
        sd = {**sd, "mask_token": torch.zeros(1, int(sd["cls_token"].shape[-1]))}
        notes.append("mask_token: not in the file (DINO v1); set to zeros (used only by masked training)")
    if sd["mask_token"].ndim == 3:  # [1, 1, D] in some versions
        sd = {**sd, "mask_token": sd["mask_token"].reshape(1, -1)}
    cfg = infer_config(sd, offset, antialias, arch, num_heads)
    return cfg, sd


def read_released(path: str | Path, source: str = "auto", arch: str | None = None,
                  num_heads: int | None = None, which: str = "teacher") -> Imported:
    """Read a released DINOv2 / Franca / DINO v1 file (see the module docstring)."""
    obj = read_file(path)
    found = detect(obj)
    if source != "auto" and source != found:
        # the Franca and DINOv2 layouts are the same family: accept the user's label between those two
        if {source, found} != {"dinov2", "franca"}:
            raise ReleasedFileError(f"--from {source}: {path} looks like a {found} file")
        found = source
    notes: list[str] = []
    heads: dict[str, dict[str, Tensor]] = {}
    extra: dict[str, Tensor] = {}
    if found in ("dinov2", "franca") and "teacher" in obj:
        sd = {k.replace("module.", ""): v for k, v in obj["teacher"].items()}
        other = [k for k in obj if k != "teacher"]
        if other:
            notes.append(f"top-level entries not imported: {', '.join(map(str, other))}")
        bb = strip(sd, "backbone.") if any(k.startswith("backbone.") for k in sd) else {
            k: v for k, v in sd.items() if not k.startswith(("dino_head.", "ibot_head."))}
        for h in ("dino_head", "ibot_head"):
            hs = strip(sd, f"{h}.")
            if hs:
                heads[h] = hs
        known = {f"backbone.{k}" for k in bb} | set(bb) | {f"{h}.{k}" for h, hs in heads.items() for k in hs}
        unknown = sorted(set(sd) - known)
        if unknown:
            raise ReleasedFileError(f"unexpected keys in the teacher: {unknown[:10]}")
        layout = "DINOv2 training teacher checkpoint" if heads else "Franca release (teacher backbone)"
    elif found == "dino" and "student" in obj:
        if which not in ("teacher", "student"):
            raise ReleasedFileError(f"--which {which!r}: teacher or student")
        sd = obj[which]
        prefix = "module." if any(k.startswith("module.") for k in sd) else ""
        bb, hs = strip(sd, f"{prefix}backbone."), strip(sd, f"{prefix}head.")
        unknown = sorted(k for k in sd if not k.startswith((f"{prefix}backbone.", f"{prefix}head.")))
        if unknown:
            raise ReleasedFileError(f"unexpected keys in {which}: {unknown[:10]}")
        if hs:
            heads["dino_head"] = hs
        center = obj.get("dino_loss", {}).get("center") if isinstance(obj.get("dino_loss"), dict) else None
        if isinstance(center, Tensor):
            extra["dino_center"] = center
        notes.append(f"imported the {which}; not imported: "
                     + ", ".join(str(k) for k in obj if k not in (which, "dino_loss")))
        layout = "DINO v1 full checkpoint"
    else:
        bb = dict(obj)
        layout = {"dinov2": "DINOv2 hub backbone", "franca": "Franca backbone", "dino": "DINO v1 backbone"}[found]
    regs = "register_tokens" in bb
    offset, antialias = (0.0, True) if regs else (0.1, False)  # METHODS.md section 3
    cfg, bb = _backbone(bb, notes, offset, antialias, arch, num_heads)
    shapes = {h: head_shape(s) for h, s in heads.items()}
    return Imported(found, layout, cfg, bb, heads, shapes, extra, notes)


def config_dict(cfg: ViTConfig) -> dict:
    return dataclasses.asdict(cfg)


IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def write_imported(imp: Imported, src: str | Path, out_dir: str | Path, eval_size: int = 224) -> Path:
    """Write an ordinary fovea backbone folder: ``backbone.safetensors`` + ``backbone.yaml`` (its config,
    ImageNet normalisation, the import report) and ``heads.safetensors`` when the file has heads
    (``dino_head.*``, ``ibot_head.*``, ``dino_center``). Returns the folder."""
    from safetensors.torch import save_file

    from fovea.hub.backbone import export_backbone
    from fovea.models.vit import VisionTransformer
    from fovea.train.checkpoint import public_mode

    out = Path(out_dir)
    model = VisionTransformer(imp.cfg)
    missing, unexpected = model.load_state_dict(imp.backbone, strict=False)
    if missing or unexpected:
        raise ReleasedFileError(f"backbone keys do not match fovea's ViT: missing {missing[:8]}, unexpected {unexpected[:8]}")
    report = {"source": imp.source, "layout": imp.layout, "file": str(Path(src).resolve()), "notes": imp.notes,
              "heads": imp.head_shapes}
    export_backbone(model.eval(), out, extra={
        "crops": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "global_size": eval_size},
        "eval_features": "cls" if imp.cfg.cls_token else "mean_patch", "imported": report})
    if imp.heads or imp.extra:
        tensors = {f"{h}.{k}": v.contiguous() for h, sd in imp.heads.items() for k, v in sd.items()}
        tensors.update({k: v.contiguous() for k, v in imp.extra.items()})
        tmp = out / ".heads.safetensors.tmp"
        save_file(tensors, str(tmp))
        import os
        os.chmod(tmp, public_mode())
        tmp.replace(out / "heads.safetensors")
    return out
