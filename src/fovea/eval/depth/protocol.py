"""``fovea eval depth MODEL --data nyu:DIR``: the DINOv2 linear depth probe (METHODS.md section 6b).

Data: the BTS / ZoeDepth NYU-Depth v2 layout (:mod:`fovea.eval.depth.data`). Input size (``--size``): 0 (the
default) feeds each image at its own resolution, as DINOv2 evaluates NYU at 480x640; S > 0 scales the
shorter side to S keeping the aspect ratio; either way each side is then rounded to the nearest multiple of
the patch size (480x640 with patch 14 -> 476x644). Features and head: :mod:`fovea.eval.depth.probe`
(lin1 / lin4, CLS concatenated, x4 bilinear, 1x1 conv to 256 bins uniform in [min, max], linear or softmax
bin normalisation). Training: AdamW with cosine decay, SigLoss (lambda 0.85, sqrt, no x10 factor, as DINOv2's
loss_weight 1.0), on features of the frozen backbone cached once (``--cache``), optionally with horizontal
flips (``--flip``). Scoring (:mod:`fovea.eval.depth.metrics`): per test image on gt in (min, max], the
Eigen crop on 480x640 labels (``--eigen-crop auto``), then averaged over images.

Result: ``a1 a2 a3`` (percent), ``abs_rel sq_rel rmse rmse_log log_10 silog mae`` (metres where metres),
counts (``n_train``, ``n_test``, ``n_test_scored``, ``n_test_no_valid``, ``skipped``), ``settings``,
``train_loss`` (per epoch), ``baselines`` (train mean depth as a constant and as a per-pixel map),
``head`` / ``head_settings`` (ctx.out_dir/depth_head.safetensors and .json), ``predictions``, ``pictures``
and ``seconds`` (also ``seconds_features``, ``seconds_train``, ``seconds_test``).
"""
from __future__ import annotations

from typing import Any

from fovea.eval.plugin import Option, PaperProtocol

METRIC_NAMES = ("a1", "a2", "a3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log_10", "silog", "mae")

OPTIONS = (
    Option("data", {"help": "nyu:DIR, the BTS / ZoeDepth NYU-Depth v2 layout (nyu_train.txt, nyu_test.txt, "
                            "RGB + 16-bit depth PNGs in mm)"}),
    Option("probe", {"default": "lin1", "choices": ["lin1", "lin4"],
                     "help": "lin1: last block's patch tokens + CLS; lin4: the same from blocks ceil(k*L/4), k=1..4"}),
    Option("bins", {"type": int, "default": 256, "help": "depth bins, uniform in [min-depth, max-depth]"}),
    Option("min-depth", {"type": float, "default": 1e-3, "help": "lowest bin and lower bound of valid gt (m)"}),
    Option("max-depth", {"type": float, "default": 10.0, "help": "highest bin and upper bound of valid gt (m)"}),
    Option("bin-norm", {"default": "linear", "choices": ["linear", "softmax"],
                        "help": "bin score normalisation: linear (relu + 0.1, over the sum; AdaBins/DINOv2) or softmax"}),
    Option("eigen-crop", {"default": "auto", "choices": ["auto", "true", "false"],
                          "help": "score inside the Eigen crop [45:471, 41:601]; auto: on 480x640 labels only; "
                                  "true: also on other sizes, the box scaled"}),
    Option("size", {"type": int, "default": 0,
                    "help": "backbone input: 0 = the image's own size, S = shorter side S (aspect kept); sides "
                            "rounded to the nearest multiple of the patch size"}),
    Option("epochs", {"type": int, "default": 20, "help": "probe training epochs"}),
    Option("lr", {"type": float, "default": 3e-3, "help": "AdamW peak learning rate (cosine decay to 0)"}),
    Option("weight-decay", {"type": float, "default": 1e-2, "help": "AdamW weight decay"}),
    Option("probe-batch", {"type": int, "default": 16, "help": "images per probe training step"}),
    Option("flip", {"default": "false", "choices": ["true", "false"],
                    "help": "train on horizontally mirrored copies too (each sample with probability 1/2)"}),
    Option("cache", {"default": "auto", "choices": ["auto", "true", "false"],
                     "help": "cache the train features once (auto: when they take at most 4 GiB)"}),
    Option("features", {"default": "backbone", "choices": ["backbone", "pixels"],
                        "help": "backbone tokens, or each patch's raw pixels (a baseline through the same probe)"}),
    Option("baselines", {"default": "true", "choices": ["true", "false"],
                         "help": "also score the train mean depth (constant and per-pixel map)"}),
    Option("save-predictions", {"default": "", "metavar": "DIR",
                                "help": "write one float32 .npy per test image (metres, label size), named after "
                                        "the image's relative path"}),
    Option("pictures", {"type": int, "default": 4, "help": "image | true | predicted pictures (0 = none)"}),
)


def _run(ctx: Any, opts: dict[str, Any]) -> dict:
    from fovea.eval.depth.runner import run
    return run(ctx, opts)


def headline(res: dict) -> dict[str, float]:
    """The report table's figures: a1 (%), abs_rel, rmse (m), silog."""
    return {k: float(res[k]) for k in ("a1", "abs_rel", "rmse", "silog")}


def _row(label: str, r: dict) -> str:
    return f"| {label} | " + " | ".join(f"{r[k]:.2f}" if k in ("a1", "a2", "a3", "silog") else f"{r[k]:.3f}"
                             for k in METRIC_NAMES) + " |"


def markdown(res: dict) -> list[str]:
    """The report section: settings, the metric table (probe and baselines), pictures."""
    s = res["settings"]
    lines = ["## Depth (linear probe, NYU layout)", "",
             f"Data `{s['data']}`: {res['n_train']} train, {res['n_test_scored']} of {res['n_test']} test images "
             f"scored ({res['skipped']} skipped). Probe {s['probe']} on {s['features']} (blocks {s['blocks']}, "
             f"{s['channels']} channels), input {', '.join(s['input_sizes'])}, {s['bins']} bins in "
             f"[{s['min_depth']:g}, {s['max_depth']:g}] m, {s['bin_norm']} norm; {s['epochs']} epochs AdamW lr "
             f"{s['lr']:g}; Eigen crop on {s['eigen_cropped_test_images']} test images; {res['seconds']:.1f} s.", "",
             "| | " + " | ".join(METRIC_NAMES) + " |", "|---" * (len(METRIC_NAMES) + 1) + "|",
             _row("probe", res)]
    base = res.get("baselines") or {}
    for k, label in (("mean_depth", "train mean depth"), ("mean_map", "train mean depth map")):
        if k in base:
            lines.append(_row(label, base[k]))
    if res.get("pictures"):
        lines += ["", "Image | true | predicted depth (magma, near = dark):", ""]
        lines += [f"![depth {i}]({p})" for i, p in enumerate(res["pictures"])]
    return lines


def summary(res: dict) -> list[str]:
    """What the command prints without --json."""
    s = res["settings"]
    return [f"depth {s['probe']} ({s['features']}): a1 {res['a1']:.2f}%  abs_rel {res['abs_rel']:.3f}  "
            f"rmse {res['rmse']:.3f} m  silog {res['silog']:.2f}  ({res['n_test_scored']} test images, "
            f"{res['seconds']:.1f} s)"]


PROTOCOL = PaperProtocol(
    name="depth", help="monocular depth by a linear probe (DINOv2 lin1 / lin4, NYU-Depth v2 layout)",
    description=__doc__ or "", options=OPTIONS, run=_run, headline=headline, markdown=markdown, summary=summary)
