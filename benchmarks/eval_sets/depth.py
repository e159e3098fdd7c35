"""Measurement set of ``fovea eval depth``: NYU-layout rooms with exact depth, ray cast in numpy.

Each room is a box (floor, ceiling, back and side walls; 4.5-9 m deep, 4-7 m wide, 2.6-3.2 m high) holding
2-5 boxes (0.3-1.6 m, turned about the vertical axis, standing on the floor), every surface textured with an
Imagenette image (tiled, 0.8-2 m per copy; train rooms from the train parquet, test rooms from the validation
parquet, so test textures are unseen) and shaded by a directional light. A pinhole camera (NYU's focal
length scaled to 160 px wide: 518.8579 / 4; principal point at the image centre) at 1.2-1.8 m height, pitched
down 5-20 degrees and turned up to 25 degrees, views each room several times. RGB = the mean of 2x2 rays per
pixel (JPEG, quality 95); depth = the exact z-depth of the pixel-centre ray, in millimetres (16-bit PNG),
with 0-3 small rectangles of missing depth (0) as in NYU's labels. Lists as BTS / ZoeDepth write them:
``OUT/nyu_train.txt`` / ``OUT/nyu_test.txt`` lines ``/train/room_003/rgb_00012.jpg
/train/room_003/sync_depth_00012.png 129.7145``.

Default: 120x160 images, 25 train rooms x 8 views = 200 train, 10 test rooms x 5 views = 50 test;
``small``: 3 x 4 train, 2 x 3 test.

    .venv/bin/python benchmarks/eval_sets/depth.py /work/eval_sets/depth
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import cv2
import numpy as np

from fovea.data.decode import decode_image

H, W = 120, 160
FOCAL = 518.8579 / 4


def _textures(data: Path, split: str, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` random decodable Imagenette images of ``split`` (uint8 [224, 224, 3]) as float32 in [0, 1]."""
    import pyarrow.parquet as pq
    col = pq.read_table(data / "imagenette" / f"{split}.parquet", columns=["image"]).column("image")
    out: list[np.ndarray] = []
    for i in rng.permutation(len(col)):
        img = decode_image(col[int(i)].as_py()["bytes"])
        if img is not None:
            out.append(img.astype(np.float32) / 255)
        if len(out) == n:
            break
    return out


