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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fovea.models.flops import dims
from fovea.models.layers import SincosLayout, swiglu_hidden
from fovea.models.vit import ARCHS, ViTConfig, VisionTransformer
from fovea.core.checkpoint import load_checkpoint

HEAD_DIM = {"dinov2": 64, "franca": 64, "dino": 64, "dinov3": 64, "ijepa": 80}  # released head widths (I-JEPA ViT-H: 80)


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
    predictor: dict[str, Tensor] = field(default_factory=dict)  # I-JEPA predictor (fovea Predictor names)
    predictor_shape: dict[str, float] = field(default_factory=dict)
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
        return "ijepa"
    if "storage_tokens" in keys or any(k.startswith("rope_embed.") for k in keys):
        return "dinov3"
    if "cls_token" in keys and "pos_embed" in keys:
        return "dinov2" if "mask_token" in keys else "dino"  # DINO v1 files have no mask token
    raise ReleasedFileError(f"unrecognised layout (top-level keys: {sorted(keys)[:8]})")


def infer_config(sd: dict[str, Tensor], offset: float, antialias: bool, arch: str | None = None,
                 num_heads: int | None = None, norm_eps: float = 1e-6, head_dim: int = 64) -> ViTConfig:
    """The :class:`ViTConfig` of a DINOv2-layout backbone state dict (no prefix, blocks unchunked).

    Width, depth, patch size, stored grid, registers, LayerScale, FFN kind and width come from the
    tensors; the number of heads (no file stores it) from ``num_heads``, else ``arch``, else D / 64.
    """
    d = int(sd["patch_embed.proj.weight"].shape[0])
    p = int(sd["patch_embed.proj.weight"].shape[-1])
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    cls = "cls_token" in sd
    if "pos_embed" in sd:
        n_pos = int(sd["pos_embed"].shape[1]) - int(cls)
        grid = int(round(n_pos ** 0.5))
        if grid * grid != n_pos:
            raise ReleasedFileError(f"pos_embed has {n_pos} patch positions: not a square grid")
    else:  # RoPE: no table; the nominal size is the released training size
        grid = 224 // p
    heads_from_arch = None
    if arch is not None:
        if arch not in ARCHS:
            raise ReleasedFileError(f"--arch {arch!r}: choose one of {', '.join(ARCHS)}")
        if ARCHS[arch][0] != d:
            raise ReleasedFileError(f"--arch {arch} has width {ARCHS[arch][0]} but the file's width is {d}")
        heads_from_arch = ARCHS[arch][2]
    if num_heads and heads_from_arch and num_heads != heads_from_arch:
        raise ReleasedFileError(f"--num-heads {num_heads} contradicts --arch {arch} ({heads_from_arch} heads)")
    heads = num_heads or heads_from_arch or d // head_dim
    if heads <= 0 or d % heads or (not num_heads and not heads_from_arch and d % head_dim):
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
                     cls_token=cls,
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
              num_heads: int | None, head_dim: int = 64) -> tuple[ViTConfig, dict[str, Tensor]]:
    """Config + state dict in fovea's names; a missing mask token is filled with zeros (noted)."""
    sd, chunked = unchunk(sd)
    if chunked:
        notes.append("blocks.<chunk>.<i> (block_chunks) remapped to blocks.<i>")
    if "mask_token" not in sd:
        sd = {**sd, "mask_token": torch.zeros(1, int(sd["patch_embed.proj.weight"].shape[0]))}
        notes.append("mask_token: not in the file; set to zeros (used only by masked training)")
    if sd["mask_token"].ndim == 3:  # [1, 1, D] in some versions
        sd = {**sd, "mask_token": sd["mask_token"].reshape(1, -1)}
    cfg = infer_config(sd, offset, antialias, arch, num_heads, head_dim=head_dim)
    return cfg, sd


def read_released(path: str | Path, source: str = "auto", arch: str | None = None,
                  num_heads: int | None = None, which: str = "teacher", interpolate_offset: float | None = None,
                  interpolate_antialias: bool | None = None) -> Imported:
    """Read a released file (see the module docstring). ``interpolate_offset`` / ``interpolate_antialias``
    override the family's position-resize rule (no file stores it: e.g. a fovea model exported earlier)."""
    imp = _read_released(path, source, arch, num_heads, which)
    if interpolate_offset is not None:
        imp.cfg.interpolate_offset = float(interpolate_offset)
    if interpolate_antialias is not None:
        imp.cfg.interpolate_antialias = bool(interpolate_antialias)
    return imp


