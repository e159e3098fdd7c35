"""The ``fovea`` command: train, evaluate, list presets, fetch data."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fovea.config.loader import ConfigError, describe, load_config, load_tree, preset_names

EPILOG_TRAIN = """\
Overrides are `key.sub=value` pairs applied on top of the preset (values are YAML: numbers,
true/false, [lists]). Unknown keys or bad values stop the run before any work, naming the key.
The run folder (output_dir, default runs/<preset>) receives config.yaml (the fully resolved
config: `fovea train RUN/config.yaml` reproduces the run), metrics.jsonl, tensorboard/,
checkpoints/last.pt, backbone.safetensors and results.json. Re-running the same command resumes
from checkpoints/last.pt (train.resume=false starts over).

Examples:
  fovea train dino_vittiny_fmnist
  fovea train dino_vittiny_cifar10 output_dir=runs/c10 optim.epochs=5 data.batch_size=128
  fovea train my_run.yaml train.device=cuda
  torchrun --nproc_per_node=2 -m fovea train dino_vittiny_fmnist   (DDP; gloo on CPU, NCCL on GPU)

Every config key (type, default):
"""


def _keys_table() -> str:
    rows = describe()
    w = max(len(k) for k, *_ in rows)
    return "\n".join(f"  {k:<{w}}  {t:<5} {d:<14} {h}" for k, t, d, h in rows)


def _parse_source(spec: str) -> dict:
    """'fmnist:train[:DIR]' | 'parquet:FILE' | 'folder:DIR' -> SourceConfig fields."""
    kind, _, rest = spec.partition(":")
    if kind == "fmnist":
        split, _, path = rest.partition(":")
        return {"kind": "fmnist", "split": split or "train", "path": path}
    if kind in ("parquet", "folder") and rest:
        return {"kind": kind, "path": rest}
    raise ConfigError(f"bad data spec {spec!r}: use fmnist:train|test[:DIR], parquet:FILE or folder:DIR")


def cmd_train(args: argparse.Namespace) -> int:
    from fovea.train.loop import train
    cfg = load_config(args.config, args.overrides)
    if not cfg.output_dir:
        cfg.output_dir = str(Path("runs") / (cfg.name or cfg.method))
    train(cfg)
    return 0


def cmd_eval_knn(args: argparse.Namespace) -> int:
    import torch

    from fovea.config.loader import build_section
    from fovea.data.sources import SourceConfig, build_source
    from fovea.eval.knn import evaluate_knn, parse_widths
    from fovea.hub.backbone import load_backbone

    backbone, meta = load_backbone(args.checkpoint, which=args.which)
    data = meta.get("data", {}) or {}
    crops = meta.get("crops", {}) or {}

    def source(spec: str | None, key: str, limit: int) -> object:
        fields = _parse_source(spec) if spec else data.get(key)
        if not fields:
            raise ConfigError(f"no --{key.split('_')[1]} given and the checkpoint's config has no data.{key}")
        cfg = build_section(SourceConfig, {k: v for k, v in fields.items() if k in SourceConfig.__dataclass_fields__})
        if limit:
            cfg.limit = limit
        return build_source(cfg)

    train_src = source(args.train, "eval_train", args.limit_train)
    test_src = source(args.test, "eval_test", args.limit_test)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone.to(device)
    size = args.size or data.get("eval_size") or crops.get("global_size") or backbone.cfg.img_size
    kinds = [k.strip() for k in args.features.split(",")]
    widths = parse_widths(args.widths, backbone.embed_dim) if args.widths else []
    res = evaluate_knn(backbone, train_src, test_src, args.k, args.temperature, kinds, size, device,
                       args.batch_size, args.workers, crops.get("mean"), crops.get("std"),
                       progress=not args.json, widths=widths)
    res.update({"checkpoint": str(args.checkpoint), "size": size, "temperature": args.temperature})
    if args.json:
        print(json.dumps(res))
    else:
        print(f"k-NN on {res['n_train']} train / {res['n_test']} test images at {size}px (T={args.temperature})")
        for kind, accs in res["features"].items():
            print(f"  {kind:<14} " + "  ".join(f"{k}: {v:.2f}%" for k, v in accs.items()))
        if res["skipped"]:
            print(f"  skipped {res['skipped']} unreadable images")
    return 0


def cmd_rasa(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from fovea.config.loader import build_section
    from fovea.data.sources import SourceConfig, SubsetSource, build_source
    from fovea.hub.backbone import export_backbone, load_backbone
    from fovea.posttrain.rasa import RasaConfig
    from fovea.posttrain.rasa_run import run_rasa, write_report

    backbone, meta = load_backbone(args.backbone, which=args.which)
    data = meta.get("data", {}) or {}
    crops = meta.get("crops", {}) or {}

    def source(spec: str | None, key: str, limit: int, what: str) -> object:
        fields = _parse_source(spec) if spec else (data.get(key) if key else None)
        if not fields:
            raise ConfigError(f"no {what} given and the backbone's config has no data.{key}")
        cfg = build_section(SourceConfig, {k: v for k, v in fields.items() if k in SourceConfig.__dataclass_fields__})
        cfg.limit, cfg.seed = limit, args.seed
        return build_source(cfg)

    if args.heldout:
        fit_src = source(args.data, "train", args.limit, "--data")
        val_src = source(args.heldout, "", args.limit_heldout, "--heldout")
    else:  # disjoint random images of --data
        both = source(args.data, "train", args.limit + args.limit_heldout if args.limit else 0, "--data")
        perm = np.random.default_rng(args.seed).permutation(len(both))
        n_val = args.limit_heldout if args.limit else len(both) // 3
        if not 0 < n_val < len(both):
            raise ConfigError(f"cannot hold out {n_val} of the {len(both)} images of {both.name}")
        fit_src = SubsetSource(both, np.sort(perm[n_val:]), "RASA fit part")
        val_src = SubsetSource(both, np.sort(perm[:n_val]), "RASA held-out part")
    knn = None
    if not args.no_knn:
        tr = args.knn_train or (None if data.get("eval_train") else "")
        te = args.knn_test or (None if data.get("eval_test") else "")
        if tr == "" or te == "":
            print("[rasa] no k-NN data (--knn-train/--knn-test, or data.eval_train/eval_test): k-NN skipped")
        else:
            knn = (source(tr, "eval_train", args.knn_limit_train, "--knn-train"),
                   source(te, "eval_test", args.knn_limit_test, "--knn-test"))
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    size = args.size or data.get("eval_size") or crops.get("global_size") or backbone.cfg.img_size
    cfg = RasaConfig(rounds=args.rounds, steps=args.steps, ridge=args.ridge, min_head_r2=args.min_head_r2,
                     direction=args.direction, progress=not args.no_progress)
    folded, rep = run_rasa(backbone, fit_src, val_src, cfg, size, device, crops.get("mean"), crops.get("std"),
                           args.batch_size, args.workers, args.patches_per_image, args.seed, knn, args.k,
                           args.temperature)
    src = Path(args.backbone)
    out = Path(args.out) if args.out else (src if src.is_dir() else src.parent) / "rasa"
    rep["source_backbone"] = str(src)
    extra = {k: v for k, v in meta.items() if k in ("crops", "data", "source_run")}
    extra["crops"] = {k: crops[k] for k in ("mean", "std", "global_size") if k in crops}
    extra["rasa"] = {"source_backbone": str(src), "rounds": len(rep["rounds"]),
                     "position_r2_before": rep["position_r2_before"]["mean"],
                     "position_r2_after": rep["position_r2_after"]["mean"]}
    export_backbone(folded.cpu(), out, extra=extra)
    js, md = write_report(rep, out)
    b, a = rep["position_r2_before"]["mean"], rep["position_r2_after"]["mean"]
    print(f"[rasa] position R^2 {b:.4f} -> {a:.4f}; backbone written to {out / 'backbone.safetensors'}; "
          f"report {md} and {js.name}")
    if "knn" in rep:
        for kind in rep["knn"]["before"]:
            pairs = "  ".join(f"{k}: {v:.2f} -> {rep['knn']['after'][kind][k]:.2f}"
                              for k, v in rep["knn"]["before"][kind].items())
            print(f"[rasa] k-NN {kind:<10} {pairs}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from fovea.hub.released import read_released, write_imported
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
    from fovea.train.checkpoint import save_atomic

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

    from fovea.config.loader import build_section
    from fovea.data.sources import SourceConfig, build_source
    from fovea.eval.embed import embed
    from fovea.hub.backbone import load_backbone
    from fovea.train.distributed import check_device

    backbone, meta = load_backbone(args.model, which=args.which)
    crops = meta.get("crops", {}) or {}
    cfg = build_section(SourceConfig, _parse_source(args.data))
    cfg.limit = args.limit
    src = build_source(cfg)
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


def cmd_presets(args: argparse.Namespace) -> int:
    for name in preset_names():
        tree = load_tree(name)
        print(f"{name:<28} {tree.get('description', '')}")
    return 0


def cmd_data_download(args: argparse.Namespace) -> int:
    from fovea.data.sources import download_fmnist
    path = download_fmnist(args.dest) if args.dest else download_fmnist()
    print(f"Fashion-MNIST verified in {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fovea.eval.commands import add_backbone_options, add_eval_commands
    p = argparse.ArgumentParser(prog="fovea", description="Pretrain, post-train and evaluate self-supervised "
                                "Vision Transformers (DINO, iBOT, DINOv2, Franca, I-JEPA).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a preset or YAML config", description="Train (or resume) a run.",
                       epilog=EPILOG_TRAIN + _keys_table(), formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("config", metavar="PRESET_OR_YAML", help="a preset name (see `fovea presets`) or a YAML file")
    t.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint", description="Frozen-feature evaluation protocols.")
    esub = e.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")
    k = esub.add_parser("knn", help="k-NN classification on frozen features",
                        description="Weighted k-NN (votes exp(sim/T)) on L2-normalised frozen features of a "
                        "checkpoint, for each k. Data defaults to the run's data.eval_train / data.eval_test.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    k.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run folder, a checkpoint .pt, or an exported backbone.safetensors")
    k.add_argument("--train", metavar="SPEC", help="labelled bank: fmnist:train[:DIR], parquet:FILE or folder:DIR")
    k.add_argument("--test", metavar="SPEC", help="labelled test set, same forms as --train")
    k.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200], help="numbers of neighbours")
    k.add_argument("--temperature", type=float, default=0.07, help="vote temperature T")
    k.add_argument("--features", default="cls", help="comma list of cls, mean_patch, both (CLS + mean patch)")
    k.add_argument("--widths", default="", metavar="W,W,...",
                   help="Matryoshka truncated-feature k-NN: also report each feature kind truncated to the first w "
                   "coordinates (x[..., :w], then L2-normalised) as KIND@w, from one feature extraction. Absolute "
                   "widths (12,48,192) or fractions of the embedding width D (1/16,1/4,1 or 0.25: when any item has / or ., "
                   "all are fractions); w = D is the "
                   "full feature (reported as KIND); for `both` each half (CLS, mean patch) is truncated")
    k.add_argument("--size", type=int, default=0, help="input size in px (0 = the run's crops.global_size)")
    k.add_argument("--limit-train", type=int, default=0, help="use a fixed random subset of the bank (0 = all)")
    k.add_argument("--limit-test", type=int, default=0, help="use a fixed random subset of the test set (0 = all)")
    add_backbone_options(k, workers=2)
    k.add_argument("--json", action="store_true", help="print one JSON object with the accuracies")
    k.set_defaults(func=cmd_eval_knn)
    add_eval_commands(esub)

    r = sub.add_parser("rasa", help="RASA post-training: remove absolute position from patch features",
                       description="RASA (METHODS.md section 4) on a frozen backbone: for R rounds, remove the "
                       "subspaces found so far from the patch tokens, fit sigmoid(Linear(D, 2, no bias)) to each "
                       "patch's normalised (row, col) with MSE (L-BFGS), Gram-Schmidt its two rows and add them to "
                       "the removed set. The accumulated D x D map is folded into the backbone (model.patch_projection"
                       "; CLS unchanged) and written with a report (position R^2 per round, k-NN before/after) to "
                       "--out: backbone.safetensors, backbone.yaml, rasa_report.json, rasa_report.md.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("backbone", metavar="RUN_DIR_OR_BACKBONE",
                   help="a run folder, a checkpoint .pt, or an exported backbone.safetensors")
    r.add_argument("--data", metavar="SPEC", help="images to fit on: fmnist:train[:DIR], parquet:FILE or folder:DIR "
                   "(default: the run's data.train)")
    r.add_argument("--heldout", metavar="SPEC", help="held-out images for the position R^2, same forms as --data "
                   "(default: disjoint random images of --data)")
    r.add_argument("--limit", type=int, default=2000, help="fit images (random fixed subset; 0 = all of --data, "
                   "then a third is held out when --heldout is not given)")
    r.add_argument("--limit-heldout", type=int, default=1000, help="held-out images (0 with --heldout = all)")
    r.add_argument("--rounds", type=int, default=9, help="RASA rounds R (2 dimensions removed per round)")
    r.add_argument("--steps", type=int, default=100, help="L-BFGS iterations of the position head per round")
    r.add_argument("--min-head-r2", type=float, default=0.01, help="stop early once a round's position head "
                   "predicts held-out position with R^2 below this (nothing left to remove); < 0: run all rounds")
    r.add_argument("--direction", choices=["head", "covariance"], default="head",
                   help="what each round removes: the sigmoid head's two rows (Franca's RASA) or the two rows of "
                   "the features/position cross-covariance (kills linear decodability in one round)")
    r.add_argument("--ridge", type=float, default=1e-3, help="relative ridge of the closed-form R^2 regressor "
                   "and patch probe")
    r.add_argument("--patches-per-image", type=int, default=0, help="random patches kept per image (0 = all)")
    r.add_argument("--out", default="", help="output folder (default: RUN_DIR/rasa, or rasa/ beside the file)")
    r.add_argument("--knn-train", metavar="SPEC", help="k-NN bank (default: the run's data.eval_train)")
    r.add_argument("--knn-test", metavar="SPEC", help="k-NN test set (default: the run's data.eval_test)")
    r.add_argument("--knn-limit-train", type=int, default=5000, help="k-NN bank images (0 = all)")
    r.add_argument("--knn-limit-test", type=int, default=2000, help="k-NN test images (0 = all)")
    r.add_argument("--no-knn", action="store_true", help="skip the k-NN before/after figures")
    r.add_argument("--k", type=int, nargs="+", default=[10, 20], help="k-NN numbers of neighbours")
    r.add_argument("--temperature", type=float, default=0.07, help="k-NN vote temperature T")
    r.add_argument("--size", type=int, default=0, help="input size in px (0 = the run's crops.global_size)")
    r.add_argument("--seed", type=int, default=0, help="seed of the image subsets and patch sampling")
    add_backbone_options(r)
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_rasa)

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

    pr = sub.add_parser("presets", help="list the shipped presets", description="List presets, one line each.")
    pr.set_defaults(func=cmd_presets)

    d = sub.add_parser("data", help="fetch data sets", description="Fetch public data sets.")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    dl = dsub.add_parser("download", help="download and verify a data set",
                         description="Download Fashion-MNIST from its official location and verify checksums.")
    dl.add_argument("dataset", choices=["fmnist"], help="data set name")
    dl.add_argument("--dest", default="", help="target folder (default ~/.cache/fovea/fashion-mnist)")
    dl.set_defaults(func=cmd_data_download)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fovea`` console script."""
    args = build_parser().parse_args(argv)
    from fovea.train.runfolder import RunFolderBusy
    from fovea.train.signals import RunInterrupted
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"fovea: config error: {e}", file=sys.stderr)
        return 2
    except RunInterrupted as e:  # SIGTERM -> 143, SIGINT -> 130, after last.pt was written
        if os.environ.get("RANK", "0") == "0":
            print(f"fovea: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:  # Ctrl-C twice, or outside the training loop
        print("fovea: interrupted", file=sys.stderr)
        return 130
    except FloatingPointError as e:  # non-finite loss: a one-line report, the last checkpoint kept
        print(f"fovea: error: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, RunFolderBusy) as e:
        print(f"fovea: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
