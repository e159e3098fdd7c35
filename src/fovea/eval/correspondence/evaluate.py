"""The run of the correspondence protocol: read and check the SPair pairs, resize each image to S x S,
compute its dense map once per category (backbone patch tokens, or raw-pixel features), transfer the
source keypoints (:func:`fovea.eval.correspondence.match.match_points`), score PCK, write the matches
file and the pictures.

Unreadable images (decode_image gives None) are not refused: every pair that uses one is skipped and
counted in ``result["skipped"]`` (missing files, bad JSON, missing keypoints or boxes ARE refused before
any work, see :mod:`fovea.eval.correspondence.data`)."""
from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from fovea.data.decode import decode_image
from fovea.errors import ConfigError
from fovea.eval.correspondence.data import Pair, parse_spec, read_spair
from fovea.eval.correspondence.match import match_points, pixel_features, resize_square
from fovea.eval.correspondence.metrics import bbox_max_side, pck_table, pck_threshold
from fovea.eval.correspondence.pictures import draw_matches
from fovea.eval.plugin import EvalContext

#: the alpha of the pictures' green / red colouring
PICTURE_ALPHA = 0.1
CONVENTION = ("points (x, y) in pixels of the original image, integer i = centre of pixel i; a resize from W to W' "
              "maps x to (x + 0.5) * W' / W - 0.5")


def parse_alphas(text: str | float | list) -> list[float]:
    """'0.05,0.1,0.15' (or a number, or a list) -> [0.05, 0.1, 0.15]; each in (0, 1], else ConfigError."""
    items = text if isinstance(text, list) else str(text).split(",")
    try:
        out = [float(a) for a in items if str(a).strip()]
    except ValueError:
        raise ConfigError(f"--alpha {text!r}: not a comma-separated list of numbers") from None
    if not out or any(not 0 < a <= 1 for a in out):
        raise ConfigError(f"--alpha {text!r}: each alpha must be in (0, 1]")
    return list(dict.fromkeys(out))


def settings_of(opts: dict[str, Any], patch: int) -> dict[str, Any]:
    """Checked settings of ``opts`` (ConfigError on a bad value)."""
    s: dict[str, Any] = {"data": str(opts["data"]), "split": str(opts.get("split") or "test"), "size": int(opts.get("size", 224)),
         "resolution": str(opts.get("resolution", "pixel")), "features": str(opts.get("features", "backbone")),
         "alphas": parse_alphas(opts.get("alpha", "0.05,0.1,0.15")), "pixel_window": int(opts.get("pixel_window", 9)),
         "max_pairs": int(opts.get("max_pairs", 0) or 0), "pictures": int(opts.get("pictures", 4))}
    if s["resolution"] not in ("pixel", "patch"):
        raise ConfigError(f"--resolution {s['resolution']!r}: choose pixel or patch")
    if s["features"] not in ("backbone", "pixels"):
        raise ConfigError(f"--features {s['features']!r}: choose backbone or pixels")
    if s["size"] < 2:
        raise ConfigError(f"--size {s['size']}: too small")
    if (s["features"] == "backbone" or s["resolution"] == "patch") and s["size"] % patch:
        raise ConfigError(f"--size {s['size']} is not a multiple of the patch size {patch}")
    if s["pixel_window"] < 1 or s["pixel_window"] % 2 == 0 or s["pixel_window"] >= s["size"]:
        raise ConfigError(f"--pixel-window {s['pixel_window']}: must be odd and smaller than --size")
    if s["max_pairs"] < 0 or s["pictures"] < 0:
        raise ConfigError("--max-pairs and --pictures must be >= 0")
    s["patch_size"] = patch
    return s


def round_robin(pairs: list[Pair]) -> list[Pair]:
    """Pairs (sorted by category) reordered: the first of each category, then the second of each..."""
    groups = [list(g) for _, g in groupby(pairs, key=lambda p: p.category)]
    return [g[i] for i in range(max(map(len, groups), default=0)) for g in groups if i < len(g)]


