"""``crops.augment=batched``: the batched torch multi-crop (fovea.data.batch_augment) against the per-image
albumentations recipe it replaces.

Distributions (many draws): RandomResizedCrop boxes against albumentations' own box sampler (two-sample KS),
flip / jitter / grey / blur / solarize rates per crop kind (binomial, 4.5 sigma), jitter factors, blur sigma
and op order against their uniform laws. Pixels (fixed parameters, random images): the resize and every
colour op against cv2 / albumentations' functional code. Determinism, shared Gram boxes, and that the canvas
padding never reaches a crop. The canvas dataset and collate, and the stepper wiring.
"""
from __future__ import annotations

import itertools
import math

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from albumentations.augmentations.blur import functional as fblur
from albumentations.augmentations.pixel import functional as fpixel
from helpers import JEPA_TINY, TINY_MODEL
from scipy import stats

from fovea.data import batch_augment as ba
from fovea.data.augment import CropsConfig
from fovea.data.base import ImageSource

P_MIN = 1e-3  # KS tests: reject below this p-value (the draws are fixed, so a pass is not luck-dependent)
SIGMAS = 4.5  # binomial rate checks: |count - n p| <= 4.5 sqrt(n p (1 - p))


def keys_of(n: int, epoch: int = 0, start: int = 0) -> torch.Tensor:
    return torch.stack([torch.full((n,), epoch, dtype=torch.int64), torch.arange(start, start + n)], dim=1)


def within_binomial(count: int, n: int, p: float) -> bool:
    if p in (0.0, 1.0):
        return count == round(n * p)
    return abs(count - n * p) <= SIGMAS * math.sqrt(n * p * (1 - p))


def hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------------------------------ random numbers

def test_splitmix64_matches_the_reference_on_int64_edges() -> None:
    mask = (1 << 64) - 1

    def ref(x: int) -> int:  # SplitMix64 on unsigned 64-bit integers
        z = (x + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    xs = [0, 1, -1, 2**62, -(2**63), 2**63 - 1, 123456789, -987654321]
    got = ba.splitmix64(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert [g & mask for g in got] == [ref(x & mask) for x in xs]


def test_uniforms_are_uniform_and_a_pure_function_of_the_key() -> None:
    n = 4000
    u = ba.uniforms(7, keys_of(n), torch.zeros(n, dtype=torch.int64))
    assert u.shape == (n, ba.N_DRAWS) and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert stats.kstest(u.flatten().numpy(), "uniform").pvalue > P_MIN
    # neighbouring draws and neighbouring images are uncorrelated
    assert abs(np.corrcoef(u[:, 0].numpy(), u[:, 1].numpy())[0, 1]) < SIGMAS / math.sqrt(n)
    assert abs(np.corrcoef(u[:-1, 0].numpy(), u[1:, 0].numpy())[0, 1]) < SIGMAS / math.sqrt(n)
    # the same (seed, epoch, index, crop) gives the same numbers in any row order; any change gives others
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    again = ba.uniforms(7, keys_of(n)[perm], torch.zeros(n, dtype=torch.int64))
    assert torch.equal(again, u[perm])
    for other in (ba.uniforms(8, keys_of(n), torch.zeros(n, dtype=torch.int64)),
                  ba.uniforms(7, keys_of(n, epoch=1), torch.zeros(n, dtype=torch.int64)),
                  ba.uniforms(7, keys_of(n), torch.ones(n, dtype=torch.int64))):
        assert not (other == u).any()  # 53-bit values: equal only when the hash inputs are
        assert abs(np.corrcoef(other.flatten().numpy(), u.flatten().numpy())[0, 1]) < SIGMAS / math.sqrt(u.numel())


# ------------------------------------------------------------------------------------------------ crop boxes

def albumentations_boxes(h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float],
                         n: int) -> np.ndarray:
    """(y0, x0, h, w) of ``n`` boxes from albumentations' own RandomResizedCrop sampler."""
    t = A.RandomResizedCrop((8, 8), scale=scale, ratio=ratio)
    out = []
    for i in range(n):
        t.set_random_seed(10_000 + i)
        x_min, y_min, x_max, y_max = t.get_params_dependent_on_data({"shape": (h, w)}, {})["crop_coords"]
        out.append((y_min, x_min, y_max - y_min, x_max - x_min))
    return np.array(out, dtype=np.float64)


@pytest.mark.parametrize("h,w,scale", [(60, 90, (0.08, 1.0)), (20, 120, (0.3, 1.0)), (64, 64, (0.05, 0.4))])
def test_crop_boxes_follow_albumentations_distribution(h: int, w: int, scale: tuple[float, float]) -> None:
    n, ratio = 10000, (3 / 4, 4 / 3)
    u = ba.uniforms(3, keys_of(n), torch.zeros(n, dtype=torch.int64))
    ours = ba.rrc_boxes(u[:, ba.D_AREA:ba.D_AREA + 10], u[:, ba.D_RATIO:ba.D_RATIO + 10], u[:, ba.D_Y],
                        u[:, ba.D_X], torch.full((n,), h), torch.full((n,), w), scale, ratio).double().numpy()
    ref = albumentations_boxes(h, w, scale, ratio, n)
    for b in (ours, ref):
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] >= 1).all() and (b[:, 3] >= 1).all()
        assert (b[:, 0] + b[:, 2] <= h).all() and (b[:, 1] + b[:, 3] <= w).all()

    def features(b: np.ndarray) -> dict[str, np.ndarray]:
        return {"area": b[:, 2] * b[:, 3] / (h * w), "log_ratio": np.log(b[:, 3] / b[:, 2]),
                "centre_y": (b[:, 0] + b[:, 2] / 2) / h, "centre_x": (b[:, 1] + b[:, 3] / 2) / w}

    fo, fr = features(ours), features(ref)
    for k in fo:
        assert stats.ks_2samp(fo[k], fr[k]).pvalue > P_MIN, k


