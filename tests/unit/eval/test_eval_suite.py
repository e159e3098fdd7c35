"""Evaluation suite: protocols on features with known answers, metrics on hand-made cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fovea.eval.bank import FeatureBank, forward_bank, split_train_val
from fovea.eval.dense import (confusion, hummingbird, linear_segmentation, mean_iou, miou_from_confusion,
                              nearest_neighbours, patch_label_distribution)
from fovea.eval.fewshot import draw_shots, fewshot_eval
from fovea.eval.knn import knn_accuracy
from fovea.eval.linear import linear_probe
from fovea.eval.logreg import logreg_eval
from fovea.eval.ood import auroc, fpr_at_tpr, knn_score, ood_eval
from fovea.eval.pictures import pca_rgb
from fovea.models.vit import ViTConfig, VisionTransformer


def separable(n_per: int, classes: int = 4, d: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class c sits at 3 * e_c plus small noise: features [n_per*C, d], labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per)
    return torch.eye(d)[y] * 3 + 0.1 * torch.randn(len(y), d, generator=g), y


def as_bank(x: torch.Tensor, y: torch.Tensor, noise_blocks: int = 3, seed: int = 0) -> FeatureBank:
    g = torch.Generator().manual_seed(seed)
    cls = torch.cat([torch.randn(len(y), noise_blocks, x.shape[1], generator=g), x[:, None]], 1)
    return FeatureBank(cls, torch.randn(len(y), x.shape[1], generator=g), torch.zeros(len(y), 0, x.shape[1]), y)


# ------------------------------------------------------------------ classification protocols

def test_separable_features_give_100_percent_knn_linear_logreg():
    xtr, ytr = separable(30, seed=0)
    xte, yte = separable(10, seed=1)
    assert knn_accuracy(xtr, ytr, xte, yte, [1, 10, 20]) == {1: 100.0, 10: 100.0, 20: 100.0}
    lin = linear_probe(as_bank(xtr, ytr), as_bank(xte, yte, seed=1), epochs=30, batch_size=32)
    assert lin["test_top1"] == 100.0 and lin["val_top1"] == 100.0
    assert lin["n_val"] == 12 and lin["n_train"] == 108 and lin["n_test"] == 40  # 10% of each class for val
    lr = logreg_eval(xtr, ytr, xte, yte, cs=[1e-3, 1.0])
    assert lr["test_top1"] == 100.0
    # labels swapped on test: every protocol must drop to 0
    assert logreg_eval(xtr, ytr, xte, (yte + 1) % 4, cs=[1.0])["test_top1"] == 0.0


def test_linear_grid_selects_the_block_that_carries_the_label():
    # final CLS (the 'last1' config) is pure noise; the label lives in the CLS of block -4 only,
    # so validation must pick a last4 configuration and only last4 heads can score well on test
    def bank(n_per: int, seed: int) -> FeatureBank:
        x, y = separable(n_per, seed=seed)
        g = torch.Generator().manual_seed(seed + 10)
        cls = torch.randn(len(y), 4, x.shape[1], generator=g)
        cls[:, 0] = x
        return FeatureBank(cls, torch.randn(len(y), x.shape[1], generator=g), torch.zeros(len(y), 0, 12), y)
    res = linear_probe(bank(40, 0), bank(10, 1), epochs=20, batch_size=64)
    assert res["best"]["features"] in ("last4", "last4+mean")
    assert res["test_top1"] == 100.0
    assert res["test_grid"]["last1"] < 60.0


def test_split_train_val_is_stratified_and_disjoint():
    y = torch.tensor([0] * 10 + [1] * 20 + [2] * 1)
    tr, va = split_train_val(y, 0.2, seed=3)
    assert set(tr.tolist()).isdisjoint(va.tolist()) and len(tr) + len(va) == 31
    assert [(y[va] == c).sum().item() for c in range(3)] == [2, 4, 0]  # singleton class kept in train
    assert len(split_train_val(y, 0.0)[1]) == 0


def test_fewshot_draws_and_separable_accuracy():
    xtr, ytr = separable(30)
    idx = draw_shots(ytr, 5, seed=0)
    assert [(ytr[idx] == c).sum().item() for c in range(4)] == [5, 5, 5, 5]
    assert not torch.equal(idx, draw_shots(ytr, 5, seed=1))
    xte, yte = separable(10, seed=1)
    res = fewshot_eval(xtr, ytr, xte, yte, shots=[1, 5], draws=3)
    for n, clf in (("1-shot", "knn"), ("5-shot", "knn"), ("5-shot", "logreg")):
        assert res[n][clf]["mean"] == 100.0 and res[n][clf]["std"] == 0.0 and len(res[n][clf]["runs"]) == 3
    # one example per class cannot tell the 8 standardised noise dimensions from signal: imperfect, varied
    r = res["1-shot"]["logreg"]
    assert 75.0 < r["mean"] < 100.0 and r["std"] > 0 and r["mean"] == pytest.approx(np.mean(r["runs"]), abs=0.01)


# ------------------------------------------------------------------ OOD

def test_auroc_and_fpr95_hand_made():
    pos, neg = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0.75, 0.1])
    assert auroc(pos, neg) == pytest.approx(5 / 6)  # 6 pairs, (0.7, 0.75) is the one misordered
    assert auroc(torch.tensor([0.5]), torch.tensor([0.5])) == pytest.approx(0.5)  # tie counts half
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([3.0])) == 0.0
    # 20 in-distribution scores 1..20: keeping 95% (19 of them) puts the threshold at 2
    pos = torch.arange(1.0, 21.0)
    assert fpr_at_tpr(pos, torch.tensor([1.5, 2.0, 3.0])) == pytest.approx(2 / 3)
    assert fpr_at_tpr(pos, torch.tensor([0.0, 1.9])) == 0.0


def test_auroc_matches_sklearn_on_random_scores():
    from sklearn.metrics import roc_auc_score
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(50, generator=g) + 0.5, (torch.randn(70, generator=g) * 4).round() / 4
    pos[:5] = neg[:5]  # some exact ties across the classes
    ref = roc_auc_score(np.r_[np.ones(50), np.zeros(70)], np.r_[pos.numpy(), neg.numpy()])
    assert auroc(pos, neg) == pytest.approx(ref, abs=1e-12)


def test_knn_score_and_ood_separation():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    q = torch.tensor([[2.0, 0.0]])
    # cosine similarities to the bank: 1, 0, 1/sqrt(2): 1st nearest 1, 2nd 0.7071, 3rd 0
    assert knn_score(bank, q, 1).item() == pytest.approx(1.0)
    assert knn_score(bank, q, 2).item() == pytest.approx(2 ** -0.5)
    assert knn_score(bank, q, 3).item() == pytest.approx(0.0, abs=1e-7)
    xtr, _ = separable(20, classes=3, d=6)
    xid, _ = separable(5, classes=3, d=6, seed=1)
    xood = torch.zeros(10, 6)
    xood[:, 4:] = torch.randn(10, 2, generator=torch.Generator().manual_seed(2)).abs() + 1  # other directions
    res = ood_eval(xtr, xid, xood, [1, 5])
    assert res["k=1"] == {"auroc": 100.0, "fpr95": 0.0} and res["k=5"]["auroc"] == 100.0


# ------------------------------------------------------------------ dense

def test_miou_hand_made():
    gt = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 2]])
    # valid pixels: 7. class 0: TP 3, FP 1 (gt1->0), FN 1 (gt0->1) -> 3/5; class 1: TP 2, FP 1, FN 1 -> 2/4;
    # class 2: no gt, no valid prediction (the only '2' is on an ignored pixel) -> left out of the mean
    cm = confusion(pred, gt, 3)
    assert cm.tolist() == [[3, 1, 0], [1, 2, 0], [0, 0, 0]]
    r = miou_from_confusion(cm)
    assert r["miou"] == pytest.approx((60 + 50) / 2) and r["pixel_acc"] == pytest.approx(500 / 7)
    assert np.isnan(r["iou"][2])
    assert mean_iou(gt.clamp_max(1), gt.clamp_max(1), 2, ignore_index=99) == 100.0


def test_patch_label_distribution_hand_made():
    m = torch.tensor([[[0, 0, 1, 255], [0, 1, 255, 255], [2, 2, 2, 2], [2, 2, 2, 0]]])
    d = patch_label_distribution(m, 2, 3)
    assert d.shape == (1, 2, 2, 3)
    assert d[0, 0, 0].tolist() == pytest.approx([0.75, 0.25, 0.0])
    assert d[0, 0, 1].tolist() == pytest.approx([0.0, 1.0, 0.0])  # 3 ignored pixels
    assert d[0, 1, 1].tolist() == pytest.approx([0.25, 0.0, 0.75])


def colour_patch_features(images: torch.Tensor, patch: int) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> chromaticity of each patch and its saturation [N, h, w, 4] (a 'backbone'
    that sees colour; saturation makes grey linearly separable from the three colours)."""
    x = images.float()
    n, s, _, _ = x.shape
    x = x.reshape(n, s // patch, patch, s // patch, patch, 3).mean((2, 4))
    chroma = (x - x.mean(-1, keepdim=True)) / 100  # brightness removed
    return torch.cat([chroma, chroma.norm(dim=-1, keepdim=True)], -1) + 1e-3


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory):
    from fovea.data.segmentation import make_synthetic_segmentation, seg_source_from_spec
    root = tmp_path_factory.mktemp("seg")
    make_synthetic_segmentation(root / "train", 24, size=32, seed=0)
    make_synthetic_segmentation(root / "test", 8, size=32, seed=1)
    out = {}
    for split in ("train", "test"):
        src = seg_source_from_spec(str(root / split))
        pairs = [src.load(i) for i in range(len(src))]
        out[split] = (torch.from_numpy(np.stack([p[0] for p in pairs])), torch.from_numpy(np.stack([p[1] for p in pairs])))
    out["root"] = root
    return out


