"""A small line chart drawn with Pillow (no plotting library needed): curves over one x axis, dashed
horizontal reference lines, axis ticks and a legend. Used for the quality-per-minute curves."""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


def nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    """About ``n`` round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks = [round(first, 10)]
    while ticks[-1] < hi - 1e-9 * step:  # the last tick is at or above hi
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def line_chart(series: dict[str, tuple[list[float], list[float]]], path: str | Path, *, title: str = "",
               xlabel: str = "", ylabel: str = "", hlines: dict[str, float] | None = None,
               size: tuple[int, int] = (900, 560)) -> Path:
    """Write a PNG with one polyline (and markers) per ``series`` entry ``name -> (xs, ys)`` and a dashed line per
    ``hlines`` entry ``label -> y``; returns the path."""
    hlines = hlines or {}
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=12)
    left, right, top, bottom = 70, 230, 40, 60
    xs = [x for s in series.values() for x in s[0]] or [0.0, 1.0]
    ys = [y for s in series.values() for y in s[1]] + list(hlines.values()) or [0.0, 1.0]
    xt, yt = nice_ticks(min(0.0, min(xs)), max(xs)), nice_ticks(min(ys) - 1, max(ys) + 1)
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0 or 1) * (w - left - right),
                h - bottom - (y - y0) / (y1 - y0 or 1) * (h - top - bottom))

    for t in xt:  # grid and ticks
        a, b = px(t, y0), px(t, y1)
        d.line([a, b], fill="#e6e6e6")
        d.text((a[0], a[1] + 6), f"{t:g}", fill="black", font=small, anchor="mt")
    for t in yt:
        a, b = px(x0, t), px(x1, t)
        d.line([a, b], fill="#e6e6e6")
        d.text((a[0] - 6, a[1]), f"{t:g}", fill="black", font=small, anchor="rm")
    d.rectangle([px(x0, y1), px(x1, y0)], outline="black")
    d.text((w / 2 - right / 2 + left / 2, h - 20), xlabel, fill="black", font=font, anchor="mm")
    d.text((10, top - 25), ylabel, fill="black", font=font)
    d.text((w / 2, 12), title, fill="black", font=font, anchor="mt")
    lx = w - right + 10  # the legend: one row per reference line, then one per series

    def legend_y(row: int) -> float:
        return top + 40 + 20 * row

    for i, (label, y) in enumerate(hlines.items()):
        colour = "#555555"
        a, b = px(x0, y), px(x1, y)
        n = max(int((b[0] - a[0]) // 12), 1)
        for k in range(n):  # dashed
            d.line([(a[0] + k * 12, a[1]), (min(a[0] + k * 12 + 7, b[0]), a[1])], fill=colour, width=2)
        ly = legend_y(i)  # labelled in the legend: a label at the line's own height would fall on its entries
        for k in range(2):
            d.line([(lx + k * 12, ly), (lx + k * 12 + 7, ly)], fill=colour, width=2)
        d.text((lx + 28, ly), f"{label} {y:.1f}", fill=colour, font=small, anchor="lm")
    for i, (name, (sx, sy)) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        pts = [px(x, y) for x, y in zip(sx, sy)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=3)
        for p in pts:
            d.ellipse([p[0] - 4, p[1] - 4, p[0] + 4, p[1] + 4], fill=colour)
        ly = legend_y(len(hlines) + i)
        d.line([(lx, ly), (lx + 22, ly)], fill=colour, width=3)
        d.text((lx + 28, ly), name, fill="black", font=small, anchor="lm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
