"""RASA post-training: hand-checked geometry, a planted position subspace, folding, save/load, CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fovea.cli import build_parser, main
from fovea.hub.backbone import export_backbone, load_backbone, state_dict_equal
from fovea.models.vit import ViTConfig, VisionTransformer
from fovea.posttrain.rasa import (RasaConfig, fold_into_backbone, gram_schmidt, grid_positions,
                                  patch_probe_accuracy, position_r2, rasa_rounds, remove_subspace, removal_matrix)

D, P, IMG = 32, 4, 16


def tiny(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    cfg = dict(arch="vit_tiny", depth=2, embed_dim=D, num_heads=2, patch_size=P, img_size=IMG, drop_path_rate=0.0)
    cfg.update(kw)
    m = VisionTransformer(ViTConfig(**cfg)).eval()
    with torch.no_grad():  # non-trivial norm affine so patch outputs are not all alike
        m.norm.weight.add_(torch.randn(D) * 0.3)
        m.norm.bias.add_(torch.randn(D) * 0.3)
    return m


# ---------------------------------------------------------------------------- geometry by hand

def test_gram_schmidt_and_removal_by_hand() -> None:
    u = gram_schmidt(torch.tensor([[3.0, 0, 0], [1.0, 2, 0]]))
    assert torch.allclose(u, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    u2 = gram_schmidt(torch.tensor([[1.0, 1, 0], [2.0, 2, 0]]))  # dependent second row is dropped
    assert u2.shape == (1, 3) and torch.allclose(u2, torch.tensor([[1.0, 1, 0]]) / math.sqrt(2))
    assert torch.allclose(removal_matrix([u], 3), torch.diag(torch.tensor([0.0, 0, 1])).double())
    x = torch.tensor([[5.0, -2, 7], [1.0, 1, 1]])
    assert torch.allclose(remove_subspace(x, u), torch.tensor([[0.0, 0, 7], [0.0, 0, 1]]))
    # a chain of two non-orthogonal single directions: sequential removal == the one folded map
    a = torch.tensor([[1.0, 0, 0]])
    b = torch.tensor([[1.0, 1, 0]]) / math.sqrt(2)
    pm = removal_matrix([a, b], 3).float()
    assert torch.allclose(remove_subspace(remove_subspace(x, a), b), x @ pm.T, atol=1e-6)
    # x=(5,-2,7): remove e1 -> (0,-2,7); remove (1,1,0)/sqrt2: <.,b>=-sqrt2 -> (0,-2,7)+(1,1,0) = (1,-1,7)
    assert torch.allclose(x[:1] @ pm.T, torch.tensor([[1.0, -1, 7]]), atol=1e-6)


def test_grid_positions_and_r2_by_hand() -> None:
    g = grid_positions(2, 3)
    assert torch.allclose(g, torch.tensor([[0, 0], [0, .5], [0, 1], [1, 0], [1, .5], [1, 1.]]))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=gen)
    y = torch.stack([x[:, 0] * 2 + 1, x[:, 1] - x[:, 2]], 1)  # exactly linear -> R^2 = 1
    r = position_r2(x[:200], y[:200], x[200:], y[200:], ridge=1e-9)
    assert r["row"] > 0.9999 and r["col"] > 0.9999
    noise = torch.rand(400, 2, generator=gen)  # independent of x -> R^2 about 0 (slightly negative)
    assert abs(position_r2(x[:200], noise[:200], x[200:], noise[200:])["mean"]) < 0.05


# -------------------------------------------------------------------- planted position subspace

def planted(n_img: int, seed: int, q: torch.Tensor, grid: int = 6) -> tuple[torch.Tensor, ...]:
    """Patch features = position along q0, q1 (linear in row, col) + class sign along q2 + noise."""
    g = torch.Generator().manual_seed(seed)
    pos = grid_positions(grid, grid).repeat(n_img, 1)  # [n*G, 2]
    cls = torch.randint(0, 2, (n_img,), generator=g).repeat_interleave(grid * grid)
    sign = cls.float() * 2 - 1
    x = (3 * (pos[:, :1] - 0.5) * q[0] + 3 * (pos[:, 1:] - 0.5) * q[1] + 1.0 * sign[:, None] * q[2]
         + 0.5 * q[3] + 0.3 * torch.randn(len(pos), q.shape[1], generator=g))
    return x, pos, cls


def test_planted_position_subspace_is_removed_and_semantics_kept() -> None:
    dim = 24
    q = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(3)))[0].T  # orthonormal rows
    xf, yf, cf = planted(150, 1, q)
    xv, yv, cv = planted(80, 2, q)
    before = position_r2(xf, yf, xv, yv)
    assert before["mean"] > 0.9
    seen = []
    pmat, rounds = rasa_rounds(xf, yf, xv, yv, RasaConfig(rounds=4, steps=60, progress=False),
                               on_round=lambda r, p: seen.append(r.round))
    assert rounds[0].head_r2 > 0.8 and rounds[0].fresh_r2["mean"] < before["mean"] / 5
    # round 2 removes the residue; round 3's head finds nothing (held-out R^2 < 0.01) -> early stop
    assert seen == [1, 2] and len(rounds) == 2
    assert rounds[-1].fresh_r2["mean"] < 0.01
    pos_plane = q[:2].double()
    assert (pos_plane @ pmat.T).norm() < 0.05  # both planted position directions removed
    assert float(q[2].double() @ pmat @ q[2].double()) > 0.9  # the semantic direction is kept
    # P is an orthogonal projection removing exactly 2 dims per round
    assert torch.allclose(pmat, pmat.T, atol=1e-10) and torch.allclose(pmat @ pmat, pmat, atol=1e-10)
    assert abs(float(torch.trace(pmat)) - (dim - 4)) < 1e-8
    pf = pmat.float()
    acc_before = patch_probe_accuracy(xf, cf, xv, cv)
    acc_after = patch_probe_accuracy(xf @ pf.T, cf, xv @ pf.T, cv)
    assert acc_before > 99 and acc_after > 99
    # min_head_r2 < 0: every round runs, as in the released code
    _, forced = rasa_rounds(xf, yf, xv, yv, RasaConfig(rounds=3, steps=30, min_head_r2=-1.0, progress=False))
    assert [r.round for r in forced] == [1, 2, 3]


def test_fold_equals_backbone_then_projection_and_survives_save_load(tmp_path: Path) -> None:
    m = tiny()
    assert "patch_proj" not in m.state_dict()  # default layout unchanged (DINOv2 names only)
    pm = torch.randn(D, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    folded = fold_into_backbone(m, pm)
    assert folded.cfg.patch_projection and not m.cfg.patch_projection
    x = torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = m.forward_features(x), folded.forward_features(x)
        ref = a.patches @ pm.float().T
        assert torch.equal(a.cls, b.cls)
        assert torch.equal(a.prenorm, b.prenorm)
        assert torch.allclose(b.patches, ref, atol=1e-5, rtol=0)
        assert torch.equal(b.patches, ref)  # same op on the same numbers: bitwise
        inter = folded.get_intermediate_layers(x, n=2, return_class_token=True)
        inter0 = m.get_intermediate_layers(x, n=2, return_class_token=True)
        assert torch.equal(inter[1][0], b.patches) and torch.equal(inter[1][1], a.cls)
        assert torch.equal(inter[0][0], inter0[0][0])  # earlier block: no projection
        # folding twice composes: P2 @ P1
        p2 = torch.eye(D, dtype=torch.float64) * 0.5
        twice = fold_into_backbone(folded, p2)
        assert torch.allclose(twice.forward_features(x).patches, ref * 0.5, atol=1e-5)
    export_backbone(folded, tmp_path / "bb", extra={"crops": {"global_size": IMG}})
    loaded, meta = load_backbone(tmp_path / "bb")
    assert meta["model"]["patch_projection"] is True and loaded.patch_proj is not None
    assert state_dict_equal(loaded.state_dict(), folded.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x).patches, b.patches)
    with pytest.raises(ValueError, match="width"):
        fold_into_backbone(m, torch.eye(D + 1))


# ----------------------------------------------------------------------------------------- CLI

def make_folder(root: Path, n_per_class: int = 24) -> Path:
    """Two classes of 16 px images with a class-specific colour and a bright square at a random place."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["a", "b"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 120, (IMG, IMG, 3), dtype=np.uint8)
            arr[..., c] += 120
            y, x = rng.integers(0, IMG - 4, 2)
            arr[y:y + 4, x:x + 4] = 255
            Image.fromarray(arr).save(root / name / f"{i:03d}.png")
    return root