def test_synthetic_segmentation_set(seg_data):
    imgs, masks = seg_data["train"]
    assert imgs.shape == (24, 32, 32, 3) and imgs.dtype == torch.uint8 and masks.shape == (24, 32, 32)
    assert set(masks.unique().tolist()) <= {0, 1, 2, 3, 255} and {0, 255} < set(masks.unique().tolist())
    # colour decides the label: red channel dominates on class-1 pixels, blue on class-3 pixels
    r, b = imgs[..., 0].float(), imgs[..., 2].float()
    assert (r[masks == 1] > b[masks == 1] + 50).float().mean() > 0.95
    assert (b[masks == 3] > r[masks == 3] + 50).float().mean() > 0.95


def test_hummingbird_colour_set_near_perfect(seg_data):
    (itr, mtr), (ite, mte) = seg_data["train"], seg_data["test"]
    ftr, fte = colour_patch_features(itr, 2), colour_patch_features(ite, 2)
    res = hummingbird(ftr, mtr, fte, mte, 4, k=10, temperature=0.02)
    assert res["miou"] > 90.0, res
    torch_res = hummingbird(ftr, mtr, fte, mte, 4, k=10, temperature=0.02, use_faiss=False)
    assert torch_res["backend"] == "torch" and torch_res["miou"] == pytest.approx(res["miou"], abs=0.5)
    # shuffled memory labels destroy it
    perm = torch.randperm(len(mtr), generator=torch.Generator().manual_seed(0))
    assert hummingbird(ftr, mtr[perm], fte, mte, 4, k=10)["miou"] < 50.0
    lin = linear_segmentation(ftr, mtr, fte, mte, 4, epochs=15, lr=1e-2)
    assert lin["miou"] > 80.0, lin


