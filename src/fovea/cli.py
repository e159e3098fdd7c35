"""The ``fovea`` command: train, evaluate, list presets, fetch data."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fovea.config.loader import describe, load_config, load_tree, preset_names
from fovea.errors import ConfigError
from fovea.data.specs import source_from_spec

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
    tw = max(len(t) for _, t, *_ in rows)
    return "\n".join(f"  {k:<{w}}  {t:<{tw}} {d:<14} {h}" for k, t, d, h in rows)


def cmd_train(args: argparse.Namespace) -> int:
    from fovea.train.loop import train
    cfg = load_config(args.config, args.overrides)
    if not cfg.output_dir:
        cfg.output_dir = str(Path("runs") / (cfg.name or cfg.method))
    train(cfg)
    return 0


def cmd_eval_knn(args: argparse.Namespace) -> int:
    import torch

    from fovea.data.base import ImageSource
    from fovea.eval.knn import evaluate_knn, parse_widths
    from fovea.hub.backbone import load_backbone

    backbone, meta = load_backbone(args.checkpoint, which=args.which)
    data = meta.get("data", {}) or {}
    crops = meta.get("crops", {}) or {}

    def source(spec: str | None, key: str, limit: int) -> ImageSource:
        if not spec and not data.get(key):
            raise ConfigError(f"no --{key.split('_')[1]} given and the checkpoint's config has no data.{key}")
        return source_from_spec(spec, data.get(key), limit, what=f"--{key.split('_')[1]}")

    train_src = source(args.train, "eval_train", args.limit_train)
    test_src = source(args.test, "eval_test", args.limit_test)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone.to(device)
    size = args.size or data.get("eval_size") or crops.get("global_size") or backbone.cfg.img_size
    kinds = [k.strip() for k in args.features.split(",")]
    widths = parse_widths(args.widths, backbone.embed_dim) if args.widths else []
    from fovea.eval.subset import load_test_classes
    classes = load_test_classes(args.test_classes) if args.test_classes else None
    res = evaluate_knn(backbone, train_src, test_src, args.k, args.temperature, kinds, size, device,
                       args.batch_size, args.workers, crops.get("mean"), crops.get("std"),
                       progress=not args.json, widths=widths, test_classes=classes,
                       test_label_mode=args.test_labels)
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

    from fovea.data.base import ImageSource
    from fovea.data.sources import SubsetSource
    from fovea.hub.backbone import export_backbone, load_backbone
    from fovea.posttrain.rasa import RasaConfig
    from fovea.posttrain.rasa_run import run_rasa, write_report

    backbone, meta = load_backbone(args.backbone, which=args.which)
    data = meta.get("data", {}) or {}
    crops = meta.get("crops", {}) or {}

    def source(spec: str | None, key: str, limit: int, what: str) -> ImageSource:
        if not spec and not (data.get(key) if key else None):
            raise ConfigError(f"no {what} given and the backbone's config has no data.{key}")
        return source_from_spec(spec, data.get(key) if key else None, limit, args.seed, what)

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


def cmd_data_shard(args: argparse.Namespace) -> int:
    from fovea.data.tarshards import write_shards
    src = source_from_spec(args.data)
    paths = write_shards(src, args.out, args.per_shard, args.prefix)
    last = Path(paths[-1]).stem.rsplit("-", 1)[-1]
    first = "0" * len(last)
    print(f"[fovea] {len(src)} images of {src.name} -> {len(paths)} shards; train on them with "
          f"data.train.kind=webdataset data.train.path='{Path(args.out) / f'{args.prefix}-{{{first}..{last}}}.tar'}'")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fovea.eval.commands import add_backbone_options, add_eval_commands, add_subset_opts
    from fovea.curate.commands import add_curate_command
    from fovea.hub.commands import add_hub_commands
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
    add_subset_opts(k)
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

    add_hub_commands(sub)
    add_curate_command(sub)

    pr = sub.add_parser("presets", help="list the shipped presets", description="List presets, one line each.")
    pr.set_defaults(func=cmd_presets)

    d = sub.add_parser("data", help="fetch data sets", description="Fetch public data sets.")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    dl = dsub.add_parser("download", help="download and verify a data set",
                         description="Download Fashion-MNIST from its official location and verify checksums.")
    dl.add_argument("dataset", choices=["fmnist"], help="data set name")
    dl.add_argument("--dest", default="", help="target folder (default ~/.cache/fovea/fashion-mnist)")
    dl.set_defaults(func=cmd_data_download)
    sh = dsub.add_parser("shard", help="write a data set as WebDataset tar shards",
                         description="Write every readable image of a data set as WebDataset tar shards "
                         "(KEY.png + KEY.cls): OUT/PREFIX-00000.tar ... Train on them with "
                         "data.train.kind=webdataset data.train.path='OUT/PREFIX-{00000..NNNNN}.tar'.",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sh.add_argument("--data", required=True, metavar="SPEC", help="fmnist:train|test[:DIR], parquet:FILE, folder:DIR, ...")
    sh.add_argument("--out", required=True, help="output folder")
    sh.add_argument("--per-shard", type=int, default=1000, help="images per shard")
    sh.add_argument("--prefix", default="train", help="shard file name prefix")
    sh.set_defaults(func=cmd_data_shard)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fovea`` console script.

    A ``torchrun`` rank ends with ``os._exit`` after its output is flushed: the process group is already
    destroyed, and gloo's threads could otherwise abort the interpreter's own exit ("terminate called without
    an active exception"), turning a finished run into a failed rank."""
    code = _main(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: list[str] | None = None) -> int:
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
