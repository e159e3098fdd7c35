"""The ``fovea`` command: train, evaluate, list presets, fetch data."""
from __future__ import annotations

import argparse
import json
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
    p = argparse.ArgumentParser(prog="fovea", description="Pretrain, post-train and evaluate self-supervised "
                                "Vision Transformers (DINO, iBOT, DINOv2, Franca; I-JEPA to come).")
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
    k.add_argument("--which", choices=["teacher", "student"], default="teacher",
                   help="which backbone of a training checkpoint")
    k.add_argument("--batch-size", type=int, default=256, help="feature-extraction batch size")
    k.add_argument("--workers", type=int, default=2, help="data-loading worker processes")
    k.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    k.add_argument("--json", action="store_true", help="print one JSON object with the accuracies")
    k.set_defaults(func=cmd_eval_knn)

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
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"fovea: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"fovea: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
