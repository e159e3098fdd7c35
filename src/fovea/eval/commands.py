"""Argument parsers and handlers of ``fovea eval linear|logreg|fewshot|ood|seg|pictures|all``."""
from __future__ import annotations

import argparse
import json
import shlex
import sys

from fovea.errors import ConfigError
from fovea.eval.cli_common import add_backbone_options, make_suite
from fovea.eval.protocols import PAPER_PROTOCOLS
from fovea.eval.report import DEFAULT_PROTOCOLS, PROTOCOLS

SPEC = "fmnist:train|test[:DIR], parquet:FILE, folder:DIR, webdataset:SHARDS or manifest:DIR"



def _common(p: argparse.ArgumentParser, image_level: bool = True) -> None:
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run folder, a checkpoint .pt, or an exported backbone.safetensors")
    if image_level:
        p.add_argument("--train", metavar="SPEC", help=f"labelled train set ({SPEC}); default: the run's data.eval_train")
        p.add_argument("--test", metavar="SPEC", help="labelled test set, same forms; default: the run's data.eval_test")
        p.add_argument("--limit-train", type=int, default=0, help="fixed random subset of the train set (0 = all)")
        p.add_argument("--limit-test", type=int, default=0, help="fixed random subset of the test set (0 = all)")
    p.add_argument("--size", type=int, default=0, help="input size in px (0 = the run's eval size / crops.global_size)")
    add_backbone_options(p)
    p.add_argument("--no-cache", action="store_true", help="do not read/write cached features in RUN/eval/cache")
    p.add_argument("--seed", type=int, default=0, help="seed of splits, draws and head initialisation")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    if image_level:
        p.add_argument("--features", default="cls", help="feature kind of logreg / fewshot / ood: cls, mean_patch, "
                       "both, cls_last4, cls_last4_mean, registers; KIND@W keeps the first W channels (Matryoshka)")


def add_subset_opts(p: argparse.ArgumentParser) -> None:
    """--test-classes / --test-labels: a test set whose classes are a subset of the training classes."""
    p.add_argument("--test-classes", metavar="FILE", default="",
                   help="robustness (ImageNet-A / -R): the test set's classes as training-class indices (integers "
                   "or a JSON list); scores are restricted to them before the argmax")
    p.add_argument("--test-labels", choices=["subset", "train"], default="subset",
                   help="with --test-classes: test label i is the i-th listed class (subset) or a training-class "
                   "index (train)")


def _linear_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=10, help="linear probe: epochs over the cached train features")
    p.add_argument("--probe-batch-size", type=int, default=1024, help="linear probe: SGD batch (lrs scale by batch/256)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="linear probe: validation share carved from train")


def _logreg_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sweep-limit", type=int, default=10000, help="logreg: train rows used in the C sweep (0 = all)")
    p.add_argument("--max-iter", type=int, default=1000, help="logreg: L-BFGS iterations")


def _fewshot_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10], help="few-shot: labelled images per class")
    p.add_argument("--draws", type=int, default=5, help="few-shot: random draws per shot count")
    p.add_argument("--C", type=float, default=1.0, dest="fewshot_C", help="few-shot: logistic-regression C")


def _seg_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seg-train", metavar="DIR", default="",
                   help="segmentation train pairs: DIR with images/ and masks/ (PNG labels), or IMAGES_DIR:MASKS_DIR")
    p.add_argument("--seg-test", metavar="DIR", default="", help="segmentation test pairs, same forms")
    p.add_argument("--seg-size", type=int, default=0, help="dense input size in px (0 = --size)")
    p.add_argument("--ignore-index", type=int, default=255, help="mask value that is never scored")
    p.add_argument("--num-classes", type=int, default=0, help="segmentation classes (0 = 1 + largest label)")
    p.add_argument("--seg-epochs", type=int, default=20, help="linear segmentation: epochs")
    p.add_argument("--hb-k", type=int, default=30, help="HummingBird: nearest memory entries per patch")
    p.add_argument("--hb-temperature", type=float, default=0.02, help="HummingBird: softmax temperature of votes")
    p.add_argument("--hb-memory", type=int, default=200000, help="HummingBird: memory bank size (patches)")