def _read_released(path: str | Path, source: str, arch: str | None, num_heads: int | None, which: str) -> Imported:
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
    elif found == "ijepa":
        return _read_ijepa(obj, which, arch, num_heads)
    elif found == "dinov3":
        return _read_dinov3(dict(obj), arch, num_heads)
    elif found == "dino" and "student" in obj:
        if which not in ("teacher", "student"):
            raise ReleasedFileError(f"--which {which!r}: teacher or student for DINO v1 checkpoints")
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
    return Imported(found, layout, cfg, bb, heads=heads, head_shapes=shapes, extra=extra, notes=notes)


def _sincos_layout(table: Tensor, grid: int, what: str, notes: list[str]) -> SincosLayout:
    """The layout (col_row / row_col) whose table equals a stored fixed sin-cos table [N, D]."""
    from fovea.models.layers import sincos_pos_embed_2d
    layouts: tuple[SincosLayout, ...] = ("col_row", "row_col")
    for layout in layouts:
        diff = float((sincos_pos_embed_2d(int(table.shape[-1]), grid, grid, layout) - table.float()).abs().max())
        if diff < 1e-5:
            if layout != "col_row":
                notes.append(f"{what}: rows first (row_col), not the released column-first layout")
            return layout
    raise ReleasedFileError(f"{what} is not a fixed 2-D sin-cos table in either channel layout")


def _read_ijepa(obj: dict, which: str, arch: str | None, num_heads: int | None) -> Imported:
    """I-JEPA checkpoint: ``encoder`` / ``predictor`` / ``target_encoder`` (``module.`` prefixes); the
    target encoder by default (``which="encoder"`` for the context encoder), the predictor too."""
    which = "target_encoder" if which == "teacher" else which
    if which not in ("target_encoder", "encoder"):
        raise ReleasedFileError(f"--which {which!r}: target_encoder (teacher) or encoder for I-JEPA checkpoints")
    notes = [f"imported the {which} and the predictor; not imported: "
             + ", ".join(str(k) for k in obj if k not in (which, "predictor"))]
    bb = {k.removeprefix("module."): v for k, v in obj[which].items()}
    cfg, bb = _backbone(bb, notes, 0.0, False, arch, num_heads, HEAD_DIM["ijepa"])
    grid = cfg.img_size // cfg.patch_size
    cfg.pos_embed = "sincos"
    cfg.sincos_layout = _sincos_layout(bb["pos_embed"][0], grid, "pos_embed", notes)
    pr = {k.removeprefix("module."): v for k, v in obj["predictor"].items()}
    table = pr.pop("predictor_pos_embed", None)
    if table is None:
        raise ReleasedFileError("the predictor has no predictor_pos_embed")
    if _sincos_layout(table[0], grid, "predictor_pos_embed", notes) != cfg.sincos_layout:
        raise ReleasedFileError("the encoder's and the predictor's sin-cos layouts differ")
    notes.append("predictor_pos_embed: the fixed sin-cos table, recomputed by fovea (equal to the stored one)")
    if "mask_token" in pr and pr["mask_token"].ndim == 2:
        pr["mask_token"] = pr["mask_token"][None]
    pdim = int(pr["predictor_embed.weight"].shape[0])
    depth = 1 + max(int(k.split(".")[1]) for k in pr if k.startswith("predictor_blocks."))
    d, _, heads, _ = dims(cfg)
    shape = {"embed_dim": d, "pred_dim": pdim, "depth": depth, "num_heads": heads,
             "grid": grid, "mlp_ratio": int(pr["predictor_blocks.0.mlp.fc1.weight"].shape[0]) / pdim}
    return Imported("ijepa", "I-JEPA checkpoint", cfg, bb, notes=notes, predictor=pr, predictor_shape=shape)


