"""Report pictures of retrieval: one row per query, the query (as searched: cropped to its box when the
queries are cropped; blue border) then its best ``top`` database images, each framed green (positive),
red (negative) or grey (junk). PNG via Pillow."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GREEN, RED, GREY, BLUE, WHITE = (30, 200, 60), (225, 35, 35), (150, 150, 150), (40, 110, 240), (255, 255, 255)


def _tile(img: np.ndarray | None, size: int, colour: tuple[int, int, int], border: int) -> Image.Image:
    """``img`` fitted in a ``size`` square (aspect kept, white margin) inside a ``border``-px frame."""
    tile = Image.new("RGB", (size, size), colour)
    inner = size - 2 * border
    ImageDraw.Draw(tile).rectangle([border, border, size - border - 1, size - border - 1], fill=WHITE)
    if img is None:  # unreadable: a crossed-out tile
        ImageDraw.Draw(tile).line([border, border, size - border, size - border], fill=RED, width=2)
        return tile
    h, w = img.shape[:2]
    s = inner / max(h, w)
    im = Image.fromarray(img).resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR)
    tile.paste(im, (border + (inner - im.width) // 2, border + (inner - im.height) // 2))
    return tile


def label_colour(db_index: int, positives: set[int], junk: set[int]) -> tuple[int, int, int]:
    """Green for a positive, grey for junk, red otherwise."""
    return GREEN if db_index in positives else GREY if db_index in junk else RED


def top_grid(query_image: Callable[[int], np.ndarray | None], db_image: Callable[[int], np.ndarray | None],
             ranks: np.ndarray, gnd: Sequence[dict], which: Sequence[int], path: str | Path, top: int = 5,
             size: int = 128, border: int = 5, gap: int = 4) -> Path:
    """Write the grid of queries ``which`` (``ranks`` [n_db, n_q]; ``gnd[q]`` with ``ok`` and ``junk``) and
    return its path; images come from ``query_image(q)`` / ``db_image(i)`` (uint8 [H, W, 3] or None)."""
    top = min(top, ranks.shape[0])
    width = (top + 1) * size + top * gap + 2 * gap
    canvas = Image.new("RGB", (width, len(which) * (size + gap) + gap), (0, 0, 0))
    for row, q in enumerate(which):
        y = gap + row * (size + gap)
        canvas.paste(_tile(query_image(q), size, BLUE, border), (0, y))
        pos, junk = set(int(i) for i in gnd[q]["ok"]), set(int(i) for i in gnd[q].get("junk", []))
        for k in range(top):
            d = int(ranks[k, q])
            x = size + 2 * gap + k * (size + gap)
            canvas.paste(_tile(db_image(d), size, label_colour(d, pos, junk), border), (x, y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def pick_queries(gnd: Sequence[dict], n: int) -> list[int]:
    """``n`` queries with positives, evenly spread over the query list."""
    scored = [q for q, g in enumerate(gnd) if len(g["ok"])]
    if n <= 0 or not scored:
        return []
    idx = np.linspace(0, len(scored) - 1, min(n, len(scored))).round().astype(int)
    return [scored[i] for i in sorted(set(idx.tolist()))]