def test_nearest_neighbours_faiss_equals_torch():
    g = torch.Generator().manual_seed(0)
    bank, q = torch.randn(200, 8, generator=g), torch.randn(30, 8, generator=g)
    s1, i1, b1 = nearest_neighbours(bank, q, 5, use_faiss=True)
    s2, i2, b2 = nearest_neighbours(bank, q, 5, use_faiss=False)
    assert b2 == "torch" and torch.equal(i1, i2) and torch.allclose(s1, s2, atol=1e-5)


# ------------------------------------------------------------------ features and pictures

def tiny_vit(registers: int = 0) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(arch="vit_tiny", patch_size=4, img_size=16, embed_dim=48, depth=3,
                                       num_heads=2, num_register_tokens=registers, drop_path_rate=0.0)).eval()


def test_forward_bank_matches_backbone_and_kinds():
    vit = tiny_vit(registers=2)
    x = torch.randn(3, 3, 24, 24)  # not the stored 16 px: positions are interpolated
    with torch.no_grad():
        cls, mp, reg = forward_bank(vit, x, 4)
        ref = vit.forward_features(x)
        inter = vit.get_intermediate_layers(x, 2, return_class_token=True)
    assert cls.shape == (3, 3, 48) and mp.shape == (3, 48) and reg.shape == (3, 2, 48)  # n capped at depth 3
    assert torch.allclose(cls[:, -1], ref.cls, atol=1e-5)
    assert torch.allclose(cls[:, -2], inter[0][1], atol=1e-5)
    assert torch.allclose(mp, ref.patches.mean(1), atol=1e-5)
    assert torch.allclose(reg, ref.registers, atol=1e-5)
    b = FeatureBank(cls, mp, reg, torch.zeros(3, dtype=torch.long))
    assert b.get("cls_last4").shape == (3, 144) and b.get("cls_last4_mean").shape == (3, 192)
    assert torch.equal(b.get("cls@16"), cls[:, -1, :16])  # Matryoshka width
    assert b.get("both@8").shape == (3, 16) and b.get("registers").shape == (3, 48)
    with pytest.raises(ValueError, match="unknown feature kind"):
        b.get("nope")


