"""The matcher: pixel-centre coordinate mapping, bilinear upsampling, banded argmax, known answers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fovea.eval.correspondence import match as M
from fovea.eval.correspondence.match import (best_cells, cell_index, dense_rows, match_points, pixel_features,
                                             rescale_points, resize_square, sample_cells)


def test_rescale_points_pixel_centres_by_hand_and_round_trip() -> None:
    # W = 4 -> 8 (x2), H = 3 -> 6: centre of pixel 0 (x = 0) lands at 0.5, the left edge (-0.5) stays the edge
    p = rescale_points(np.array([[0.0, 0.0], [3.0, 2.0], [-0.5, -0.5], [1.25, 1.0]]), (4, 3), (8, 6))
    np.testing.assert_allclose(p, [[0.5, 0.5], [6.5, 4.5], [-0.5, -0.5], [3.0, 2.5]])
    # non-square original to a square: x and y scale differently
    q = rescale_points(np.array([[99.5, 39.5]]), (200, 80), (64, 64))
    np.testing.assert_allclose(q, [[31.5, 31.5]])  # the image centre goes to the centre
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.5, 300, (20, 2))
    np.testing.assert_allclose(rescale_points(rescale_points(x, (301, 177), (224, 224)), (224, 224), (301, 177)), x)


def test_cell_index_holds_the_point_and_clamps() -> None:
    idx = cell_index(np.array([[-0.6, 0.0], [0.49, 0.5], [0.5, 2.51], [3.7, 9.0]]), (4, 3))
    assert idx.tolist() == [[0, 0], [0, 1], [1, 2], [3, 2]]


@pytest.mark.parametrize("wh,size,sigma", [((40, 24), 96, 2.0), ((200, 120), 64, 9.0)])
def test_convention_is_the_one_of_cv2_resize(wh: tuple[int, int], size: int, sigma: float) -> None:
    # a smooth blob centred at a known point of a non-square image; after resize_square (bilinear when
    # enlarging, area when shrinking) its centroid is where rescale_points says
    w, h = wh
    c = np.array([0.37 * w, 0.58 * h])
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.exp(-((xx - c[0]) ** 2 + (yy - c[1]) ** 2) / (2 * sigma ** 2))
    u8 = np.repeat((img * 255).round().astype(np.uint8)[..., None], 3, axis=2)
    r = resize_square(u8, size)[..., 0].astype(np.float64)
    ry, rx = np.mgrid[0:size, 0:size]
    got = np.array([(r * rx).sum() / r.sum(), (r * ry).sum() / r.sum()])
    np.testing.assert_allclose(got, rescale_points(c[None], (w, h), (size, size))[0], atol=0.06)


def _bilinear64(m: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """float64 upsampling [D, h, w] -> [D, out_h, out_w], align_corners=False with edge clamping, by loops."""
    d, h, w = m.shape
    out = np.zeros((d, out_h, out_w))
    for i in range(out_h):
        sy = min(max((i + 0.5) * h / out_h - 0.5, 0.0), h - 1)
        y0 = int(np.floor(sy)); y1 = min(y0 + 1, h - 1); fy = sy - y0
        for j in range(out_w):
            sx = min(max((j + 0.5) * w / out_w - 0.5, 0.0), w - 1)
            x0 = int(np.floor(sx)); x1 = min(x0 + 1, w - 1); fx = sx - x0
            out[:, i, j] = ((1 - fy) * ((1 - fx) * m[:, y0, x0] + fx * m[:, y0, x1])
                            + fy * ((1 - fx) * m[:, y1, x0] + fx * m[:, y1, x1]))
    return out


def test_dense_rows_and_sample_cells_are_bilinear_upsampling() -> None:
    m = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(0))
    ref = _bilinear64(m.double().numpy(), 20, 15)
    np.testing.assert_allclose(dense_rows(m, (20, 15), 0, 15).numpy(), ref, atol=1e-5)  # whole map
    np.testing.assert_allclose(dense_rows(m, (20, 15), 4, 9).numpy(), ref[:, 4:9], atol=1e-5)  # one band
    idx = torch.tensor([[0, 0], [19, 14], [7, 3], [10, 11]])
    np.testing.assert_allclose(sample_cells(m, idx, (20, 15)).numpy(), ref[:, idx[:, 1], idx[:, 0]].T, atol=1e-5)
    np.testing.assert_array_equal(sample_cells(m, idx[:2] // 5, (4, 3)).numpy(), m[:, [0, 2], [0, 3]].T.numpy())


def test_best_cells_matches_a_brute_force_argmax_in_bands(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    m, q = torch.randn(6, 4, 5, generator=g), F.normalize(torch.randn(7, 6, generator=g), dim=1)
    full = _bilinear64(m.double().numpy(), 23, 17).reshape(6, -1)
    sim = q.double().numpy() @ (full / np.linalg.norm(full, axis=0))
    want = sim.argmax(1)
    bands: list[int] = []
    real = M.dense_rows
    monkeypatch.setattr(M, "dense_rows", lambda f, o, a, b: (bands.append(b - a), real(f, o, a, b))[1])
    cells, best = best_cells(q, m, (23, 17), max_elems=3 * 23 * 6)  # at most 3 rows of 23 x 6 values at once
    assert max(bands) == 3 and sum(bands) == 17
    assert (cells[:, 1] * 23 + cells[:, 0]).tolist() == want.tolist()
    np.testing.assert_allclose(best.numpy(), sim.max(1), atol=1e-5)


def test_matcher_patch_resolution_flipped_copy_known_answer() -> None:
    # target map = the source map mirrored left-right; images of different non-square original sizes
    src = torch.randn(16, 6, 8, generator=torch.Generator().manual_seed(2))
    trg = src.flip(2)
    kps = np.array([[3.0, 4.0], [41.0, 27.0], [79.0, 59.0], [55.2, 12.9]])  # in an 80 x 60 source
    pred, sim = match_points(src, trg, kps, (80, 60), (160, 90), (8, 6))
    cells = cell_index(rescale_points(kps, (80, 60), (8, 6)), (8, 6))
    want_cells = np.stack([7 - cells[:, 0], cells[:, 1]], 1).astype(np.float64)
    np.testing.assert_allclose(pred, rescale_points(want_cells, (8, 6), (160, 90)))
    np.testing.assert_allclose(sim, 1.0, atol=1e-5)
    # by hand: source (3, 4) is in cell (0, 0) -> target cell (7, 0), centre (7.5 * 20 - 0.5, 0.5 * 15 - 0.5)
    assert pred[0].tolist() == [149.5, 7.0]


def test_matcher_pixel_resolution_flipped_and_shifted_copies() -> None:
    src = torch.randn(12, 8, 8, generator=torch.Generator().manual_seed(3))
    kps = np.array([[30.0, 20.0], [50.0, 33.0], [61.0, 44.0]])  # in a 100 x 70 source, matched at 32 x 32
    s_idx = cell_index(rescale_points(kps, (100, 70), (32, 32)), (32, 32)).astype(np.float64)
    # mirrored: bilinear upsampling commutes with the flip, pixel j -> 31 - j
    pred, sim = match_points(src, src.flip(2), kps, (100, 70), (50, 140), (32, 32))
    want = np.stack([31 - s_idx[:, 0], s_idx[:, 1]], 1)
    np.testing.assert_allclose(pred, rescale_points(want, (32, 32), (50, 140)))
    np.testing.assert_allclose(sim, 1.0, atol=1e-5)
    # shifted 2 cells (= 8 px at 32) to the right and 1 cell (4 px) down; keypoints away from the borders
    pred, _ = match_points(src, torch.roll(src, (1, 2), (1, 2)), kps, (100, 70), (100, 70), (32, 32))
    np.testing.assert_allclose(pred, rescale_points(s_idx + [8, 4], (32, 32), (100, 70)))


def test_pixel_features_are_mean_subtracted_neighbourhoods() -> None:
    x = torch.randn(2, 3, 10, 12, generator=torch.Generator().manual_seed(4))
    f = pixel_features(x, 3)
    assert f.shape == (2, 27, 10, 12)
    want = x[1, :, 3:6, 4:7].reshape(3, 9)  # the 3 x 3 neighbourhood of pixel (row 4, col 5)
    want = want - want.mean(1, keepdim=True)
    torch.testing.assert_close(f[1, :, 4, 5], want.reshape(-1))
    assert f.reshape(2, 3, 9, 10, 12).mean(2).abs().max() < 1e-6
    torch.testing.assert_close(pixel_features(x, 1), torch.zeros(2, 3, 10, 12))  # 1 px: nothing left after the mean
