"""Measurement set of ``fovea eval video``: DAVIS-2017-layout sequences with exact masks.

Each sequence shows 1-3 objects over a textured background: every object is a smooth random blob
(radius r(a) = R (1 + sum_k c_k cos(k a + p_k)), k = 2..4) cut from an Imagenette validation image,
moving along a line plus a slow sinusoid, scaling by up to +-25 % and turning slowly; the objects are
drawn in a fixed depth order, so they occlude each other as their paths cross (the later one in front).
The background is another Imagenette image, enlarged, that the camera pans across. Each object is
warped with its mask by the same affine map (cv2.warpAffine, mask thresholded at 0.5) and pasted with
that binary mask, so the label map (painted in the same depth order) is exact. Every object covers at
least 1.5 % of frame 0. Frames: JPEG quality 90; masks: palette PNGs with the DAVIS palette, 0 =
background, 1..n = objects; all frames annotated, as DAVIS-2017 val.

Layout: ``OUT/JPEGImages/480p/<seq>/00000.jpg``, ``OUT/Annotations/480p/<seq>/00000.png``,
``OUT/ImageSets/2017/val.txt`` (the folder name 480p is the layout's; the frames are 240x432).

Default: 5 sequences (1, 2, 3, 2, 3 objects) of 40 frames, 240x432; ``small``: 2 sequences (1 and 2
objects) of 8 frames, 64x112. Evaluate with ``--short-side`` = the frame height (240 or 64).

    .venv/bin/python benchmarks/eval_sets/video.py /work/eval_sets/video
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import cv2
import numpy as np

from fovea.data.decode import decode_image
from fovea.eval.video.data import default_palette, write_mask


def _images(data: Path, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` random decodable Imagenette validation images (uint8 [224, 224, 3]) of distinct rows."""
    import pyarrow.parquet as pq
    col = pq.read_table(data / "imagenette" / "val.parquet", columns=["image"]).column("image")
    out: list[np.ndarray] = []
    for i in rng.permutation(len(col)):
        img = decode_image(col[int(i)].as_py()["bytes"])
        if img is not None:
            out.append(img)
        if len(out) == n:
            break
    return out


def _blob(size: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random star-shaped blob, float32 [size, size] in {0, 1}, centred, radius ~0.38 size."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - (size - 1) / 2
    ang, rad = np.arctan2(yy, xx), np.hypot(yy, xx)
    r = np.ones_like(ang)
    for k in (2, 3, 4):
        r += rng.uniform(0.0, 0.3 / k * 2) * np.cos(k * ang + rng.uniform(0, 2 * np.pi))
    return (rad <= 0.38 * size * r / r.max() * 1.15).astype(np.float32)


def _sequence(rng: np.random.Generator, imgs: list[np.ndarray], n_obj: int, n_frames: int, hw: tuple[int, int]
              ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Frames uint8 [H, W, 3] and label maps uint8 [H, W] of one sequence (imgs[0] = background)."""
    h, w = hw
    pan = (int(0.2 * h), int(0.25 * w))
    bg = cv2.resize(imgs[0], (w + pan[1], h + pan[0]), interpolation=cv2.INTER_CUBIC)
    objs = []
    side = imgs[1].shape[0]
    for k in range(n_obj):
        # start spread over the width, moving across so the paths cross
        x0 = w * (k + 0.5) / n_obj + rng.uniform(-0.05, 0.05) * w
        y0 = h * rng.uniform(0.35, 0.65)
        vx = rng.uniform(0.3, 0.6) * w / n_frames * (1 if x0 < w / 2 else -1)
        vy = rng.uniform(-0.15, 0.15) * h / n_frames
        objs.append({"img": imgs[1 + k], "mask": _blob(side, rng), "x0": x0, "y0": y0, "vx": vx, "vy": vy,
                     "scale": rng.uniform(0.7, 0.85) * h / side / (1 + 0.15 * (n_obj - 1)),
                     "amp": rng.uniform(0.05, 0.1) * h, "per": rng.uniform(0.6, 1.2) * n_frames,
                     "ph": rng.uniform(0, 2 * np.pi), "rot": rng.uniform(-1.0, 1.0), "rot0": rng.uniform(-20, 20),
                     "sc_ph": rng.uniform(0, 2 * np.pi)})
    frames, labels = [], []
    for t in range(n_frames):
        oy, ox = int(round(pan[0] * t / max(1, n_frames - 1))), int(round(pan[1] * t / max(1, n_frames - 1)))
        frame = bg[oy:oy + h, ox:ox + w].copy()
        lab = np.zeros((h, w), np.uint8)
        for k, o in enumerate(objs):
            s = o["scale"] * (1 + 0.25 * np.sin(2 * np.pi * t / n_frames + o["sc_ph"]))
            cx = o["x0"] + o["vx"] * t
            cy = o["y0"] + o["vy"] * t + o["amp"] * np.sin(2 * np.pi * t / o["per"] + o["ph"])
            m = cv2.getRotationMatrix2D(((side - 1) / 2, (side - 1) / 2), o["rot0"] + o["rot"] * t, s)
            m[:, 2] += (cx - (side - 1) / 2, cy - (side - 1) / 2)
            rgb = cv2.warpAffine(o["img"], m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            inside = cv2.warpAffine(o["mask"], m, (w, h), flags=cv2.INTER_LINEAR) > 0.5
            frame[inside] = rgb[inside]
            lab[inside] = k + 1
        frames.append(frame)
        labels.append(lab)
    return frames, labels


def build(out: Path, data: Path, seed: int = 0, small: bool = False) -> str:
    """Write the set under ``out`` (replacing it) from ``data`` (the shared data folder) -> ``davis:OUT``."""
    out, data = Path(out), Path(data)
    counts = [1, 2] if small else [1, 2, 3, 2, 3]
    n_frames, hw = (8, (64, 112)) if small else (40, (240, 432))
    rng = np.random.default_rng(seed)
    imgs = _images(data, sum(counts) + len(counts), rng)
    if out.exists():
        shutil.rmtree(out)
    names, i = [], 0
    for si, n_obj in enumerate(counts):
        for _ in range(20):  # redraw until every object is visible enough in frame 0
            frames, labels = _sequence(rng, imgs[i:i + 1 + n_obj], n_obj, n_frames, hw)
            area = [(labels[0] == k).mean() for k in range(1, n_obj + 1)]
            if min(area) >= 0.015:
                break
        else:
            raise RuntimeError(f"sequence {si}: an object stays hidden in frame 0")
        i += 1 + n_obj
        name = f"synth{si:02d}"
        names.append(name)
        fdir, adir = out / "JPEGImages" / "480p" / name, out / "Annotations" / "480p" / name
        fdir.mkdir(parents=True)
        for t, (f, lab) in enumerate(zip(frames, labels)):
            cv2.imwrite(str(fdir / f"{t:05d}.jpg"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
            write_mask(adir / f"{t:05d}.png", lab, default_palette())
    (out / "ImageSets" / "2017").mkdir(parents=True)
    (out / "ImageSets" / "2017" / "val.txt").write_text("\n".join(names) + "\n")
    return f"davis:{out}"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small", action="store_true")
    a = ap.parse_args()
    print(build(a.out, a.data, a.seed, a.small))