def _read_dinov3(sd: dict[str, Tensor], arch: str | None, num_heads: int | None) -> Imported:
    """DINOv3 hub backbone: RoPE (``rope_embed.periods``), 4 storage tokens, LayerNorm eps 1e-5, the key
    bias masked out of ``attn.qkv.bias`` (``bias_mask``, folded into the bias here)."""
    notes = []
    if "storage_tokens" in sd:
        sd["register_tokens"] = sd.pop("storage_tokens")
        notes.append("storage_tokens imported as register_tokens")
    masks = sorted(k for k in sd if k.endswith(".attn.qkv.bias_mask"))
    for k in masks:
        bias = k.removesuffix("_mask")
        mask = sd.pop(k)
        if not torch.isfinite(mask).all():
            raise ReleasedFileError(f"{k} is not finite (a model saved before init_weights?)")
        sd[bias] = sd[bias] * mask
    if masks:
        notes.append(f"attn.qkv.bias_mask of {len(masks)} blocks folded into attn.qkv.bias (key bias = 0)")
    if "rope_embed.periods" not in sd:
        raise ReleasedFileError("a DINOv3 backbone without rope_embed.periods")
    cfg, sd = _backbone(sd, notes, 0.0, False, arch, num_heads, HEAD_DIM["dinov3"])
    cfg.pos_embed, cfg.norm_eps = "rope", 1e-5  # DINOv3's layernormbf16 is LayerNorm(eps=1e-5)
    d, _, heads, _ = dims(cfg)
    hd = d // heads
    if int(sd["rope_embed.periods"].shape[0]) != hd // 4:
        raise ReleasedFileError(f"rope_embed.periods has {sd['rope_embed.periods'].shape[0]} entries, but {heads} "
                                f"heads of width {hd} need {hd // 4}: give --num-heads")
    return Imported("dinov3", "DINOv3 hub backbone", cfg, sd, notes=notes)


def build_predictor(shape: dict, layout: str = "col_row") -> "torch.nn.Module":
    """The fovea I-JEPA :class:`Predictor` of an imported ``predictor_shape``."""
    from fovea.models.predictor import Predictor
    return Predictor(shape["embed_dim"], shape["grid"], shape["grid"], shape["pred_dim"], shape["depth"],
                     shape["num_heads"], shape["mlp_ratio"], sincos_layout=layout)




IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


EXPORT_FORMATS = ("dinov2", "timm")


def export_state_dict(model: VisionTransformer, fmt: str = "dinov2") -> dict[str, Tensor]:
    """A fovea backbone as a plain state dict in a released layout.

    ``dinov2``: the DINOv2 hub layout (``blocks.<i>``, ``register_tokens``, ``mask_token``, SwiGLU
    ``mlp.w12``/``mlp.w3``), loadable by the official DINOv2 ``VisionTransformer`` without renaming.
    ``timm``: timm's own ViT names as its DINOv2 converter produces them (``reg_token``, no mask token,
    SwiGLU as ``mlp.fc1_g`` / ``mlp.fc1_x`` / ``mlp.fc2``). Learned positions only; a RASA patch
    projection or RoPE has no place in these layouts and is refused.
    """
    if fmt not in EXPORT_FORMATS:
        raise ReleasedFileError(f"--format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    cfg = model.cfg
    if cfg.pos_embed != "learned" or not cfg.cls_token:
        raise ReleasedFileError(f"the {fmt} layout holds ViTs with a CLS token and learned positions "
                                f"(this one: pos_embed={cfg.pos_embed}, cls_token={cfg.cls_token})")
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    if "patch_proj" in sd:
        raise ReleasedFileError("this backbone carries a folded patch projection (RASA): the released layouts "
                                "have no place for it")
    if fmt == "timm":
        sd.pop("mask_token", None)
        if "register_tokens" in sd:
            sd["reg_token"] = sd.pop("register_tokens")
        for k in [k for k in sd if ".mlp.w12." in k]:
            a, b = sd.pop(k).chunk(2, dim=0)
            sd[k.replace(".w12.", ".fc1_g.")], sd[k.replace(".w12.", ".fc1_x.")] = a.clone(), b.clone()
        for k in [k for k in sd if ".mlp.w3." in k]:
            sd[k.replace(".w3.", ".fc2.")] = sd.pop(k)
    return sd