def test_crop_box_fallback_is_the_central_crop_with_the_ratio_clamped() -> None:
    # a 10 x 200 strip: no box of area >= 90% with ratio in [3/4, 4/3] fits, every attempt fails
    n = 5
    u = ba.uniforms(0, keys_of(n), torch.zeros(n, dtype=torch.int64))
    box = ba.rrc_boxes(u[:, :10], u[:, 10:20], u[:, 20], u[:, 21], torch.full((n,), 10), torch.full((n,), 200),
                       (0.9, 1.0), (3 / 4, 4 / 3))
    w = round(10 * 4 / 3)
    assert box.tolist() == [[0, (200 - w) // 2, 10, w]] * n
    box = ba.rrc_boxes(u[:, :10], u[:, 10:20], u[:, 20], u[:, 21], torch.full((n,), 200), torch.full((n,), 10),
                       (0.9, 1.0), (3 / 4, 4 / 3))
    h = round(10 / (3 / 4))
    assert box.tolist() == [[(200 - h) // 2, 0, h, 10]] * n


# ------------------------------------------------------------------------------------------------ rates and factors

RATES = CropsConfig(global_size=16, local_size=8, n_local=3, flip_p=0.3, color_jitter_p=0.7, grayscale_p=0.25,
                    blur_p=[0.9, 0.15, 0.4], blur_sigma=[0.2, 1.7], solarize_p=0.35,
                    color_jitter=[0.4, 0.3, 0.2, 0.1])


@pytest.mark.parametrize("inverted", [False, True])
def test_operation_rates_per_crop_kind(inverted: bool) -> None:
    cfg = CropsConfig(**{**RATES.__dict__, "dinov2_inverted_blur": inverted})
    n = 4000
    g, loc = ba.BatchedMultiCrop(cfg, seed=1).params(keys_of(n), torch.full((n, 2), 32))
    assert loc is not None
    bp = cfg.effective_blur_p()
    kinds = {"global1": (g, slice(0, n), bp[0], 0.0), "global2": (g, slice(n, 2 * n), bp[1], cfg.solarize_p),
             "locals": (loc, slice(0, 3 * n), bp[2], 0.0)}
    for name, (p, rows, blur_p, sol_p) in kinds.items():
        m = rows.stop - rows.start
        for what, mask, prob in (("flip", p.flip, cfg.flip_p), ("jitter", p.jitter, cfg.color_jitter_p),
                                 ("gray", p.gray, cfg.grayscale_p), ("blur", p.blur, blur_p),
                                 ("solarize", p.solarize, sol_p)):
            count = int(mask[rows].sum())
            assert within_binomial(count, m, prob), (name, what, count, m, prob)


def test_jitter_factors_sigma_and_op_order_are_uniform() -> None:
    n = 4000
    g, _ = ba.BatchedMultiCrop(RATES, seed=2).params(keys_of(n), torch.full((n, 2), 32))
    lo, hi = ba.jitter_ranges(RATES)
    assert lo == [0.6, 0.7, 0.8, -0.1] and hi == [1.4, 1.3, 1.2, 0.1]
    for k in range(4):
        f = g.factors[:, k].numpy()
        assert f.min() >= lo[k] and f.max() <= hi[k]
        assert stats.kstest(f, "uniform", args=(lo[k], hi[k] - lo[k])).pvalue > P_MIN, k
    s0, s1 = RATES.blur_sigma
    assert stats.kstest(g.sigma.numpy(), "uniform", args=(s0, s1 - s0)).pvalue > P_MIN
    order = g.order.numpy()
    assert (np.sort(order, axis=1) == np.arange(4)).all()  # every row a permutation of the 4 ops
    m = order.shape[0]
    counts = {perm: 0 for perm in itertools.permutations(range(4))}
    for row in order:
        counts[tuple(int(v) for v in row)] += 1
    assert stats.chisquare(list(counts.values())).pvalue > P_MIN  # all 24 orders equally likely
    for op, pos in itertools.product(range(4), range(4)):
        assert within_binomial(int((order[:, pos] == op).sum()), m, 0.25)


# ------------------------------------------------------------------------------------------------ pixels

INTERP = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}


@pytest.mark.parametrize("interp", ["bicubic", "bilinear", "area"])
def test_resize_matches_cv2_resize_of_the_cropped_region(interp: str) -> None:
    # OpenCV resizes uint8 in fixed point: at most 1 grey level apart where a value sits on a rounding
    # boundary; a wrong coordinate mapping or kernel is tens of levels off on random images
    rng = np.random.default_rng(0)
    diffs = []
    for trial in range(40):
        c = int(rng.integers(12, 70))
        img = rng.integers(0, 256, (c, c, 3), dtype=np.uint8)
        if trial % 2:
            img = cv2.GaussianBlur(img, (0, 0), 1.5)
        h, w = int(rng.integers(1, c + 1)), int(rng.integers(1, c + 1))
        y0, x0 = int(rng.integers(0, c - h + 1)), int(rng.integers(0, c - w + 1))
        size, flip = int(rng.choice([8, 16, 23, 32])), bool(trial % 3 == 0)
        ref = cv2.resize(img[y0:y0 + h, x0:x0 + w], (size, size), interpolation=INTERP[interp])
        ref = ref[:, ::-1] if flip else ref
        out = ba.resize_boxes(torch.from_numpy(img.transpose(2, 0, 1).copy())[None], torch.tensor([0]),
                              torch.tensor([[y0, x0, h, w]]), torch.tensor([flip]), size, interp)
        d = np.abs(hwc(out[0]) - ref.astype(np.float32))
        assert d.max() <= 1, (trial, h, w, size)
        diffs.append(d.mean())
    assert float(np.mean(diffs)) < 0.25


def random_images(n: int, s: int, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    x = np.random.default_rng(seed).integers(0, 256, (n, s, s, 3), dtype=np.uint8)
    x[: n // 4] = cv2.GaussianBlur(x[: n // 4].reshape(-1, s, 3), (0, 0), 2).reshape(n // 4, s, s, 3)  # smooth ones
    return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).float()


def check_op(got: torch.Tensor, ref: list[np.ndarray]) -> None:
    """Same uint8 images but for rounding-boundary ties (at most 1 level, on under 1% of the values)."""
    r = np.stack(ref).astype(np.float32)
    d = np.abs(got.numpy().transpose(0, 2, 3, 1) - r)
    assert d.max() <= 1 and d.mean() < 0.01, (d.max(), d.mean())


def test_colour_jitter_ops_match_albumentations() -> None:
    x, xt = random_images(24, 20)
    f = torch.tensor(np.random.default_rng(1).uniform(0, 2, 24))
    f[0], f[1] = 0.0, 1.0  # the special cases of the reference code
    hue = torch.tensor(np.random.default_rng(2).uniform(-0.5, 0.5, 24))
    hue[0] = 0.0
    for fn, ref, fac in ((ba.adjust_brightness, fpixel.adjust_brightness_torchvision, f),
                         (ba.adjust_contrast, fpixel.adjust_contrast_torchvision, f),
                         (ba.adjust_saturation, fpixel.adjust_saturation_torchvision, f),
                         (ba.adjust_hue, fpixel.adjust_hue_torchvision, hue)):
        check_op(fn(xt.clone(), fac), [ref(x[i].copy(), float(fac[i])) for i in range(24)])


def test_gray_blur_solarize_match_albumentations() -> None:
    x, xt = random_images(24, 20)
    check_op(ba.gray_u8(xt).expand(-1, 3, -1, -1), [fpixel.to_gray(x[i], 3, "weighted_average") for i in range(24)])
    sigma = torch.tensor(np.random.default_rng(3).uniform(0.1, 2.5, 24))  # kernels 1 .. 17 taps
    check_op(ba.gaussian_blur(xt.clone(), sigma),
             [fpixel.separable_convolve(x[i], fblur.create_gaussian_kernel_1d(float(sigma[i]), 0)) for i in range(24)])
    small_x, small_t = random_images(4, 5)  # kernel wider than the image: reflect-101 folds again
    big = torch.full((4,), 2.5, dtype=torch.float64)
    check_op(ba.gaussian_blur(small_t.clone(), big),
             [fpixel.separable_convolve(small_x[i], fblur.create_gaussian_kernel_1d(2.5, 0)) for i in range(4)])
    check_op(ba.solarize(xt), [fpixel.solarize(x[i], 0.5) for i in range(24)])


def reference_crop(img: np.ndarray, p: ba.CropParams, n: int, size: int, cfg: CropsConfig) -> np.ndarray:
    """Row ``n`` of ``p`` rendered with cv2 / albumentations' functional ops, in the recipe's order."""
    y0, x0, h, w = (int(v) for v in p.box[n])
    out = cv2.resize(img[y0:y0 + h, x0:x0 + w], (size, size), interpolation=INTERP[cfg.interpolation])
    if p.flip[n]:
        out = np.ascontiguousarray(out[:, ::-1])
    ops = (fpixel.adjust_brightness_torchvision, fpixel.adjust_contrast_torchvision,
           fpixel.adjust_saturation_torchvision, fpixel.adjust_hue_torchvision)
    if p.jitter[n]:
        for op in p.order[n].tolist():
            out = ops[op](out, float(p.factors[n, op]))
    if p.gray[n]:
        out = fpixel.to_gray(out, 3, "weighted_average")
    if p.blur[n]:
        out = fpixel.separable_convolve(out, fblur.create_gaussian_kernel_1d(float(p.sigma[n]), 0))
    if p.solarize[n]:
        out = fpixel.solarize(out, 0.5)
    return out


def test_whole_crops_match_the_albumentations_ops_chained_in_the_drawn_order() -> None:
    cfg = CropsConfig(global_size=24, local_size=12, n_local=2, color_jitter_p=0.9, grayscale_p=0.3,
                      blur_p=[0.6, 0.5, 0.5], blur_sigma=[0.3, 1.5], solarize_p=0.5)
    b, c = 16, 40
    imgs = cv2.GaussianBlur(np.random.default_rng(4).integers(0, 256, (b * c, c, 3), dtype=np.uint8), (0, 0), 1.0)
    imgs = imgs.reshape(b, c, c, 3)
    aug = ba.BatchedMultiCrop(cfg, seed=5)
    sizes = torch.tensor([[c, c - 7 * (i % 3)] for i in range(b)])  # some images narrower than the canvas
    keys = keys_of(b)
    crops = aug.crops(torch.from_numpy(imgs.transpose(0, 3, 1, 2).copy()), sizes, keys)
    g, loc = aug.params(keys, sizes)
    assert loc is not None
    diffs = []
    for p, size, first in ((g, cfg.global_size, 0), (loc, cfg.local_size, 2)):
        for row in range(p.box.shape[0]):
            k, i = divmod(row, b)
            ref = reference_crop(imgs[i], p, row, size, cfg)
            diffs.append(np.abs(hwc(crops[first + k][i]).astype(np.float32) - ref).mean())
    # per-op agreement is exact but for ties; chained, a tie can move a later truncation by a level
    assert float(np.mean(diffs)) < 0.1 and float(np.max(diffs)) < 1.0, (np.mean(diffs), np.max(diffs))


# ------------------------------------------------------------------------------------------------ the batch

def canvas_batch(n: int, c: int, start: int = 0, seed: int = 0) -> dict:
    imgs = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, c, c), dtype=np.uint8))
    return {"images": imgs, "sizes": torch.full((n, 2), c), "keys": keys_of(n, start=start), "skipped": 2,
            "phase": ""}


def test_crops_depend_only_on_seed_epoch_index_not_on_the_batch() -> None:
    cfg = CropsConfig(global_size=16, local_size=8, n_local=2)
    aug = ba.BatchedMultiCrop(cfg, seed=11, extra_global_size=24)
    full = canvas_batch(8, 32)
    out = aug(full)
    assert [tuple(t.shape) for t in out["crops"]] == [(8, 3, 16, 16)] * 2 + [(8, 3, 8, 8)] * 2 + [(8, 3, 24, 24)] * 2
    assert all(t.dtype == torch.uint8 for t in out["crops"])
    assert set(out) == {"crops", "skipped"} and out["skipped"] == 2
    # a batch made of images 5, 2, 7 of the first one (in another order) plus others: same crops for them
    pick = torch.tensor([5, 2, 7])
    other = canvas_batch(3, 32, start=100, seed=1)
    mixed = {"images": torch.cat([other["images"][:1], full["images"][pick], other["images"][1:]]),
             "sizes": torch.cat([other["sizes"][:1], full["sizes"][pick], other["sizes"][1:]]),
             "keys": torch.cat([other["keys"][:1], full["keys"][pick], other["keys"][1:]])}
    again = aug(mixed)["crops"]
    for a, b in zip(out["crops"], again):
        assert torch.equal(a[pick], b[1:4])
    # another seed or another epoch: other crops
    assert not torch.equal(ba.BatchedMultiCrop(cfg, seed=12)(full)["crops"][0], out["crops"][0])
    later = {**full, "keys": keys_of(8, epoch=1)}
    assert not torch.equal(aug(later)["crops"][0], out["crops"][0])


def test_gram_crops_share_the_boxes_flips_and_colours_of_the_global_crops() -> None:
    cfg = CropsConfig(global_size=16, local_size=8, n_local=1, blur_p=[0.0, 0.0, 0.0], solarize_p=0.0)
    n, c = 64, 48
    yy, xx = np.mgrid[0:c, 0:c]
    smooth = np.stack([yy * 5, xx * 5, (yy + xx) * 2.5], axis=0).clip(0, 255).astype(np.uint8)  # a gradient
    imgs = torch.from_numpy(np.repeat(smooth[None], n, axis=0))
    batch = {"images": imgs, "sizes": torch.full((n, 2), c), "keys": keys_of(n)}
    crops = ba.BatchedMultiCrop(cfg, seed=3, extra_global_size=32).crops(imgs, batch["sizes"], batch["keys"])
    g1, g2, big1, big2 = crops[0], crops[1], crops[3], crops[4]

    def shrink(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.stack([cv2.resize(hwc(t), (16, 16), interpolation=cv2.INTER_AREA)
                                          for t in x]).transpose(0, 3, 1, 2).copy()).float()

    same = (shrink(big1) - g1.float()).abs().mean(dim=(1, 2, 3))
    swapped = (shrink(big1) - g2.float()).abs().mean(dim=(1, 2, 3))
    assert float(same.max()) < 3.0  # the same region at twice the resolution (grey levels)
    assert float((shrink(big2) - g2.float()).abs().mean(dim=(1, 2, 3)).max()) < 3.0
    assert float(swapped.median()) > 10.0  # the other global crop is another region: the test can tell


def test_padding_of_a_small_image_never_reaches_a_crop() -> None:
    cfg = CropsConfig(global_size=16, local_size=8, n_local=4, interpolation="bicubic")
    n, c = 32, 40
    base = canvas_batch(n, c, seed=4)
    sizes = torch.tensor([[13 + i % 9, 7 + (3 * i) % 25] for i in range(n)])  # every image smaller than the canvas
    zeros, noise = base["images"].clone(), base["images"].clone()
    fill = torch.from_numpy(np.random.default_rng(5).integers(0, 256, (n, 3, c, c), dtype=np.uint8))
    for i, (h, w) in enumerate(sizes.tolist()):
        keep = torch.zeros(c, c, dtype=torch.bool)
        keep[:h, :w] = True
        zeros[i][:, ~keep] = 0
        noise[i][:, ~keep] = fill[i][:, ~keep]
    for interp in ("bicubic", "bilinear", "area"):
        aug = ba.BatchedMultiCrop(CropsConfig(**{**cfg.__dict__, "interpolation": interp}), seed=6)
        a = aug.crops(zeros, sizes, base["keys"])
        b = aug.crops(noise, sizes, base["keys"])
        for x, y in zip(a, b):
            assert torch.equal(x, y), interp  # no padding pixel has any weight in any crop
        g, _ = aug.params(base["keys"], sizes)
        y0, x0, h, w = g.box.unbind(1)
        hh, ww = sizes[g.src].unbind(1)
        assert bool(((y0 + h <= hh) & (x0 + w <= ww) & (y0 >= 0) & (x0 >= 0)).all())


# ------------------------------------------------------------------------------------------------ data side

class Sized(ImageSource):
    """Images of given (h, w) with a pattern, labels 0."""

    def __init__(self, shapes: list[tuple[int, int]]) -> None:
        self.shapes = shapes
        self.labels = np.zeros(len(shapes), dtype=np.int64)
        self.class_names = ["x"]
        self.name = "sized"

    def load(self, i: int) -> np.ndarray | None:
        h, w = self.shapes[i]
        return np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_canvas_downscales_large_images_and_pads_small_ones() -> None:
    from fovea.data.loader import to_canvas
    img = np.random.default_rng(0).integers(0, 256, (50, 100, 3), dtype=np.uint8)
    out, (h, w) = to_canvas(img, 40)
    assert (h, w) == (20, 40) and out.shape == (3, 40, 40)
    assert np.array_equal(out[:, :20, :40], cv2.resize(img, (40, 20), interpolation=cv2.INTER_AREA).transpose(2, 0, 1))
    assert not out[:, 20:].any()
    small = img[:9, :17]
    out, size = to_canvas(small, 40)
    assert size == (9, 17) and np.array_equal(out[:, :9, :17], small.transpose(2, 0, 1))
    assert not out[:, 9:].any() and not out[:, :, 17:].any()


def test_auto_canvas_is_the_longest_probed_side_capped() -> None:
    from fovea.data.loader import auto_canvas
    assert auto_canvas(Sized([(32, 32)] * 50), 64) == 32
    assert auto_canvas(Sized([(20, 28)] * 50), 56) == 28
    assert auto_canvas(Sized([(300, 500), (375, 500), (500, 333)] * 10), 448) == 448
    assert auto_canvas(Sized([(30, 40), (60, 20)] * 10), 448) == 60


def test_canvas_dataset_and_collate_keep_the_ibot_masks_of_the_per_image_path() -> None:
    from fovea.config.loader import load_config
    from fovea.methods.registry import spec_for
    cfg = load_config("dino_vittiny_fmnist", TINY_MODEL + ["ibot.enabled=true", "crops.augment=batched"])
    src = Sized([(24, 24)] * 6 + [(30, 12)] * 6)
    spec = spec_for(cfg.method)
    ds, collate = spec.train_data(cfg, src, "")
    per_image_cfg = load_config("dino_vittiny_fmnist", TINY_MODEL + ["ibot.enabled=true"])
    ref_ds, ref_collate = spec.train_data(per_image_cfg, src, "")
    keys = [(3, 1), (3, 7), (0, 11)]
    batch, ref = collate([ds[k] for k in keys]), ref_collate([ref_ds[k] for k in keys])
    assert batch["images"].shape == (3, 3, 30, 30) and batch["images"].dtype == torch.uint8  # auto canvas: 30
    assert batch["sizes"].tolist() == [[24, 24], [30, 12], [30, 12]]
    assert batch["keys"].tolist() == [list(k) for k in keys] and batch["skipped"] == 0 and batch["phase"] == ""
    assert torch.equal(batch["masks"], ref["masks"])
    # the stepper's augmentation turns it into the per-image layout
    out = spec.batch_augment(cfg)(batch)  # type: ignore[misc]
    assert [tuple(t.shape) for t in out["crops"]] == [tuple(t.shape) for t in ref["crops"]]
    assert torch.equal(out["masks"], ref["masks"])


def test_stepper_augments_the_whole_batch_before_the_micro_batches() -> None:
    from fovea.config.loader import load_config
    from fovea.methods.registry import spec_for
    from fovea.train.plan import make_plan, resolve_auto
    from fovea.train.step import build_stepper
    over = TINY_MODEL + ["crops.augment=batched", "data.batch_size=8", "train.accumulate=2", "crops.canvas=24"]
    cfg = resolve_auto(load_config("dino_vittiny_fmnist", over), 1024, 1)
    st = build_stepper(cfg, make_plan(cfg, 1024, 1), torch.device("cpu"))
    assert st.augment is not None
    seen = []
    orig = st.method.training_step

    def spy(micro: dict, sv: object) -> object:
        seen.append(micro)
        return orig(micro, sv)  # type: ignore[arg-type]

    st.method.training_step = spy  # type: ignore[method-assign]
    batch = spec_for(cfg.method).synthetic_batch(cfg, torch.device("cpu"))
    assert batch["images"].shape == (8, 3, 24, 24)
    logs = st.step(batch, st.values(0))
    assert math.isfinite(logs["loss/total"])
    assert len(seen) == 2 and all("images" not in m and len(m["crops"]) == 2 + cfg.crops.n_local for m in seen)
    assert all(m["crops"][0].shape == (4, 3, 16, 16) for m in seen)
    whole = st.augment(batch)["crops"]
    assert torch.equal(torch.cat([seen[0]["crops"][0], seen[1]["crops"][0]]), whole[0])
    # per-image config and I-JEPA (always per image, and refused batched): no batched augmentation
    assert build_stepper(resolve_auto(load_config("dino_vittiny_fmnist", TINY_MODEL), 1024, 1),
                         make_plan(cfg, 1024, 1), torch.device("cpu")).augment is None
    jepa = resolve_auto(load_config("ijepa_vittiny_cifar10", JEPA_TINY), 1024, 1)
    assert build_stepper(jepa, make_plan(jepa, 1024, 1), torch.device("cpu")).augment is None
    from fovea.errors import ConfigError
    with pytest.raises(ConfigError, match="I-JEPA's single view is augmented per image"):
        load_config("ijepa_vittiny_cifar10", JEPA_TINY + ["crops.augment=batched"])