def _rot_y(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rot_x(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _sample(tex: np.ndarray, u: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Tiled texture lookup (nearest) at surface coordinates u, v (metres) [N] -> RGB [N, 3]."""
    th, tw = tex.shape[:2]
    x = (np.floor(u / scale * tw).astype(np.int64)) % tw
    y = (np.floor(-v / scale * th).astype(np.int64)) % th
    return tex[y, x]


def _room(rng: np.random.Generator, textures: list[np.ndarray]) -> dict:
    """A random room: half width, depth, height, boxes (centre x, z, half sizes, yaw), a texture per surface."""
    wx, zb, hc = rng.uniform(2.0, 3.5), rng.uniform(4.5, 9.0), rng.uniform(2.6, 3.2)
    boxes = []
    for _ in range(int(rng.integers(2, 6))):
        half = rng.uniform(0.15, 0.8, 3)
        boxes.append({"c": np.array([rng.uniform(-wx + 0.8, wx - 0.8), half[1], rng.uniform(2.0, zb - 0.8)]),
                      "half": half, "yaw": rng.uniform(0, np.pi / 2),
                      "tex": textures[int(rng.integers(len(textures)))], "scale": rng.uniform(0.4, 1.0)})
    surf = [(textures[int(rng.integers(len(textures)))], rng.uniform(0.8, 2.0)) for _ in range(5)]
    return {"wx": wx, "zb": zb, "hc": hc, "boxes": boxes, "surf": surf, "light": np.array([0.3, 0.8, -0.5])}


def _cast(room: dict, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rays o [3] + t d [N, 3] (d with camera z component 1, so t = z-depth) -> (t [N], RGB [N, 3])."""
    n = d.shape[0]
    best = np.full(n, np.inf)
    rgb = np.zeros((n, 3))
    planes = [(1, 0.0, np.array([0, 1, 0])), (1, room["hc"], np.array([0, -1, 0])),
              (2, room["zb"], np.array([0, 0, -1])), (0, -room["wx"], np.array([1, 0, 0])),
              (0, room["wx"], np.array([-1, 0, 0]))]
    for (axis, c, nrm), (tex, scale) in zip(planes, room["surf"]):
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (c - o[axis]) / d[:, axis]
        hit = (t > 1e-6) & (t < best)
        p = o + t[hit, None] * d[hit]
        a, b = {0: (2, 1), 1: (0, 2), 2: (0, 1)}[axis]  # texture axes: horizontal, vertical (floor: x, -z)
        shade = 0.55 + 0.45 * abs(float(nrm @ room["light"])) / np.linalg.norm(room["light"])
        best[hit] = t[hit]
        rgb[hit] = _sample(tex, p[:, a], p[:, b] if axis != 1 else -p[:, b], scale) * shade
    for bx in room["boxes"]:
        r = _rot_y(-bx["yaw"])
        ol, dl = r @ (o - bx["c"]), d @ r.T
        with np.errstate(divide="ignore", invalid="ignore"):
            t1, t2 = (-bx["half"] - ol) / dl, (bx["half"] - ol) / dl
        tn, tf = np.minimum(t1, t2), np.maximum(t1, t2)
        t_near, t_far, face = tn.max(1), tf.min(1), tn.argmax(1)
        hit = (t_near < t_far) & (t_near > 1e-6) & (t_near < best)
        p = ol + t_near[hit, None] * dl[hit]
        f = face[hit]
        u = np.where(f == 0, p[:, 2], p[:, 0])
        v = np.where(f == 1, p[:, 2], p[:, 1])
        nrm_l = np.eye(3)[f] * np.sign(-dl[hit][np.arange(len(f)), f])[:, None]
        nw = nrm_l @ r  # back to world
        shade = 0.5 + 0.5 * np.abs(nw @ room["light"]) / np.linalg.norm(room["light"])
        best[hit] = t_near[hit]
        rgb[hit] = _sample(bx["tex"], u, v, bx["scale"]) * shade[:, None]
    return best, rgb


def render(room: dict, rng: np.random.Generator, h: int = H, w: int = W, focal: float = FOCAL
           ) -> tuple[np.ndarray, np.ndarray]:
    """One view of ``room`` from a random pose -> (RGB uint8 [h, w, 3], depth uint16 [h, w] mm)."""
    o = np.array([rng.uniform(-room["wx"] + 0.5, room["wx"] - 0.5), rng.uniform(1.2, 1.8), rng.uniform(0.0, 0.8)])
    rot = _rot_y(rng.uniform(-0.45, 0.45)) @ _rot_x(np.deg2rad(rng.uniform(5, 20)))  # looks down
    cx, cy = w / 2, h / 2
    f = focal * w / W

    def rays(offsets: list[tuple[float, float]]) -> np.ndarray:
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
        out = []
        for dy, dx in offsets:
            dc = np.stack([(xs + dx - cx) / f, -(ys + dy - cy) / f, np.ones_like(xs)], -1).reshape(-1, 3)
            out.append(dc @ rot.T)
        return np.concatenate(out)

    t, _ = _cast(room, o, rays([(0.5, 0.5)]))
    _, rgb = _cast(room, o, rays([(0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75)]))
    img = rgb.reshape(4, h, w, 3).mean(0)
    img = np.clip(img * rng.uniform(0.8, 1.15) + rng.normal(0, 0.01, img.shape), 0, 1)
    depth = np.clip(np.round(t.reshape(h, w) * 1000), 0, 65535).astype(np.uint16)
    for _ in range(int(rng.integers(0, 4))):
        y0, x0 = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
        depth[y0:y0 + int(rng.integers(2, 8)), x0:x0 + int(rng.integers(2, 8))] = 0
    return (img * 255 + 0.5).astype(np.uint8), depth


def build(out: Path, data: Path, seed: int = 0, small: bool = False) -> str:
    """Write the set under ``out`` (replaced) and return its ``--data`` spec ``nyu:OUT``."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    plan = {"train": (3, 4) if small else (25, 8), "test": (2, 3) if small else (10, 5)}
    for split, (rooms, views) in plan.items():
        textures = _textures(Path(data), "train" if split == "train" else "val", 12 if small else 80, rng)
        lines = []
        for r in range(rooms):
            room = _room(rng, textures)
            folder = out / split / f"room_{r:03d}"
            folder.mkdir(parents=True)
            for v in range(views):
                img, depth = render(room, rng)
                cv2.imwrite(str(folder / f"rgb_{v:05d}.jpg"), img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
                cv2.imwrite(str(folder / f"sync_depth_{v:05d}.png"), depth)
                rel = f"/{split}/room_{r:03d}"
                lines.append(f"{rel}/rgb_{v:05d}.jpg {rel}/sync_depth_{v:05d}.png {FOCAL:.4f}")
        (out / f"nyu_{split}.txt").write_text("\n".join(lines) + "\n")
    return f"nyu:{out}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[3] / "shared" / "data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small", action="store_true")
    a = ap.parse_args()
    print(build(a.out, a.data, a.seed, a.small))


if __name__ == "__main__":
    main()
