"""RASA driver: features of a frozen backbone over image sources -> rounds -> folded backbone + report."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from fovea.data.augment import IMAGENET_MEAN, IMAGENET_STD, normalize
from fovea.data.loader import EvalDataset, make_eval_loader
from fovea.data.sources import ImageSource
from fovea.eval.features import extract_features
from fovea.eval.knn import knn_accuracy
from fovea.models.vit import VisionTransformer
from fovea.posttrain.rasa import (RasaConfig, fold_into_backbone, grid_positions, patch_probe_accuracy,
                                  position_r2, rasa_rounds)

#: Dense figures the issue asks for that this module cannot compute yet (no dense evaluation in the codebase).
MISSING_DENSE = ["linear segmentation (mIoU)", "HummingBird in-context segmentation (mIoU)"]


@torch.no_grad()
def extract_patch_tokens(backbone: VisionTransformer, source: ImageSource, size: int, device: torch.device,
                         mean: list[float] | tuple = IMAGENET_MEAN, std: list[float] | tuple = IMAGENET_STD,
                         batch_size: int = 256, num_workers: int = 0, patches_per_image: int = 0, seed: int = 0,
                         progress: bool = True, desc: str = "patch features") -> dict[str, Tensor]:
    """Frozen patch tokens of every image of ``source`` at ``size`` px (eval view, eval mode, fp32).

    Returns {"tokens" [N*k, D], "pos" [N*k, 2] normalised (row, col), "image" [N*k] image index,
    "labels" [N], "grid" [2] (h, w)}; k = all patches, or ``patches_per_image`` random ones (seeded).
    """
    was_training = backbone.training
    backbone.eval()
    loader = make_eval_loader(EvalDataset(source, size), batch_size, num_workers)
    g = torch.Generator().manual_seed(seed)
    toks, poss, imgs, labels = [], [], [], []
    grid = (size // backbone.patch_size, size // backbone.patch_size)
    pos_all = grid_positions(*grid)
    n_seen = 0
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x = normalize(batch["images"].to(device), list(mean), list(std))
        p = backbone.forward_features(x).patches.float().cpu()  # [B, Np, D]
        b, n, _ = p.shape
        if patches_per_image and patches_per_image < n:
            idx = torch.rand(b, n, generator=g).argsort(1)[:, :patches_per_image]  # [B, k]
        else:
            idx = torch.arange(n).expand(b, n)
        toks.append(torch.gather(p, 1, idx.unsqueeze(-1).expand(-1, -1, p.shape[-1])).reshape(-1, p.shape[-1]))
        poss.append(pos_all[idx].reshape(-1, 2))
        imgs.append((torch.arange(b) + n_seen).repeat_interleave(idx.shape[1]))
        labels.append(batch["labels"])
        n_seen += b
    backbone.train(was_training)
    return {"tokens": torch.cat(toks), "pos": torch.cat(poss), "image": torch.cat(imgs),
            "labels": torch.cat(labels), "grid": torch.tensor(grid)}


def _knn(train: dict[str, Tensor], ytr: Tensor, test: dict[str, Tensor], yte: Tensor, ks: list[int],
         temperature: float) -> dict:
    return {kind: {f"k={k}": acc for k, acc in knn_accuracy(train[kind], ytr, test[kind], yte, ks, temperature).items()}
            for kind in train}


@torch.no_grad()
def fold_check(original: VisionTransformer, folded: VisionTransformer, p: Tensor, source: ImageSource, size: int,
               device: torch.device, mean, std, n: int = 16) -> dict:
    """Compare the folded backbone with 'original backbone, then x @ P.T' on ``n`` images of ``source``."""
    batch = next(iter(make_eval_loader(EvalDataset(source, size), n, 0)))
    x = normalize(batch["images"].to(device), list(mean), list(std))
    a, b = original.eval().forward_features(x), folded.eval().forward_features(x)
    ref = a.patches @ p.to(device, a.patches.dtype).T
    return {"images": int(x.shape[0]),
            "max_abs_diff_patches": float((b.patches - ref).abs().max()),
            "cls_identical": a.cls is not None and b.cls is not None and bool(torch.equal(a.cls, b.cls))}


def run_rasa(backbone: VisionTransformer, fit_source: ImageSource, val_source: ImageSource, cfg: RasaConfig,
             size: int, device: torch.device, mean=None, std=None, batch_size: int = 256, num_workers: int = 0,
             patches_per_image: int = 0, seed: int = 0, knn_sources: tuple[ImageSource, ImageSource] | None = None,
             ks: list[int] | None = None, knn_temperature: float = 0.07) -> tuple[VisionTransformer, dict]:
    """RASA on a frozen ``backbone``: rounds on patches of ``fit_source``, R^2 on ``val_source``.

    Returns (folded backbone, report dict). k-NN before/after (CLS and mean-patch) on
    ``knn_sources = (bank, test)`` when given; the after-figures apply P to the extracted features,
    which equals running the folded backbone (checked on a batch in ``report['fold_check']``).
    """
    t0 = time.time()
    mean, std, ks = list(mean or IMAGENET_MEAN), list(std or IMAGENET_STD), list(ks or [10, 20])
    backbone = backbone.to(device).eval()
    kw = dict(mean=mean, std=std, batch_size=batch_size, num_workers=num_workers,
              patches_per_image=patches_per_image, seed=seed, progress=cfg.progress)
    fit = extract_patch_tokens(backbone, fit_source, size, device, desc="RASA fit features", **kw)
    val = extract_patch_tokens(backbone, val_source, size, device, desc="RASA held-out features", **kw)
    before = position_r2(fit["tokens"], fit["pos"], val["tokens"], val["pos"], cfg.ridge)
    print(f"[rasa] {len(fit['labels'])} fit / {len(val['labels'])} held-out images at {size}px "
          f"(grid {tuple(fit['grid'].tolist())}, {fit['tokens'].shape[0]} fit patches); "
          f"position R^2 before: {before['mean']:.4f}", flush=True)

    def log(res, _p) -> None:
        mse = f"{res.fit_mse:.5f}" if res.fit_mse is not None else "-"
        tqdm.write(f"[rasa] round {res.round}: head MSE {mse}, head R^2 {res.head_r2:.4f}, "
                   f"fresh regressor R^2 {res.fresh_r2['mean']:.4f} (row {res.fresh_r2['row']:.4f}, "
                   f"col {res.fresh_r2['col']:.4f})")

    p, rounds = rasa_rounds(fit["tokens"], fit["pos"], val["tokens"], val["pos"], cfg, on_round=log)
    pf = p.float()
    folded = fold_into_backbone(backbone, p)
    eye = torch.eye(p.shape[0], dtype=torch.float64)
    report: dict = {
        "config": dataclasses.asdict(cfg), "size": size, "grid": fit["grid"].tolist(), "dim": int(p.shape[0]),
        "n_fit_images": len(fit["labels"]), "n_heldout_images": len(val["labels"]),
        "n_fit_patches": int(fit["tokens"].shape[0]), "n_heldout_patches": int(val["tokens"].shape[0]),
        "patches_per_image": patches_per_image, "fit_source": fit_source.name, "heldout_source": val_source.name,
        "position_r2_before": before,
        "rounds": [{"round": r.round, "fit_mse": r.fit_mse, "head_r2_heldout": r.head_r2,
                    "fresh_r2_heldout": r.fresh_r2} for r in rounds],
        "position_r2_after": rounds[-1].fresh_r2 if rounds else before,
        "projection": {"removed_dims": round(float(torch.trace(eye - p))),
                       "symmetric_err": float((p - p.T).abs().max()), "idempotent_err": float((p @ p - p).abs().max())},
        "fold_check": fold_check(backbone, folded, pf, val_source, size, device, mean, std),
    }
    lf, lv = fit["labels"][fit["image"]], val["labels"][val["image"]]
    if (lf >= 0).all() and (lv >= 0).all():
        report["patch_probe"] = {
            "what": "least-squares linear classifier: image label from one patch token (fit patches -> held-out)",
            "before": patch_probe_accuracy(fit["tokens"], lf, val["tokens"], lv, cfg.ridge),
            "after": patch_probe_accuracy(fit["tokens"] @ pf.T, lf, val["tokens"] @ pf.T, lv, cfg.ridge)}
    if knn_sources is not None:
        ftr, ytr, _ = extract_features(backbone, knn_sources[0], size, ["cls", "mean_patch"], device, batch_size,
                                       num_workers, mean, std, cfg.progress, "k-NN bank features")
        fte, yte, _ = extract_features(backbone, knn_sources[1], size, ["cls", "mean_patch"], device, batch_size,
                                       num_workers, mean, std, cfg.progress, "k-NN test features")
        after_tr = {"cls": ftr["cls"], "mean_patch": ftr["mean_patch"] @ pf.T}
        after_te = {"cls": fte["cls"], "mean_patch": fte["mean_patch"] @ pf.T}
        report["knn"] = {"n_train": len(ytr), "n_test": len(yte), "temperature": knn_temperature,
                         "bank": knn_sources[0].name, "test": knn_sources[1].name,
                         "before": _knn(ftr, ytr, fte, yte, ks, knn_temperature),
                         "after": _knn(after_tr, ytr, after_te, yte, ks, knn_temperature)}
    report["missing"] = MISSING_DENSE
    report["minutes"] = round((time.time() - t0) / 60, 2)
    return folded, report


def report_markdown(rep: dict) -> str:
    """Human-readable summary of a RASA report."""
    b = rep["position_r2_before"]
    lines = ["# RASA report", "",
             f"{rep['n_fit_images']} fit images / {rep['n_heldout_images']} held-out images at {rep['size']} px "
             f"(grid {rep['grid'][0]}x{rep['grid'][1]}, D = {rep['dim']}); {rep['config']['rounds']} rounds, "
             f"{rep['projection']['removed_dims']} dimensions removed "
             f"(direction: {rep['config']['direction']}).", "",
             "Position R^2: a fresh closed-form linear regressor (with bias) of the patch's normalised (row, col), "
             "fitted on the fit patches, measured on held-out patches.", "",
             "| round | head MSE | head R^2 (held-out) | fresh R^2 row | fresh R^2 col | fresh R^2 mean |",
             "|---|---|---|---|---|---|",
             f"| before | | | {b['row']:.4f} | {b['col']:.4f} | {b['mean']:.4f} |"]
    for r in rep["rounds"]:
        f = r["fresh_r2_heldout"]
        mse = f"{r['fit_mse']:.5f}" if r["fit_mse"] is not None else "-"
        lines.append(f"| {r['round']} | {mse} | {r['head_r2_heldout']:.4f} | {f['row']:.4f} | "
                     f"{f['col']:.4f} | {f['mean']:.4f} |")
    if "knn" in rep:
        k = rep["knn"]
        lines += ["", f"k-NN top-1 (%) on {k['n_train']} bank / {k['n_test']} test images (T = {k['temperature']}):", "",
                  "| features | k | before | after | change |", "|---|---|---|---|---|"]
        for kind, accs in k["before"].items():
            for kk, v in accs.items():
                a = k["after"][kind][kk]
                lines.append(f"| {kind} | {kk[2:]} | {v:.2f} | {a:.2f} | {a - v:+.2f} |")
    if "patch_probe" in rep:
        pp = rep["patch_probe"]
        lines += ["", f"Patch probe ({pp['what']}): {pp['before']:.2f}% before, {pp['after']:.2f}% after."]
    fc = rep["fold_check"]
    lines += ["", f"Fold check on {fc['images']} images: max |folded - (backbone then projection)| = "
              f"{fc['max_abs_diff_patches']:.2e}; CLS identical: {fc['cls_identical']}.",
              "", "Not computed here (no dense evaluation yet): " + "; ".join(rep["missing"]) + ".", ""]
    return "\n".join(lines)


def write_report(rep: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``rasa_report.json`` and ``rasa_report.md`` into ``out_dir``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "rasa_report.json", out / "rasa_report.md"
    js.write_text(json.dumps(rep, indent=2, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o)))
    md.write_text(report_markdown(rep))
    return js, md
