"""Franca parts with independently derived expectations: CyclicMask statistics, Matryoshka heads and
their per-level losses, truncated-feature k-NN, the Franca presets."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fovea.config.loader import load_config
from fovea.errors import ConfigError
from fovea.eval.knn import knn_accuracy, parse_widths, truncate_features
from fovea.masking.block import BlockMasker
from fovea.masking.cyclic import inverse_block_mask, random_roll
from fovea.methods.base import StepValues
from fovea.methods.dino import DINO
from fovea.models.matryoshka import MatryoshkaHead, level_prototypes, nesting_widths
from helpers import TINY_SD

# --------------------------------------------------------------------------- CyclicMask


def _position_rates(kind: str, n: int, grid: int = 16) -> tuple[np.ndarray, list[float]]:
    m = BlockMasker(grid, 1.0, (0.1, 0.65), kind=kind)
    acc, ratios = np.zeros(grid * grid), []
    for s in range(n // 2):
        x = m(s, 2)
        acc += x.sum(0)
        ratios += list(x.mean(1))
    return (acc / (2 * (n // 2))).reshape(grid, grid), ratios


def test_cyclic_mask_is_flat_and_unrolled_inverse_block_is_corner_biased() -> None:
    cyc, r_cyc = _position_rates("cyclic", 8000)
    inv, r_inv = _position_rates("inverse_block", 2000)
    # Roll with wrap-around: every position equally likely. Expected rate = mean ratio; with 8000 draws the
    # per-position standard error is ~1.4%, so max/min over 256 positions stays well under 1.12.
    assert cyc.max() / cyc.min() < 1.12
    assert abs(cyc.mean() - np.mean(r_cyc)) < 1e-9
    # Without the roll the visible rectangle sits mostly in the centre: corners masked far more often
    # (METHODS.md: ~84% vs ~3%).
    corners = np.mean([inv[0, 0], inv[0, -1], inv[-1, 0], inv[-1, -1]])
    assert corners > 0.75 and inv[7:9, 7:9].mean() < 0.12 and inv.max() / inv.min() > 5
    for r in (r_cyc, r_inv):
        assert 0.1 - 1e-9 <= min(r) and max(r) <= 0.65 + 1e-9
        assert np.mean(r) == pytest.approx(0.375, abs=0.03)  # U(0.1, 0.65) on average, up to rounding


def test_inverse_block_visible_part_is_one_rectangle_and_roll_wraps() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        r = rng.uniform(0.1, 0.65)
        m = inverse_block_mask(16, 16, r, rng)
        assert m.sum() == round(r * 256)  # exactly round(ratio * patches) masked
        rows, cols = np.nonzero(~m)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        # the visible cells fill their bounding box, but for at most one partial last row
        full = [(~m)[i, cols.min():cols.max() + 1].all() for i in range(rows.min(), rows.max() + 1)]
        assert all(full[:-1]) and box - (~m).sum() < cols.max() - cols.min() + 1
        rolled = random_roll(m, rng)
        assert rolled.sum() == m.sum()
        # the rolled mask is a cyclic shift of the original: some shift maps it back
        assert any(np.array_equal(np.roll(rolled, (-a, -b), (0, 1)), m) for a in range(16) for b in range(16))


@pytest.mark.parametrize("grid", [4, 7, 14, 16])
@pytest.mark.parametrize("kind", ["inverse_block", "cyclic"])
def test_inverse_block_and_cyclic_mask_exact_count_at_every_ratio(grid: int, kind: str) -> None:
    # every masked count from 0 to all patches, hit through the ratio, is realised exactly
    n = grid * grid
    masker = BlockMasker(grid, 1.0, (0.0, 1.0), kind=kind)
    rng = np.random.default_rng(grid)
    for count in range(n + 1):
        r = count / n
        for _ in range(3):
            assert masker_one_with_ratio(masker, r, rng).sum() == count


def masker_one_with_ratio(masker: BlockMasker, r: float, rng: np.random.Generator) -> np.ndarray:
    """One mask of ``masker`` at a fixed ratio r (the ratio range pinned to [r, r])."""
    masker.ratio = (r, r)
    return masker.one(rng)


def test_visible_shape_prefers_whole_rectangles_and_follows_the_aspect() -> None:
    from fovea.masking.cyclic import visible_shape
    assert visible_shape(16, 16, 64, 1.0) == (8, 8, 0)
    assert visible_shape(16, 16, 64, 4.0) == (16, 4, 0)
    assert visible_shape(4, 4, 7, 1.0) == (2, 3, 1)  # 7 = 2 x 3 + 1: no 7-cell rectangle fits 4 x 4
    assert visible_shape(16, 16, 127, 1.0)[2] > 0  # prime: a partial row is needed
    assert visible_shape(4, 4, 16, 1.0) == (4, 4, 0) and visible_shape(4, 4, 0, 1.0) == (0, 0, 0)


def test_masker_probability_and_block_kind_unchanged() -> None:
    m = BlockMasker(8, 0.5, (0.1, 0.65), kind="cyclic")
    masked = np.array([m(s, 2).any(1) for s in range(1000)]).mean()
    assert masked == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError):
        BlockMasker(8, 0.5, (0.1, 0.5), kind="nope")
    # the default block kind draws exactly as before (same count as the BEiT block masks)
    b = BlockMasker(8, 1.0, (0.25, 0.25))(3, 1)
    assert b.sum() == 16


# --------------------------------------------------------------------------- Matryoshka head

def test_widths_and_prototypes_per_level() -> None:
    assert nesting_widths(768) == [48, 96, 192, 384, 768]
    assert level_prototypes(131072, [48, 96, 192, 384, 768], 768) == [8192, 16384, 32768, 65536, 131072]
    h = MatryoshkaHead(32, 64, [2, 8, 32], hidden_dim=24, bottleneck_dim=16)
    assert [lv.last_layer.weight_v.shape for lv in h.levels] == [(4, 16), (16, 16), (64, 16)]
    assert [lv.mlp[0].in_features for lv in h.levels] == [2, 8, 32]
    out = h(torch.randn(5, 32))
    assert [o.shape for o in out] == [(5, 4), (5, 16), (5, 64)]
    with pytest.raises(ValueError):
        nesting_widths(32, [0, 32])


@pytest.mark.parametrize("mode", ["slice", "linear"])
def test_gradients_reach_only_the_levels_slice(mode: str) -> None:
    torch.manual_seed(0)
    h = MatryoshkaHead(32, 64, [4, 8, 32], hidden_dim=24, bottleneck_dim=16, input_mode=mode)
    for m, d in enumerate(h.widths):
        x = torch.randn(6, 32, requires_grad=True)
        (h(x)[m] ** 2).sum().backward()
        g = x.grad.abs().sum(0)
        assert (g[:d] > 0).all()
        if mode == "slice":
            assert torch.equal(g[d:], torch.zeros(32 - d))  # nothing beyond the level's slice
        else:
            assert (g > 0).all()  # a learned Linear(D, d) reads every coordinate
        h.zero_grad()


def test_l2_norm_option() -> None:
    torch.manual_seed(0)
    h = MatryoshkaHead(16, 32, [4, 16], hidden_dim=8, bottleneck_dim=8, l2_norm=False)
    x = torch.randn(3, 16)
    lv = h.levels[1]
    z = lv.mlp(x)  # without normalisation the prototypes see the raw bottleneck
    assert torch.allclose(h(x)[1], z @ lv.last_layer.weight.T, atol=1e-6)
    assert not torch.allclose(h(x)[1], F.normalize(z, dim=-1) @ lv.last_layer.weight.T, atol=1e-3)


# --------------------------------------------------------------------------- per-level losses in the method

TINY = ["method=franca", *TINY_SD, "model.layerscale_init=1e-5", "matryoshka.enabled=true", "matryoshka.widths=[8,32]"]
SV = StepValues(step=0, epoch=0.0, lr=1e-3, weight_decay=0.04,
                sched={"momentum": 0.996, "teacher_temp": 0.04, "freeze_last_layer": 0.0})


def _batch(b: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)
    crops = [torch.randint(0, 256, (b, 3, 16, 16), dtype=torch.uint8, generator=g) for _ in range(2)]
    crops += [torch.randint(0, 256, (b, 3, 8, 8), dtype=torch.uint8, generator=g)]
    return {"crops": crops, "masks": torch.rand(2 * b, 16, generator=g) < 0.4}


def _sk(t: np.ndarray, temp: float, iters: int = 3) -> np.ndarray:
    """METHODS.md Sinkhorn-Knopp pseudo-code in float64 (one rank)."""
    q = np.exp((t - t.max()) / temp).T
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(1, keepdims=True) * k
        q /= q.sum(0, keepdims=True) * b
    return (q * b).T


def test_loss_is_the_weighted_sum_of_per_level_losses_computed_by_hand() -> None:
    cfg = load_config(None, TINY + ["matryoshka.loss_weights=[0.5,2.0]"])
    torch.manual_seed(0)
    m = DINO(cfg).train()
    batch = _batch()
    loss, logs = m.training_step(batch, SV)
    # Independent recomputation of the DINO term: backbone CLS of every crop, each level's head on its slice.
    mean, std = cfg.crops.mean, cfg.crops.std
    crops = [((x.float() / 255) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
             for x in batch["crops"]]
    b = 4
    with torch.no_grad():
        s_cls = [m.student.backbone.forward_features(c, batch["masks"][i * b:(i + 1) * b] if i < 2 else None)
                 .cls for i, c in enumerate(crops)]
        t_cls = [m.teacher.backbone.forward_features(c).cls for c in crops[:2]]
        total = 0.0
        for lvl, (d, w) in enumerate(zip([8, 32], [0.5, 2.0])):
            head_s, head_t = m.student.head.levels[lvl], m.teacher.head.levels[lvl]
            p_t = _sk(torch.cat([head_t.logits(c[:, :d]) for c in t_cls]).double().numpy(), 0.04)
            p_t = np.split(p_t, 2)
            log_s = [F.log_softmax(head_s.logits(c[:, :d]).double() / 0.1, -1).numpy() for c in s_cls]
            pairs = [-(p_t[i] * log_s[j]).sum(1).mean() for i in range(2) for j in range(3) if i != j]
            l_lvl = float(np.mean(pairs))
            assert float(logs[f"loss/dino@{d}"]) == pytest.approx(l_lvl, rel=1e-4)
            total += w * l_lvl
    assert float(logs["loss/dino"]) == pytest.approx(total, rel=1e-4)
    ibot = 0.5 * float(logs["loss/ibot@8"]) + 2.0 * float(logs["loss/ibot@32"])
    assert float(logs["loss/ibot"]) == pytest.approx(ibot, rel=1e-5)
    assert float(logs["loss/total"]) == pytest.approx(total + ibot + 0.1 * float(logs["loss/koleo"]), rel=1e-4)
    loss.backward()
    s = m.student
    for head in (s.head, s.patch_head):
        assert [lv.last_layer.weight_v.shape[0] for lv in head.levels] == ([16, 64] if head is s.head else [8, 32])
        assert all(lv.last_layer.weight_v.grad.abs().sum() > 0 for lv in head.levels)
    assert len(m.last_layer_params()) == 2 * 2 * 2  # 2 heads x 2 levels x (weight_v, weight_g)


@pytest.mark.parametrize("extra", [["dino.centering=ema", "ibot.enabled=false", "method=dino"],
                                   ["dino.centering=ema", "ibot.separate_head=false", "matryoshka.input=linear",
                                    "matryoshka.l2_norm=false"]])
def test_matryoshka_with_ema_centering_and_plain_dino(extra: list[str]) -> None:
    cfg = load_config(None, TINY + extra)
    torch.manual_seed(0)
    m = DINO(cfg).train()
    loss, logs = m.training_step(_batch(), SV)
    assert torch.isfinite(loss)
    assert float(logs["loss/dino"]) == pytest.approx(float(logs["loss/dino@8"]) + float(logs["loss/dino@32"]),
                                                     rel=1e-5)
    loss.backward()
    m.after_step(SV)  # the EMA centres take the step's teacher outputs
    centres = [fn.center for fn in m.terms["dino"].levels]
    assert [c.shape[1] for c in centres] == [16, 64] and all(c.abs().sum() > 0 for c in centres)


def test_config_rejects_bad_franca_keys() -> None:
    with pytest.raises(ConfigError, match="mask_type"):
        load_config(None, ["ibot.mask_type=circle"])
    with pytest.raises(ConfigError, match="matryoshka.input"):
        load_config(None, ["matryoshka.input=conv"])
    with pytest.raises(ConfigError, match="loss_weights"):
        load_config(None, ["matryoshka.widths=[8,32]", "matryoshka.loss_weights=[1,1,1]"])


# --------------------------------------------------------------------------- truncated-feature k-NN

def test_parse_widths() -> None:
    assert parse_widths("12,48,192", 192) == [12, 48, 192]
    assert parse_widths("1/16,1/4,1", 192) == [12, 48, 192]
    assert parse_widths("0.25", 768) == [192]
    with pytest.raises(ValueError):
        parse_widths("400", 192)


def test_truncation_uses_the_leading_coordinates_then_normalises() -> None:
    g = torch.Generator().manual_seed(0)
    n, c = 400, 4
    y = torch.arange(n) % c
    signal = F.one_hot(y, c).float() + 0.05 * torch.randn(n, c, generator=g)  # class info in the first 4 dims
    noise = 3.0 * torch.randn(n, 60, generator=g)  # large noise in the rest
    x = torch.cat([signal, noise], 1)
    tr, te = x[:300], x[300:]
    full = knn_accuracy(tr, y[:300], te, y[300:], [10])[10]
    trunc = knn_accuracy(truncate_features(tr, "cls", 4), y[:300], truncate_features(te, "cls", 4), y[300:], [10])[10]
    assert trunc == 100.0 and full < 70.0
    both = torch.cat([F.normalize(x, dim=1), F.normalize(x.flip(1), dim=1)], 1)
    t = truncate_features(both, "both", 4)
    assert torch.allclose(t, torch.cat([F.normalize(x[:, :4], dim=1), F.normalize(x.flip(1)[:, :4], dim=1)], 1),
                          atol=1e-6)


# --------------------------------------------------------------------------- presets

def test_franca_presets() -> None:
    tiny = load_config("franca_vittiny_cifar10")
    ref = load_config("dinov2_vittiny_cifar10")
    assert tiny.method == "franca" and tiny.matryoshka.enabled and tiny.ibot.mask_type == "cyclic"
    assert tiny.ibot.mask_ratio == [0.1, 0.65] and tiny.model == ref.model
    # the same optimiser, another length: a long schedule cut at 25 CPU minutes, not annealed within them (README
    # "Quality per CPU-minute"), where dinov2_vittiny_cifar10 keeps a schedule that ends in its budget
    assert replace(tiny.optim, epochs=ref.optim.epochs) == ref.optim
    assert tiny.train.max_minutes == 25.0 and ref.train.max_minutes == 0.0 and tiny.optim.epochs > ref.optim.epochs
    b = load_config("franca_vitb14_imagenet21k")
    assert b.model.arch == "vit_base" and b.model.patch_size == 14 and b.dino.out_dim == 131072
    assert nesting_widths(768, b.matryoshka.widths) == [48, 96, 192, 384, 768]
    assert (b.dino.hidden_dim, b.dino.bottleneck_dim, b.koleo.weight) == (2048, 384, 0.1)
    assert b.ibot.separate_head and b.dino.centering == "sinkhorn" and b.ibot.mask_type == "cyclic"
    assert b.highres.steps == 20000 and b.highres.global_size == 518
    s = load_config("franca_vits14_imagenette")
    assert s.matryoshka.enabled and s.model.arch == "vit_small"