def _ood_opts(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--ood", metavar="SPEC", required=required, default=None,
                   help=f"out-of-distribution images ({SPEC}); in-distribution = --test, bank = --train")
    p.add_argument("--ood-k", type=int, nargs="+", default=[1, 50], help="OOD: k of the k-th-nearest-neighbour score")


def _pictures_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pictures", metavar="SPEC", default=None, help=f"images for the picture grids ({SPEC}); default --test")
    p.add_argument("--pictures-size", type=int, default=0, help="input px of the pictures (0 = --size)")
    p.add_argument("--n-images", type=int, default=8, help="pictures: images in the grid")
    p.add_argument("--out", default="", help="output folder (default RUN_DIR/eval)")


def settings_from_args(args: argparse.Namespace) -> dict:
    """Per-protocol keyword arguments of the Suite methods from parsed arguments."""
    g = lambda k, d=None: getattr(args, k, d)  # noqa: E731
    sub: dict = {}
    if g("test_classes"):
        from fovea.eval.subset import load_test_classes
        sub = {"test_classes": load_test_classes(str(g("test_classes"))), "test_labels": g("test_labels", "subset")}
    s: dict = {"knn": {"ks": g("k", [10, 20, 100, 200]), "kinds": str(g("knn_features", "cls")).split(","), **sub},
               "linear": {"epochs": g("epochs", 10), "batch_size": g("probe_batch_size", 1024),
                          "val_fraction": g("val_fraction", 0.1), **sub},
               "logreg": {"sweep_limit": g("sweep_limit", 10000), "max_iter": g("max_iter", 1000),
                          "kind": g("features", "cls")},
               "fewshot": {"shots": g("shots", [1, 5, 10]), "draws": g("draws", 5), "c": g("fewshot_C", 1.0),
                           "kind": g("features", "cls")},
               "ood": {"ks": g("ood_k", [1, 50]), "kind": g("features", "cls")},
               "seg": {"epochs": g("seg_epochs", 20), "k": g("hb_k", 30), "temperature": g("hb_temperature", 0.02),
                       "memory_size": g("hb_memory", 200000), "ignore_index": g("ignore_index", 255),
                       "num_classes": g("num_classes", 0)},
               "pictures": {"n_images": g("n_images", 8)}}
    return s


def cmd_eval_protocol(args: argparse.Namespace) -> int:
    """Run one protocol (args.protocol) and print its results."""
    from fovea.eval.report import run_report
    suite = make_suite(args)
    res = run_report(suite, [args.protocol], getattr(args, "out", "") or None, settings_from_args(args),
                     "fovea " + " ".join(shlex.quote(a) for a in sys.argv[1:]), strict=True)
    _print(res, args)
    return 0


def cmd_eval_all(args: argparse.Namespace) -> int:
    """Run the chosen protocols and write report.md / report.json / PNGs."""
    from fovea.eval.report import checkpoint_step, run_report
    from fovea.eval.paper_commands import given_paper_protocols, paper_settings
    protocols = [p.strip() for p in args.protocols.split(",")] if args.protocols else list(DEFAULT_PROTOCOLS)
    given = given_paper_protocols(args)
    if not args.protocols:
        protocols += (["ood"] if args.ood else []) + (["seg"] if args.seg_train else []) + given
    missing = [p for p in protocols if p in PAPER_PROTOCOLS and p not in given]
    if missing:
        raise ConfigError(f"--protocols names {', '.join(missing)} but " + ", ".join(f"--{p}-data" for p in missing)
                          + " is not given")
    suite = make_suite(args)
    settings = settings_from_args(args)
    settings.update({p: paper_settings(args, p, True) for p in given})
    res = run_report(suite, protocols, args.out or None, settings,
                     "fovea " + " ".join(shlex.quote(a) for a in sys.argv[1:]), checkpoint_step(suite.run_dir))
    _print(res, args)
    out = args.out or suite.run_dir / "eval"
    if not args.json:
        print(f"[fovea] report: {out}/report.md (+ report.json, PNGs)")
    return 1 if res["errors"] else 0