def test_pca_rgb_separates_foreground_and_blacks_background():
    # 2 images of 6x6 patches: border patches share one feature, a 2x2 centre block another
    g = torch.Generator().manual_seed(0)
    f = torch.zeros(2, 6, 6, 5)
    f[..., 0] = 1.0
    f[:, 2:4, 2:4] = torch.tensor([0.0, 1.0, 0.5, 0.0, 0.0]) + 0.05 * torch.randn(2, 2, 2, 5, generator=g)
    rgb = pca_rgb(f)
    assert rgb.shape == (2, 6, 6, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert rgb[:, 0].abs().sum() == 0  # background black
    assert (rgb[:, 2:4, 2:4].sum(-1) > 0).float().mean() > 0.7  # foreground coloured


def test_suite_reports_mean_patch_for_a_backbone_without_cls():
    """I-JEPA banks (has_cls=False): 'cls' / 'both' requests are evaluated and named as mean_patch."""
    from fovea.eval.suite import Suite
    xtr, ytr = separable(20, seed=0)
    xte, yte = separable(5, seed=1)
    s = Suite.__new__(Suite)  # no checkpoint: banks injected
    s._banks = {"train": FeatureBank(xtr[:, None], xtr, torch.zeros(len(ytr), 0, 12), ytr, has_cls=False),
                "test": FeatureBank(xte[:, None], xte, torch.zeros(len(yte), 0, 12), yte, has_cls=False)}
    res = s.knn(ks=[5], kinds=["cls", "both", "mean_patch@4"])
    assert list(res["features"]) == ["mean_patch", "mean_patch@4"]
    assert res["features"]["mean_patch"]["k=5"] == 100.0
    assert s.kind("cls_last4") == "cls_last4"
    s._banks["train"].has_cls = True
    assert s.kind("cls@4") == "cls@4"