def _feature_fns(ctx: EvalContext, s: dict) -> tuple[Callable[[np.ndarray], Tensor], Callable[[Tensor], Tensor]]:
    """(encode: uint8 [B, S, S, 3] -> what is kept per image [B, ...], expand: one kept item -> dense map
    [D, h, w] to match on): backbone patch tokens [D, S/p, S/p], or raw-pixel features [3 w^2, S, S]
    (average-pooled to the patch grid at patch resolution)."""
    if s["features"] == "backbone":
        return (lambda imgs: ctx.patch_grid(ctx.to_input(imgs)).permute(0, 3, 1, 2).contiguous()), (lambda m: m)

    def pooled(imgs: np.ndarray) -> Tensor:  # one image at a time: the full-size map is 3 w^2 x S x S
        return torch.cat([F.avg_pool2d(pixel_features(ctx.to_input(im), s["pixel_window"]), s["patch_size"])
                          for im in imgs])
    if s["resolution"] == "patch":
        return pooled, (lambda m: m)
    return (lambda imgs: ctx.to_input(imgs)), (lambda x: pixel_features(x[None], s["pixel_window"])[0])


def _matches_path(ctx: EvalContext, given: str) -> Path:
    p = Path(given).expanduser() if given else Path(ctx.out_dir) / "matches.json"
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--save-matches {p}: cannot create its folder ({e})") from None
    if p.is_dir():
        raise ConfigError(f"--save-matches {p} is a folder, not a file")
    return p


def _r(a: np.ndarray) -> list:
    return np.round(np.asarray(a, np.float64), 3).tolist()


