"""The ``fovea import``, ``fovea export`` and ``fovea embed`` commands (released weights in and out)."""
from __future__ import annotations

import argparse
import json

from fovea.data.specs import source_from_spec


def cmd_import(args: argparse.Namespace) -> int:
    from fovea.hub.imported import write_imported
    from fovea.hub.released import read_released
    imp = read_released(args.file, args.source, args.arch, args.num_heads, args.which, args.interpolate_offset,
                        None if args.interpolate_antialias is None else args.interpolate_antialias == "true")
    out = write_imported(imp, args.file, args.out, args.size)
    c = imp.cfg
    print(f"[fovea] {imp.layout} ({imp.source}): ViT D={c.embed_dim}, depth {c.depth}, {c.num_heads} heads, "
          f"patch {c.patch_size}, "
          + ("RoPE positions, " if c.pos_embed == "rope" else
             f"{c.pos_embed} positions stored at {c.img_size} px ({c.img_size // c.patch_size}^2), ")
          + f"LayerNorm eps {c.norm_eps:g}, "
          f"{c.num_register_tokens} registers, FFN {c.ffn}, LayerScale {'yes' if c.layerscale_init else 'no'}, "
          f"resize offset {c.interpolate_offset} antialias {c.interpolate_antialias}")
    for n in imp.notes:
        print(f"[fovea]   {n}")
    for h, s in imp.head_shapes.items():
        print(f"[fovea]   {h}: {s['in_dim']} -> {s['hidden_dim']} -> {s['bottleneck_dim']} -> {s['out_dim']} prototypes")
    extra = [f for f in ("heads.safetensors", "predictor.safetensors") if (out / f).exists()]
    print(f"[fovea] wrote {out / 'backbone.safetensors'}, {out / 'backbone.yaml'}"
          + "".join(f", {out / f}" for f in extra))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fovea.hub.backbone import load_backbone
    from fovea.hub.released import export_state_dict
    from fovea.core.checkpoint import save_atomic

    backbone, _ = load_backbone(args.run, which=args.which)
    sd = export_state_dict(backbone, args.format)
    save_atomic(sd, args.out)
    c = backbone.cfg
    print(f"[fovea] wrote {args.out}: {len(sd)} tensors in the {args.format} layout "
          f"({sum(v.numel() for v in sd.values()) / 1e6:.2f} M values)")
    if args.format == "dinov2":
        family = (0.0, True) if c.num_register_tokens else (0.1, False)
        flags = "" if (c.interpolate_offset, c.interpolate_antialias) == family else (
            f" --interpolate-offset {c.interpolate_offset:g} --interpolate-antialias {str(c.interpolate_antialias).lower()}")
        print(f"[fovea] re-import exactly: fovea import {args.out} --num-heads {backbone.num_heads}"
              f"{flags} --out DIR")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    import torch

    from fovea.eval.embed import embed
    from fovea.hub.backbone import load_backbone
    from fovea.core.distributed import check_device

    backbone, meta = load_backbone(args.model, which=args.which)
    crops = meta.get("crops", {}) or {}
    src = source_from_spec(args.data, limit=args.limit)
    check_device(args.device)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    size = args.size or crops.get("global_size") or backbone.cfg.img_size
    kinds = [k.strip() for k in args.features.split(",") if k.strip()]
    res = embed(backbone, src, args.out, kinds, size, device, args.batch_size, args.workers, crops.get("mean"),
                crops.get("std"), progress=not args.json)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"[fovea] {res['rows']} rows ({', '.join(f'{k} {d}' for k, d in res['dims'].items())}) from "
              f"{src.name} at {size} px -> {res['path']} ({res['bytes'] / 2**20:.1f} MiB) in {res['seconds']} s "
              f"({res['images_per_s']} images/s)" + (f"; {res['skipped']} unreadable images skipped"
                                                     if res["skipped"] else ""))
    return 0


