"""Measurement set of ``fovea eval correspondence``: SPair-layout pairs with known answers.

Each pair is an Imagenette validation image (the source, cropped to a random non-square size) and a
copy of it warped by a known random homography (rotation up to 25 degrees, scale 0.65-1.15, corner
jitter up to 8 %) onto another Imagenette image as background, with photometric changes (contrast,
brightness, per-channel gains, gamma, blur, noise, JPEG). Category = the Imagenette label. Keypoints:
7 to 13 (mean 10; small: 8) Shi-Tomasi corners of the source (textured points, 8 px from the border) whose warped
position lies inside the target; ``trg_kps`` = their exact images under the homography (cv2's
pixel-centre convention, the protocol's too). Boxes: the whole source image, and the bounding box of
the warped source inside the target canvas. Written in the SPair-71k layout:
``OUT/JPEGImages/<category>/*.jpg``, ``OUT/PairAnnotation/test/NNNNNN-SRC-TRG:<category>.json``.

Default: 10 categories x 10 pairs (~1000 keypoints); ``small``: 3 categories x 2 pairs.

    .venv/bin/python benchmarks/eval_sets/correspondence.py /work/eval_sets/correspondence
"""
from __future__ import annotations

import argparse
import io
import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np

from fovea.data.decode import decode_image


def _imagenette(data: Path) -> tuple[list[bytes], np.ndarray, list[str]]:
    """(encoded images, labels, class names) of ``data/imagenette/val.parquet``."""
    import pyarrow.parquet as pq
    t = pq.read_table(data / "imagenette" / "val.parquet")
    meta = json.loads((t.schema.metadata or {}).get(b"huggingface", b"{}"))
    names = meta.get("info", {}).get("features", {}).get("label", {}).get("names") or [str(i) for i in range(10)]
    imgs = [c["bytes"] for c in t.column("image").to_pylist()]
    return imgs, np.asarray(t.column("label").to_pylist()), [re.sub(r"[^a-z0-9]+", "_", n.lower()) for n in names]


def _photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Contrast, brightness, per-channel gain, gamma, sometimes blur, then Gaussian noise. uint8 -> uint8."""
    x = img.astype(np.float32) / 255.0
    x = (x - 0.5) * rng.uniform(0.7, 1.3) + 0.5 + rng.uniform(-0.1, 0.1)
    x = x * rng.uniform(0.9, 1.1, size=3)[None, None]
    x = np.clip(x, 0, 1) ** rng.uniform(0.8, 1.25)
    if rng.random() < 0.5:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.5, 1.2))
    x = x + rng.normal(0, rng.uniform(0.01, 0.025), size=x.shape).astype(np.float32)
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def _homography(ws: int, hs: int, wt: int, ht: int, rng: np.random.Generator) -> np.ndarray:
    """3x3 homography (source pixel centres -> target pixel centres): similarity about the centres plus
    corner jitter."""
    th, s = np.deg2rad(rng.uniform(-25, 25)), rng.uniform(0.65, 1.15)
    r = s * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    cs = np.array([(ws - 1) / 2, (hs - 1) / 2])
    ct = np.array([(wt - 1) / 2, (ht - 1) / 2]) + rng.uniform(-0.08, 0.08, 2) * [wt, ht]
    src = np.array([[0, 0], [ws - 1, 0], [ws - 1, hs - 1], [0, hs - 1]], np.float64)
    dst = (src - cs) @ r.T + ct + rng.uniform(-0.08, 0.08, (4, 2)) * [ws, hs]
    return cv2.getPerspectiveTransform(src.astype(np.float32), dst.astype(np.float32)).astype(np.float64)


def _apply(hm: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Points [K, 2] through the homography [3, 3]."""
    p = np.c_[pts, np.ones(len(pts))] @ hm.T
    return p[:, :2] / p[:, 2:3]


def _jpeg(img: np.ndarray, path: Path, quality: int = 92) -> None:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    path.write_bytes(buf.getvalue())


