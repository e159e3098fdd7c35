"""The Pillow line chart: round ticks that cover the data, and curves drawn where their values are."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from fovea.eval.chart import PALETTE, line_chart, nice_ticks


def test_nice_ticks_are_round_and_cover_the_range() -> None:
    assert nice_ticks(0, 25) == [0, 5, 10, 15, 20, 25]
    assert nice_ticks(28.5, 46.8) == [25, 30, 35, 40, 45, 50]
    for lo, hi in ((0.0, 0.1), (3.3, 7.9), (-12.0, 130.0), (64.0, 64.0)):
        t = nice_ticks(lo, hi)
        assert t[0] <= lo and t[-1] >= hi and 2 <= len(t) <= 12
        steps = {round(b - a, 9) for a, b in zip(t, t[1:])}
        assert len(steps) == 1  # evenly spaced


def test_line_chart_draws_each_series_at_its_values(tmp_path: Path) -> None:
    path = line_chart({"a": ([0, 10], [20, 40]), "b": ([0, 10], [40, 20])}, tmp_path / "c.png",
                      hlines={"raw": 30.0}, size=(900, 560))
    img = Image.open(path).convert("RGB")
    assert img.size == (900, 560)
    # plot area: x 70..670 for 0..10, y 500..40 for the y ticks' range (the data +-1: 15..45)
    assert nice_ticks(19, 41) == [15, 20, 25, 30, 35, 40, 45]

    def colour_at(x: float, y: float) -> str:
        return "#%02x%02x%02x" % img.getpixel((round(70 + x / 10 * 600), round(500 - (y - 15) / 30 * 460)))
    assert colour_at(2.5, 25) == PALETTE[0]  # a quarter of the way along "a"
    assert colour_at(2.5, 35) == PALETTE[1]  # and along "b"
    assert colour_at(5, 30) != "#ffffff"  # the lines cross on the dashed reference line
    assert colour_at(2.5, 40) == "#ffffff"  # nothing drawn elsewhere
    # the legend (right of the plot, from y = 40 + 40): the reference line first, then one row per series
    legend = ["#%02x%02x%02x" % img.getpixel((900 - 230 + 10 + 3, 80 + 20 * i)) for i in range(3)]
    assert legend == ["#555555", PALETTE[0], PALETTE[1]]
