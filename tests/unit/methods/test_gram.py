"""Gram anchoring (DINOv3, METHODS.md 5b): the loss against a float64 re-derivation, the Gram teacher's
refresh schedule, the weight schedule and the term inside the DINOv2 step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fovea.config.loader import load_config
from fovea.losses.gram import gram_loss, resize_patch_grid
from fovea.methods.base import StepValues
from fovea.methods.dino import DINO
from fovea.methods.terms.gram import gram_weight, refreshes_after
from helpers import TINY_SD

TINY = ["method=dinov3", *TINY_SD, "gram.enabled=true", "gram.start=2", "gram.refresh_every=3", "gram.weight=2.0", "optim.momentum_teacher=0.99"]


def _gram_ref(xs: np.ndarray, xg: np.ndarray) -> float:
    """Float64 loops: per image, cosine similarities of every patch pair, squared differences, mean."""
    total, count = 0.0, 0
    for s_img, g_img in zip(xs, xg):
        s_n = s_img / np.linalg.norm(s_img, axis=1, keepdims=True)
        g_n = g_img / np.linalg.norm(g_img, axis=1, keepdims=True)
        for i in range(len(s_n)):
            for j in range(len(s_n)):
                total += (float(s_n[i] @ s_n[j]) - float(g_n[i] @ g_n[j])) ** 2
                count += 1
    return total / count


def test_gram_loss_matches_float64_rederivation() -> None:
    g = torch.Generator().manual_seed(0)
    for b, p, d, scale in ((1, 3, 4, 1.0), (3, 9, 8, 5.0), (2, 16, 32, 0.01)):
        xs = torch.randn(b, p, d, generator=g) * scale
        xg = torch.randn(b, p, d, generator=g) + 0.5
        got = float(gram_loss(xs, xg))
        assert got == pytest.approx(_gram_ref(xs.double().numpy(), xg.double().numpy()), abs=1e-6, rel=1e-5)


def test_gram_loss_hand_case_and_invariances() -> None:
    # 2 patches: student orthogonal (similarity 0), Gram teacher parallel (similarity 1): off-diagonal
    # entries differ by 1, diagonal by 0 -> mean of [0, 1, 1, 0] = 0.5
    xs = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])
    xg = torch.tensor([[[2.0, 0.0], [5.0, 0.0]]])
    assert float(gram_loss(xs, xg)) == pytest.approx(0.5)
    # anti-parallel teacher patches: similarity -1 is kept (no clipping of negative similarities)
    assert float(gram_loss(xs, torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]]))) == pytest.approx(0.5)
    # zero when the Gram matrices agree: a rotation and per-token scaling leave cosine similarities unchanged
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1))
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(2)))
    assert float(gram_loss(x, (x @ q) * torch.rand(2, 5, 1) * 3 + 0)) < 1e-10
    with pytest.raises(ValueError):
        gram_loss(torch.randn(1, 4, 3), torch.randn(1, 5, 3))


def test_resize_patch_grid_identity_and_bicubic() -> None:
    x = torch.randn(2, 16, 3)
    assert resize_patch_grid(x, 4, 4, 4, 4) is x
    # a constant field stays constant under the bicubic resize; the 8x8 -> 4x4 grid is what the student sees
    c = torch.full((1, 64, 3), 2.5)
    assert torch.allclose(resize_patch_grid(c, 8, 8, 4, 4), torch.full((1, 16, 3), 2.5), atol=1e-5)
    ref = torch.nn.functional.interpolate(x.transpose(1, 2).reshape(2, 3, 4, 4), size=(2, 2), mode="bicubic",
                                          align_corners=False).reshape(2, 3, 4).transpose(1, 2)
    assert torch.allclose(resize_patch_grid(x, 4, 4, 2, 2), ref)


def test_refresh_and_weight_schedule() -> None:
    cfg = load_config(None, TINY + ["gram.start=10", "gram.refresh_every=4", "gram.highres_weight=1.5"])
    # taken before step 10 runs (after step 9), then before steps 14, 18, ...
    assert [s for s in range(25) if refreshes_after(cfg, s)] == [9, 13, 17, 21]
    assert [gram_weight(cfg, s, False) for s in (0, 9, 10, 30)] == [0.0, 0.0, 2.0, 2.0]
    assert gram_weight(cfg, 30, True) == 1.5
    never = load_config(None, TINY + ["gram.start=3", "gram.refresh_every=0"])
    assert [s for s in range(20) if refreshes_after(never, s)] == [2]


def _batch(b: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)
    crops = [torch.randint(0, 256, (b, 3, 16, 16), dtype=torch.uint8, generator=g) for _ in range(2)]
    crops += [torch.randint(0, 256, (b, 3, 8, 8), dtype=torch.uint8, generator=g)]
    masks = torch.zeros(2 * b, 16, dtype=torch.bool)
    masks[::2, :5] = True
    return {"crops": crops, "masks": masks}


def _sv(step: int, cfg) -> StepValues:
    from fovea.core.plan import Plan
    from fovea.methods.dino_spec import schedule
    plan = Plan(steps_per_epoch=10, total_steps=20, warmup_steps=0, checkpoint_every=10, eval_every=0,
                peak_lr=1e-3, epoch_unit=10)
    return StepValues(step=step, epoch=0.0, lr=1e-3, weight_decay=0.04, sched=schedule(cfg, plan)(step))


def test_gram_term_in_the_step_and_the_snapshot_refresh() -> None:
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    m = DINO(cfg).train()
    assert list(m.terms) == ["dino", "ibot", "koleo", "gram"]
    term = m.terms["gram"]
    assert not any(p.requires_grad for p in term.teacher.parameters()) and not term.teacher.training
    # before gram.start: weight 0, the loss is not computed
    loss0, logs0 = m.training_step(_batch(), _sv(0, cfg))
    assert float(logs0["loss/gram"]) == 0.0
    total = sum(float(logs0[f"loss/{k}"]) * w for k, w in (("dino", 1.0), ("ibot", 1.0), ("koleo", 0.1)))
    assert float(loss0.detach()) == pytest.approx(total, rel=1e-6)
    # from gram.start: the student's global-crop patch tokens (masked forward) vs the Gram teacher's, by hand
    with torch.no_grad():  # move the student away from the snapshot so that the loss is not ~0
        for p in m.student.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = _batch()
    loss, logs = m.training_step(batch, _sv(2, cfg))
    c, b = cfg.crops, 4
    x = [((t.float() / 255) - torch.tensor(c.mean).view(1, 3, 1, 1)) / torch.tensor(c.std).view(1, 3, 1, 1)
         for t in batch["crops"]]
    with torch.no_grad():
        s = torch.cat([m.student.backbone.forward_features(x[i], batch["masks"][i * b:(i + 1) * b]).patches
                       for i in range(2)])
        gt = torch.cat([term.teacher.forward_features(x[i]).patches for i in range(2)])
    want = _gram_ref(s.double().numpy(), gt.double().numpy())
    assert float(logs["loss/gram"]) == pytest.approx(want, rel=1e-4) and want > 1e-4
    others = sum(float(logs[f"loss/{k}"]) * w for k, w in (("dino", 1.0), ("ibot", 1.0), ("koleo", 0.1)))
    assert float(loss.detach()) == pytest.approx(others + 2.0 * want, rel=1e-4)
    loss.backward()
    assert m.student.backbone.blocks[0].attn.qkv.weight.grad is not None
    assert all(p.grad is None for p in term.teacher.parameters())
    # the snapshot follows the EMA teacher only at its refresh steps (after steps 1, 4, 7 ...)
    with torch.no_grad():
        for p in m.teacher.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in term.teacher.parameters()]
    term.after_step(m.teacher.backbone, _sv(2, cfg))  # step 2: no refresh
    assert all(torch.equal(a, b) for a, b in zip(term.teacher.parameters(), before))
    term.after_step(m.teacher.backbone, _sv(4, cfg))  # after step 4 = before step 5 = start + 3: refresh
    assert all(torch.equal(a, t) for a, t in zip(term.teacher.parameters(), m.teacher.backbone.parameters()))
    assert "terms.gram.teacher.blocks.0.attn.qkv.weight" in m.state_dict() and bool(m.state_dict()["terms.gram.taken"])


def test_gram_teacher_is_taken_after_init_from_when_start_is_0() -> None:
    # the snapshot is taken at the first weighted step from the EMA teacher as it is then (e.g. after
    # train.init_from loaded released weights), not from the random weights the method was built with
    cfg = load_config(None, TINY + ["gram.start=0"])
    torch.manual_seed(0)
    m = DINO(cfg).train()
    with torch.no_grad():  # what init_from does: new weights into student and teacher
        for net in (m.student.backbone, m.teacher.backbone):
            for p in net.parameters():
                p.mul_(0.5).add_(0.1)
    assert not bool(m.terms["gram"].taken)
    m.training_step(_batch(), _sv(0, cfg))
    assert bool(m.terms["gram"].taken)
    assert all(torch.equal(a, b) for a, b in zip(m.terms["gram"].teacher.parameters(), m.teacher.backbone.parameters()))


def test_gram_teacher_larger_crops_are_the_same_boxes() -> None:
    from fovea.data.augment import MultiCrop
    cfg = load_config(None, TINY + ["gram.teacher_size=32"])
    yy, xx = np.mgrid[0:40, 0:40]
    img = np.stack([xx * 6, yy * 6, (xx + yy) * 3], -1).astype(np.uint8)  # smooth: resizing is near-lossless
    crops = MultiCrop(cfg.crops, extra_global_size=32)(img, seed=7)
    assert [t.shape[-1] for t in crops] == [16, 16, 8, 32, 32]
    for small, big in ((crops[0], crops[3]), (crops[1], crops[4])):  # same box: the big crop shrunk ~ the small one
        down = torch.nn.functional.interpolate(big[None].float(), size=(16, 16), mode="area")[0]
        assert (down - small.float()).abs().mean() < 3
    other = MultiCrop(cfg.crops, extra_global_size=32)(img, seed=8)
    assert (torch.nn.functional.interpolate(other[3][None].float(), size=(16, 16), mode="area")[0]
            - crops[0].float()).abs().mean() > 10
    # the method splits them off and the Gram teacher's patches are resized to the student's 4x4 grid
    torch.manual_seed(0)
    m = DINO(cfg).train()
    batch = _batch()
    g = torch.Generator().manual_seed(1)
    batch["crops"] += [torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g) for _ in range(2)]
    loss, logs = m.training_step(batch, _sv(3, cfg))
    assert torch.isfinite(loss) and float(logs["loss/gram"]) > 0


def test_gram_config_errors_name_the_key() -> None:
    from fovea.errors import ConfigError
    with pytest.raises(ConfigError, match="gram.teacher_size"):
        load_config(None, TINY + ["gram.teacher_size=30"])
    with pytest.raises(ConfigError, match="gram.start"):
        load_config(None, TINY + ["gram.start=-1"])