def _pair(src_full: np.ndarray, bg: np.ndarray, rng: np.random.Generator, n_kps: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[int]] | None:
    """(source crop, target, src_kps [K, 2], trg_kps [K, 2], trg box) or None if too few keypoints."""
    h0, w0 = src_full.shape[:2]
    hs, ws = int(rng.integers(int(0.7 * h0), h0 + 1)), int(rng.integers(int(0.8 * w0), w0 + 1))
    y0, x0 = int(rng.integers(0, h0 - hs + 1)), int(rng.integers(0, w0 - ws + 1))
    src = np.ascontiguousarray(src_full[y0:y0 + hs, x0:x0 + ws])
    wt, ht = int(rng.integers(200, 289)), int(rng.integers(180, 257))
    for _ in range(10):
        hm = _homography(ws, hs, wt, ht, rng)
        mask = np.zeros((hs, ws), np.uint8)
        mask[8:-8, 8:-8] = 255
        gray = cv2.cvtColor(src, cv2.COLOR_RGB2GRAY)
        c = cv2.goodFeaturesToTrack(gray, maxCorners=60, qualityLevel=0.01, minDistance=12, mask=mask)
        if c is None:
            return None
        kps = c.reshape(-1, 2).astype(np.float64).round()
        t = _apply(hm, kps)
        inside = (t[:, 0] >= 4) & (t[:, 0] <= wt - 5) & (t[:, 1] >= 4) & (t[:, 1] <= ht - 5)
        if inside.sum() >= min(n_kps, 6):
            break
    else:
        return None
    idx = rng.permutation(np.flatnonzero(inside))[:n_kps]
    back = cv2.resize(bg, (wt, ht), interpolation=cv2.INTER_AREA if bg.shape[1] >= wt else cv2.INTER_LINEAR)
    warped = cv2.warpPerspective(src, hm, (wt, ht), flags=cv2.INTER_LINEAR)
    alpha = cv2.warpPerspective(np.ones((hs, ws), np.float32), hm, (wt, ht), flags=cv2.INTER_LINEAR)[..., None]
    trg = _photometric((warped * alpha + back * (1 - alpha) + 0.5).clip(0, 255).astype(np.uint8), rng)
    corners = _apply(hm, np.array([[-0.5, -0.5], [ws - 0.5, -0.5], [ws - 0.5, hs - 0.5], [-0.5, hs - 0.5]]))
    box = [int(np.clip(np.floor(corners[:, 0].min()), 0, wt - 1)), int(np.clip(np.floor(corners[:, 1].min()), 0, ht - 1)),
           int(np.clip(np.ceil(corners[:, 0].max()), 0, wt - 1)), int(np.clip(np.ceil(corners[:, 1].max()), 0, ht - 1))]
    return src, trg, kps[idx], t[idx], box


def build(out: Path, data: Path, seed: int = 0, small: bool = False) -> str:
    """Write the set under ``out`` (its JPEGImages/ and PairAnnotation/ are replaced) from ``data``
    (the shared data folder holding imagenette/val.parquet); returns ``"spair:OUT"``."""
    out, data = Path(out), Path(data)
    n_cat, per_cat, n_kps = (3, 2, 8) if small else (10, 10, 10)  # n_kps: the mean; 7-13 per pair
    for sub in ("JPEGImages", "PairAnnotation"):
        shutil.rmtree(out / sub, ignore_errors=True)
    ann = out / "PairAnnotation" / "test"
    ann.mkdir(parents=True)
    imgs, labels, names = _imagenette(data)
    rng = np.random.default_rng(seed)
    n = 0
    for c in range(min(n_cat, len(names))):
        cat = names[c]
        (out / "JPEGImages" / cat).mkdir(parents=True, exist_ok=True)
        made = 0
        for i in rng.permutation(np.flatnonzero(labels == c)):
            if made == per_cat:
                break
            src_full = decode_image(imgs[int(i)])
            bg = decode_image(imgs[int(rng.choice(np.flatnonzero(labels != c)))])
            if src_full is None or bg is None:
                continue
            got = _pair(src_full, bg, rng, n_kps if small else int(rng.integers(7, 14)))
            if got is None:
                continue
            src, trg, sk, tk, tbox = got
            s_name, t_name = f"{cat}_{int(i):04d}", f"{cat}_{int(i):04d}_warp"
            _jpeg(src, out / "JPEGImages" / cat / f"{s_name}.jpg", 95)
            _jpeg(trg, out / "JPEGImages" / cat / f"{t_name}.jpg", 90)
            n += 1
            fname = f"{n:06d}-{s_name}-{t_name}:{cat}"
            rec = {"filename": fname, "src_imname": f"{s_name}.jpg", "trg_imname": f"{t_name}.jpg",
                   "src_imsize": [src.shape[1], src.shape[0], 3], "trg_imsize": [trg.shape[1], trg.shape[0], 3],
                   "src_bndbox": [0, 0, src.shape[1] - 1, src.shape[0] - 1], "trg_bndbox": tbox, "category": cat,
                   "src_pose": 0, "trg_pose": 0, "src_trunc": 0, "trg_trunc": 0, "src_occl": 0, "trg_occl": 0,
                   "src_kps": np.round(sk, 3).tolist(), "trg_kps": np.round(tk, 3).tolist(),
                   "kps_ids": [str(k) for k in range(len(sk))], "viewpoint_variation": 0, "scale_variation": 0,
                   "truncation": 0, "occlusion": 0, "mirror": 0}
            (ann / f"{fname}.json").write_text(json.dumps(rec))
            made += 1
    return f"spair:{out}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small", action="store_true")
    a = ap.parse_args()
    print(build(a.out, a.data, a.seed, a.small))


if __name__ == "__main__":
    main()