def test_cli_rasa_writes_a_loadable_backbone_and_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_folder(tmp_path / "imgs")
    m = tiny()
    with torch.no_grad():  # strong positional embedding: patch outputs then carry their position
        m.pos_embed.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(6))
    export_backbone(m, tmp_path / "bb", extra={"crops": {"global_size": IMG}})
    out = tmp_path / "rasa"
    spec = f"folder:{data}"
    assert main(["rasa", str(tmp_path / "bb" / "backbone.safetensors"), "--data", spec, "--limit", "30",
                 "--limit-heldout", "16", "--rounds", "2", "--steps", "15", "--min-head-r2", "-1", "--out", str(out), "--knn-train", spec,
                 "--knn-test", spec, "--k", "5", "--no-progress"]) == 0
    assert "position R^2" in capsys.readouterr().out
    rep = json.loads((out / "rasa_report.json").read_text())
    assert (out / "rasa_report.md").read_text().startswith("# RASA report")
    assert rep["n_fit_images"] == 30 and rep["n_heldout_images"] == 16 and len(rep["rounds"]) == 2
    assert rep["n_fit_patches"] == 30 * (IMG // P) ** 2 and rep["projection"]["removed_dims"] == 4
    assert rep["fold_check"]["max_abs_diff_patches"] < 1e-5 and rep["fold_check"]["cls_identical"]
    assert rep["knn"]["before"]["cls"] == rep["knn"]["after"]["cls"]  # CLS untouched -> identical k-NN
    assert rep["position_r2_before"]["mean"] > 0.5
    assert rep["position_r2_after"]["mean"] < rep["position_r2_before"]["mean"] - 0.2
    assert rep["missing"]
    loaded, meta = load_backbone(out)
    assert meta["model"]["patch_projection"] and meta["rasa"]["rounds"] == 2
    pm = loaded.patch_proj.double()
    assert abs(float(torch.trace(pm)) - (D - 4)) < 1e-4
    # `fovea eval knn` runs unchanged on the result and agrees with the report's after-figures
    assert main(["eval", "knn", str(out), "--train", spec, "--test", spec, "--k", "5", "--json",
                 "--features", "cls,mean_patch", "--workers", "0"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["features"]["cls"]["k=5"] == rep["knn"]["after"]["cls"]["k=5"]
    assert abs(ev["features"]["mean_patch"]["k=5"] - rep["knn"]["after"]["mean_patch"]["k=5"]) <= 100 / 48 + 1e-9


def test_rasa_help_describes_every_option() -> None:
    sub = build_parser()._subparsers._group_actions[0].choices["rasa"]
    opts = {o for a in sub._actions for o in a.option_strings}
    for opt in ("--data", "--heldout", "--rounds", "--out", "--limit", "--steps", "--knn-train", "--patches-per-image"):
        assert opt in opts
    for action in sub._actions:
        assert action.help, action.dest
    assert "(default: 9)" in sub.format_help()


def test_covariance_direction_removes_planted_position_in_one_round() -> None:
    dim = 24
    q = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(3)))[0].T
    xf, yf, _ = planted(150, 1, q)
    xv, yv, _ = planted(80, 2, q)
    pmat, rounds = rasa_rounds(xf, yf, xv, yv, RasaConfig(rounds=3, direction="covariance", progress=False))
    assert len(rounds) == 1  # nothing linear left after one round -> early stop
    assert rounds[0].fit_mse is None and abs(rounds[0].fresh_r2["mean"]) < 0.01
    # the planted position is exactly linear along q0, q1 with isotropic noise: the removed plane is ~span(q0, q1)
    assert (q[:2].double() @ pmat.T).norm() < 0.05
    assert float(q[2].double() @ pmat @ q[2].double()) > 0.99
    with pytest.raises(ValueError, match="direction"):
        rasa_rounds(xf, yf, xv, yv, RasaConfig(rounds=1, direction="sideways", progress=False))