@torch.no_grad()
def evaluate(ctx: EvalContext, opts: dict[str, Any]) -> dict:
    """The protocol's ``run`` (see :mod:`fovea.eval.correspondence.protocol` for the result's keys)."""
    t0 = time.perf_counter()
    s = settings_of(opts, ctx.patch_size)
    pairs = read_spair(parse_spec(s["data"]), s["split"])
    if s["max_pairs"]:
        keep = {id(p) for p in round_robin(pairs)[:s["max_pairs"]]}
        pairs = [p for p in pairs if id(p) in keep]
    mpath = _matches_path(ctx, str(opts.get("save_matches") or ""))
    encode, expand = _feature_fns(ctx, s)
    size, alphas = s["size"], s["alphas"]
    correct: dict[float, list[np.ndarray]] = {a: [] for a in alphas}
    cats: list[str] = []
    entries: list[dict] = []
    unreadable: list[str] = []
    n_images, skipped_pairs = 0, 0
    t_read = t_feat = t_match = 0.0
    bar = tqdm(total=len(pairs), desc="correspondence", disable=not ctx.progress, leave=False)
    for _, grp in groupby(pairs, key=lambda p: p.category):
        group = list(grp)
        paths = list(dict.fromkeys(q for p in group for q in (p.src_path, p.trg_path)))
        t = time.perf_counter()
        imgs: dict[Path, np.ndarray] = {}
        wh: dict[Path, tuple[int, int]] = {}
        for q in paths:
            im = decode_image(q)
            if im is None:
                unreadable.append(str(q))
                continue
            wh[q] = (int(im.shape[1]), int(im.shape[0]))
            imgs[q] = resize_square(im, size)
        n_images += len(imgs)
        t_read += time.perf_counter() - t
        t = time.perf_counter()
        kept: dict[Path, Tensor] = {}
        ok = list(imgs)
        for i in range(0, len(ok), max(1, ctx.batch_size)):
            chunk = ok[i:i + max(1, ctx.batch_size)]
            out = encode(np.stack([imgs[q] for q in chunk]))
            kept.update(zip(chunk, out))
        t_feat += time.perf_counter() - t
        t = time.perf_counter()
        for p in group:
            bar.update(1)
            if p.src_path not in kept or p.trg_path not in kept:
                skipped_pairs += 1
                continue
            sm, tm = expand(kept[p.src_path]), expand(kept[p.trg_path])
            out_wh = (size, size) if s["resolution"] == "pixel" else (int(sm.shape[2]), int(sm.shape[1]))
            pred, sim = match_points(sm, tm, p.src_kps, wh[p.src_path], wh[p.trg_path], out_wh)
            dist = np.linalg.norm(pred - p.trg_kps, axis=1)
            thr = {a: pck_threshold(p.trg_bbox, a) for a in alphas}
            for a in alphas:
                correct[a].append(dist < thr[a])
            cats.append(p.category)
            entries.append({"pair": p.name, "category": p.category, "src_imname": p.src_imname,
                            "trg_imname": p.trg_imname, "src_imsize": list(wh[p.src_path]),
                            "trg_imsize": list(wh[p.trg_path]), "src_kps": _r(p.src_kps), "trg_kps": _r(p.trg_kps),
                            "pred_kps": _r(pred), "similarity": np.round(sim.astype(np.float64), 4).tolist(),
                            "trg_bndbox": _r(p.trg_bbox), "bbox_max_side": bbox_max_side(p.trg_bbox),
                            "thresholds": {f"{a:g}": thr[a] for a in alphas},
                            "distances": _r(dist), "correct": {f"{a:g}": (dist < thr[a]).tolist() for a in alphas}})
        t_match += time.perf_counter() - t
    bar.close()
    if not entries:
        raise ConfigError(f"{s['data']}: no pair could be evaluated ({len(unreadable)} unreadable images)")
    result: dict[str, Any] = pck_table(correct, cats)
    result.update({"n_pairs": len(entries), "n_keypoints": int(sum(len(c) for c in correct[alphas[0]])),
                   "n_images": n_images, "n_categories": len(set(cats)),
                   "skipped": {"pairs": skipped_pairs, "images": len(unreadable), "files": unreadable[:50]}})
    settings = {k: v for k, v in s.items()}
    settings["matches_convention"] = CONVENTION
    mpath.write_text(json.dumps({"protocol": "correspondence", "convention": CONVENTION, "settings": settings,
                                 "pairs": entries}))
    pics = _pictures(entries, pairs, Path(ctx.out_dir), s["pictures"])
    result.update({"settings": settings, "matches": str(mpath.resolve()), "pictures": pics,
                   "seconds": {"read": round(t_read, 3), "features": round(t_feat, 3), "matching": round(t_match, 3),
                               "total": round(time.perf_counter() - t0, 3)}})
    return result


def _pictures(entries: list[dict], pairs: list[Pair], out: Path, n: int) -> list[str]:
    """Draw up to ``n`` evaluated pairs (one per category in turn) -> absolute PNG paths."""
    if n <= 0:
        return []
    by_name = {(p.category, p.name): p for p in pairs}
    chosen = {id(p) for p in round_robin([by_name[(e["category"], e["pair"])] for e in entries])[:n]}
    paths: list[str] = []
    for e in entries:
        p = by_name[(e["category"], e["pair"])]
        if id(p) not in chosen:
            continue
        src, trg = decode_image(p.src_path), decode_image(p.trg_path)
        if src is None or trg is None:
            continue
        pred, true = np.asarray(e["pred_kps"]), p.trg_kps
        key = f"{PICTURE_ALPHA:g}"
        ok = (np.asarray(e["correct"][key]) if key in e["correct"]
              else np.linalg.norm(pred - true, axis=1) < pck_threshold(p.trg_bbox, PICTURE_ALPHA))
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{len(paths):02d}_{p.category}")[:60]
        paths.append(str(draw_matches(src, trg, p.src_kps, pred, true, ok,
                                      out / "correspondence" / f"{stem}.png").resolve()))
    return paths