def add_hub_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``import``, ``export`` and ``embed`` on the ``fovea`` sub-command parser."""
    from fovea.eval.commands import add_backbone_options

    im = sub.add_parser("import", help="import a released DINOv2 / Franca / DINO / I-JEPA / DINOv3 checkpoint",
                        description="Read a released checkpoint (DINOv2 hub backbones with or without registers "
                        "and SwiGLU ViT-g, DINOv2 training teacher checkpoints with their DINO/iBOT heads, Franca "
                        "releases, DINO v1 backbones and full checkpoints, I-JEPA checkpoints (target encoder + predictor), "
                        "DINOv3 hub backbones (RoPE, storage tokens)) and write an ordinary fovea backbone "
                        "folder (backbone.safetensors + backbone.yaml, heads.safetensors when the file has heads) "
                        "that every fovea command reads like a run folder. Loading executes no code.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    im.add_argument("file", metavar="FILE", help="the released .pth / .pth.tar file")
    im.add_argument("--from", dest="source", default="auto", choices=["auto", "dinov2", "franca", "dino", "ijepa", "dinov3"],
                    help="the file's family (auto: detected from its keys)")
    im.add_argument("--arch", default=None, help="fovea arch name (vit_small, vit_large, ...): gives the head count")
    im.add_argument("--num-heads", type=int, default=None, help="attention heads (default: arch, else width / 64)")
    im.add_argument("--which", default="teacher", choices=["teacher", "student", "target_encoder", "encoder"],
                    help="DINO v1 full checkpoints: teacher or student; I-JEPA: target_encoder (= teacher) or encoder")
    im.add_argument("--size", type=int, default=224, help="default evaluation input size written to backbone.yaml")
    im.add_argument("--interpolate-offset", type=float, default=None,
                    help="override the position-resize offset (default: the family's rule, METHODS.md section 3)")
    im.add_argument("--interpolate-antialias", choices=["true", "false"], default=None,
                    help="override antialiasing of the position resize")
    im.add_argument("--out", required=True, help="output folder")
    im.set_defaults(func=cmd_import)

    ex = sub.add_parser("export", help="write a backbone as a plain DINOv2 / timm state dict",
                        description="Write the teacher backbone of a run (or any backbone fovea loads) as a plain state "
                        "dict: --format dinov2 is the DINOv2 hub layout that the official DINOv2 VisionTransformer "
                        "loads without renaming; --format timm uses timm's ViT names (reg_token, SwiGLU fc1_g/fc1_x/fc2). "
                        "`fovea import` of a dinov2 export reproduces the backbone exactly (it prints the command).",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ex.add_argument("run", metavar="RUN_DIR_OR_BACKBONE", help="a run folder, imported folder, checkpoint or backbone.safetensors")
    ex.add_argument("--format", default="dinov2", choices=["dinov2", "timm"], help="target layout")
    ex.add_argument("--which", default="teacher", choices=["teacher", "student"], help="backbone of a training checkpoint")
    ex.add_argument("--out", required=True, help="output .pth file")
    ex.set_defaults(func=cmd_export)

    em = sub.add_parser("embed", help="write frozen features of every image to parquet or .npy",
                        description="Embed every image of a data set with a frozen backbone (a run folder, an "
                        "imported folder, a checkpoint, a backbone.safetensors or a released file), batched, with the "
                        "model's own normalisation. Parquet: one row per image (index, path, label, one list column "
                        "per feature kind), written batch by batch; .npy: the kinds concatenated [N, sum of widths], "
                        "with OUT.index.npy and OUT.labels.npy beside it.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    em.add_argument("model", metavar="MODEL", help="run folder, imported folder, checkpoint, backbone.safetensors or released file")
    em.add_argument("--data", required=True, metavar="SPEC", help="fmnist:train|test[:DIR], parquet:FILE or folder:DIR")
    em.add_argument("--out", required=True, help="output file (.parquet or .npy)")
    em.add_argument("--features", default="cls,mean_patch", help="comma list of cls, mean_patch, both, registers, "
                    "cls_last4, cls_last4_mean; KIND@W keeps the first W channels (Matryoshka)")
    em.add_argument("--size", type=int, default=0, help="input size in px (0 = the model's eval size)")
    em.add_argument("--limit", type=int, default=0, help="a fixed random subset of the data (0 = all)")
    em.add_argument("--json", action="store_true", help="print one JSON summary instead of the progress bar")
    add_backbone_options(em)
    em.set_defaults(func=cmd_embed)