def _print(res: dict, args: argparse.Namespace) -> None:
    from fovea.eval.report import headline
    if args.json:
        print(json.dumps(res))
        return
    for k, v in headline(res).items():
        print(f"  {k:<36} {v:.2f}")
    if "pictures" in res:
        print(f"  pictures: {res['pictures']['pca']}, {res['pictures']['attention']}")


def add_eval_commands(esub: argparse._SubParsersAction) -> None:
    """Add the protocol sub-commands to the ``fovea eval`` sub-parser."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    specs = [
        ("linear", "DINOv2-style linear probe grid", "Train linear heads at once on cached frozen features: "
         "13 lrs x {last 1, last 4 blocks' CLS} x {with, without mean patch}; SGD momentum 0.9, cosine; best on a "
         "validation split carved from train, reported on test. --test-classes restricts the test logits to a "
         "class subset (ImageNet-A / -R).", [_linear_opts, add_subset_opts]),
        ("logreg", "logistic regression (L-BFGS, C sweep)", "scikit-learn L-BFGS logistic regression on standardised "
         "CLS features; C swept over 10^-6..10^5 on a validation split, refit on all train, test top-1.",
         [_logreg_opts]),
        ("fewshot", "few-shot k-NN and logistic regression", "n labelled images per class (several random draws): "
         "k-NN and logistic regression top-1 on the test set, mean and std over draws.", [_fewshot_opts]),
        ("ood", "OOD detection (k-th NN score, AUROC, FPR@95)", "Score = cosine similarity to the k-th nearest "
         "--train feature; in-distribution = --test, out-of-distribution = --ood; AUROC and FPR at 95% TPR.",
         [lambda p: _ood_opts(p, True)]),
        ("seg", "dense: linear segmentation + HummingBird (mIoU)", "Dense protocols on image/mask folder pairs: "
         "a linear layer on frozen patch tokens, and HummingBird in-context segmentation (memory bank of labelled "
         "patches, k nearest with softmax-weighted votes, FAISS search); both report mIoU.", [_seg_opts]),
        ("pictures", "PCA-to-RGB and CLS attention PNGs", "Save PCA of patch features mapped to RGB and last-block "
         "CLS attention maps for a grid of images.", [_pictures_opts]),
    ]
    for name, short, desc, adders in specs:
        p = esub.add_parser(name, help=short, description=desc, formatter_class=fmt)
        _common(p, image_level=name != "seg")
        for add in adders:
            add(p)
        if name != "pictures":
            p.add_argument("--out", default="", help="output folder of report.json / report.md (default RUN_DIR/eval)")
        p.set_defaults(func=cmd_eval_protocol)
    a = esub.add_parser("all", help="every protocol; writes report.md, report.json and PNGs",
                        description="Run the evaluation suite on one checkpoint and write RUN_DIR/eval/report.md, "
                        "report.json and PNGs; scalars are appended to the run's metrics.jsonl / TensorBoard. "
                        "Features are extracted once per data set and cached.", formatter_class=fmt)
    _common(a)
    a.add_argument("--protocols", default="", help=f"comma list from {','.join(PROTOCOLS)} (default: "
                   f"{','.join(DEFAULT_PROTOCOLS)}, plus ood / seg when --ood / --seg-train are given, and each paper "
                   "protocol when its --NAME-data is given)")
    a.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200], help="k-NN: numbers of neighbours")
    a.add_argument("--knn-features", default="cls", help="k-NN: comma list of cls, mean_patch, both, cls_last4, ...")
    for add in (_linear_opts, add_subset_opts, _logreg_opts, _fewshot_opts, lambda p: _ood_opts(p, False), _seg_opts,
                _pictures_opts):
        add(a)
    from fovea.eval.paper_commands import add_paper_commands, add_paper_options_to_all
    add_paper_options_to_all(a)
    a.set_defaults(func=cmd_eval_all)
    add_paper_commands(esub, fmt)
