"""DINOv2 losses with independent expectations: Sinkhorn-Knopp, KoLeo, iBOT weighting, block masks."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fovea.losses.dino import DINOLoss, cross_view_loss
from fovea.losses.ibot import ibot_patch_loss, masked_patch_weights
from fovea.losses.koleo import koleo_loss
from fovea.losses.sinkhorn import sinkhorn_knopp
from fovea.masking.block import BlockMasker, block_mask
from helpers import free_port


# --------------------------------------------------------------------------- Sinkhorn-Knopp

def sk_reference(t: np.ndarray, temp: float, iters: int) -> np.ndarray:
    """The METHODS.md pseudo-code in float64, without the max subtraction (one rank)."""
    q = np.exp(t / temp).T
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    return (q * b).T


def test_sk_rows_sum_to_one_and_prototype_marginals_uniform() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(64, 16, generator=g) * 0.1  # small logits: 3 iterations are near the fixed point
    q = sinkhorn_knopp(t, 0.1, n_iters=3)
    assert q.shape == (64, 16) and q.dtype == torch.float32
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-5)  # last step normalises samples exactly
    marg = q.sum(0) / 64  # each prototype's share of the batch
    assert torch.allclose(marg, torch.full((16,), 1 / 16), rtol=0.02)
    # more iterations: the prototype marginals converge to uniform
    q300 = sinkhorn_knopp(torch.randn(64, 16, generator=g), 0.1, n_iters=300)
    assert torch.allclose(q300.sum(0) / 64, torch.full((16,), 1 / 16), rtol=1e-3)


def mixed_logits(seed: int, b: int = 48, k: int = 32, scale: float = 1.0) -> torch.Tensor:
    """A batch mixing flat samples (logits ~0.05 scale) and confident ones (one prototype far ahead),
    with different per-sample offsets: the case where a per-sample shift changes 3-iteration targets."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(b, k, generator=g, dtype=torch.float64)
    flat = torch.arange(b) % 3 == 0
    t[flat] *= 0.05
    conf = torch.arange(b) % 3 == 1
    t[conf, torch.randint(0, k, (int(conf.sum()),), generator=g)] += 3.0
    t += torch.rand(b, 1, generator=g, dtype=torch.float64) * 2 - 1  # per-sample offsets
    return (t / t.abs().max() * scale).float()


@pytest.mark.parametrize("scale,temp", [(0.3, 0.1), (1.0, 0.04), (4.0, 0.04)])
def test_sk_matches_float64_reference_on_mixed_logits(scale: float, temp: float) -> None:
    # float64 official algorithm (no shift of any kind) as the reference: at logit scale 4 and tau 0.04
    # (exp(100)) it is finite in float64 but overflows float32, where fovea must still agree with it
    t = mixed_logits(0, scale=scale)
    ref = sk_reference(t.double().numpy(), temp, 3)
    assert np.isfinite(ref).all()
    out = sinkhorn_knopp(t, temp, 3)
    assert torch.isfinite(out).all()
    assert np.abs(out.double().numpy() - ref).max() < 1e-5
    # the per-sample max shift of the earlier implementation is measurably different on confident logits
    z = t.double().numpy() / temp
    shifted = sk_reference(z - z.max(1, keepdims=True), 1.0, 3)
    assert np.abs(shifted - ref).max() > (1e-2 if scale >= 1 else 1e-5)
    # patch case: B_total given explicitly (e.g. masked patches over all ranks)
    ref_n = sk_reference(t.double().numpy(), temp, 3)
    assert np.abs(sinkhorn_knopp(t, temp, 3, torch.tensor(48.0)).double().numpy() - ref_n).max() < 1e-5


def test_sk_official_float32_overflows_at_scale_4() -> None:
    t = mixed_logits(1, scale=4.0)
    q = torch.exp(t / 0.04).t()  # the official first line, in float32
    q = q / q.sum()
    assert not torch.isfinite(q).all()
    assert torch.isfinite(sinkhorn_knopp(t, 0.04, 3)).all()


def test_sk_finite_for_logits_of_100_at_tau_004() -> None:
    t = torch.zeros(8, 32)
    t[:, 0] = 100.0  # exp(100 / 0.04) overflows even float64
    t[4:, 5] = 100.0
    t[2] = -100.0  # a sample far below the others: a global max shift would underflow it
    q = sinkhorn_knopp(t, 0.04, 3)
    assert torch.isfinite(q).all()
    assert torch.allclose(q.sum(1), torch.ones(8), atol=1e-5)
    # the flat sample keeps its mass (no underflow to 0/0) and, by symmetry, spreads it evenly over the 30
    # prototypes that no confident sample claims, giving less to the claimed prototypes 0 and 5
    rest = q[2, [j for j in range(32) if j not in (0, 5)]]
    assert torch.allclose(rest, rest[0].expand(30), rtol=1e-5) and q[2, 0] < rest[0] and q[2, 5] < rest[0]
    with np.errstate(over="ignore", invalid="ignore"):  # the unshifted algorithm overflows here
        assert not np.isfinite(sk_reference(t.numpy(), 0.04, 3)).all()


def test_sk_general_logits_converge_to_fixed_point() -> None:
    g = torch.Generator().manual_seed(1)
    t = torch.randn(20, 12, generator=g)
    ref = sk_reference(t.double().numpy(), 0.2, 200)
    assert np.allclose(sinkhorn_knopp(t, 0.2, 200).double().numpy(), ref, atol=1e-5)


SK_2RANK = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from fovea.losses.sinkhorn import sinkhorn_knopp
    dist.init_process_group("gloo")
    r = dist.get_rank()
    g = torch.Generator().manual_seed(0)
    t = torch.randn(10, 7, generator=g) * 2
    p = torch.randn(9, 7, generator=g) * 2          # 'masked patches': 4 on rank 0, 5 on rank 1
    big = torch.randn(10, 7, generator=g) * 2.0     # logits above 3.6 at tau 0.04: official float32 overflows
    out = sinkhorn_knopp(t[5 * r:5 * r + 5], 0.1, 3)
    n = torch.tensor(float(4 if r == 0 else 5)); dist.all_reduce(n)
    outp = sinkhorn_knopp(p[:4] if r == 0 else p[4:], 0.1, 3, n)
    outb = sinkhorn_knopp(big[5 * r:5 * r + 5], 0.04, 3)
    oute = sinkhorn_knopp(p[:0] if r == 0 else p, 0.1, 3, torch.tensor(9.0))  # rank 0 has no masked patch
    torch.save({"cls": out, "patch": outp, "big": outb, "empty": oute}, sys.argv[1] + f"/rank{r}.pt")
    dist.destroy_process_group()
""")


def test_sk_two_ranks_equal_one_rank(tmp_path: Path) -> None:
    script = tmp_path / "sk2.py"
    script.write_text(SK_2RANK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", str(script), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    g = torch.Generator().manual_seed(0)
    t = torch.randn(10, 7, generator=g) * 2
    p = torch.randn(9, 7, generator=g) * 2
    assert torch.allclose(torch.cat([r0["cls"], r1["cls"]]), sinkhorn_knopp(t, 0.1, 3), atol=1e-6)
    assert torch.allclose(torch.cat([r0["patch"], r1["patch"]]), sinkhorn_knopp(p, 0.1, 3), atol=1e-6)
    big = torch.randn(10, 7, generator=g) * 2.0
    assert big.max() / 0.04 > 88.8  # exp() of it is inf in float32
    one = sinkhorn_knopp(big, 0.04, 3)
    assert torch.isfinite(one).all() and torch.allclose(torch.cat([r0["big"], r1["big"]]), one, atol=1e-6)
    assert np.abs(one.double().numpy() - sk_reference(big.double().numpy(), 0.04, 3)).max() < 1e-5
    assert r0["empty"].shape == (0, 7) and torch.allclose(r1["empty"], sinkhorn_knopp(p, 0.1, 3), atol=1e-6)
    both = torch.cat([r0["cls"], r1["cls"]])
    assert torch.allclose(both.sum(1), torch.ones(10), atol=1e-5)
    assert not torch.allclose(r0["cls"], sinkhorn_knopp(t[:5], 0.1, 3), atol=1e-3)  # ranks did communicate


# --------------------------------------------------------------------------- KoLeo

def test_koleo_hand_computed() -> None:
    # unit vectors at 0, 60 and 180 degrees, given unnormalised (scales 2, 0.5, 3)
    ang = [0.0, math.pi / 3, math.pi]
    scale = [2.0, 0.5, 3.0]
    x = torch.tensor([[s * math.cos(a), s * math.sin(a)] for a, s in zip(ang, scale)])
    # nearest neighbours: 0 <-> 60 (chord 2 sin 30 = 1), 180 -> 60 (chord 2 sin 60 = sqrt 3)
    expected = -(math.log(1.0 + 1e-8) * 2 + math.log(math.sqrt(3) + 1e-8)) / 3
    assert koleo_loss(x).item() == pytest.approx(expected, abs=1e-6)


def test_koleo_finite_with_duplicates_and_low_precision() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g)
    x[3] = x[1]  # a duplicated image
    x = x.requires_grad_(True)
    loss = koleo_loss(x)
    assert torch.isfinite(loss)
    # the two duplicates contribute -log(eps) each
    assert loss.item() > 2 * -math.log(1e-8 + 1e-7) / 6
    loss.backward()
    assert torch.isfinite(x.grad).all()
    xb = x.detach().bfloat16()
    assert koleo_loss(xb).dtype == torch.float32 and torch.isfinite(koleo_loss(xb))
    assert koleo_loss(torch.randn(1, 4)).item() == 0.0


# --------------------------------------------------------------------------- iBOT

def test_ibot_weighting_on_hand_made_mask() -> None:
    # G=2 crops x B=2 images = 4 rows, 4 patches each; masked counts 2, 0, 1, 4
    masks = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    w = masked_patch_weights(masks)
    assert w.tolist() == pytest.approx([0.5, 0.5, 1.0, 0.25, 0.25, 0.25, 0.25])
    k = 5
    # uniform student: every masked patch costs log K, so L = (#images with masks) * log K / 4
    loss = ibot_patch_loss(torch.zeros(7, k), torch.full((7, k), 1 / k), w, n_images=4)
    assert loss.item() == pytest.approx(3 * math.log(k) / 4, abs=1e-6)
    # distinct per-patch costs, one-hot teacher on prototype 0, student logit a_j on prototype 0
    a = [0.0, 1.0, 2.0, 0.5, -1.0, 3.0, 0.0]
    s = torch.zeros(7, k)
    s[:, 0] = torch.tensor(a)
    pt = torch.zeros(7, k)
    pt[:, 0] = 1.0
    ce = [-(ai / 0.1 - math.log(math.exp(ai / 0.1) + k - 1)) for ai in a]
    expected = (0.5 * (ce[0] + ce[1]) + ce[2] + 0.25 * sum(ce[3:])) / 4
    assert ibot_patch_loss(s, pt, w, 4, student_temp=0.1).item() == pytest.approx(expected, rel=1e-5)


def test_dinov2_dino_term_pairs() -> None:
    # 2 global + 3 local crops: 2 + 2*3 = 8 pairs (crosswise globals + every global/local pair)
    b, k = 2, 4
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5 * b, k, generator=g)
    pt = torch.softmax(torch.randn(2 * b, k, generator=g), -1)
    logs = torch.log_softmax(s / 0.1, -1).chunk(5)
    pts = pt.chunk(2)
    pairs = [(0, 1), (1, 0)] + [(i, j) for i in range(2) for j in range(2, 5)]
    expected = sum(-(pts[i] * logs[j]).sum(-1).mean() for i, j in pairs) / 8
    assert cross_view_loss(s, pt, 2, 0.1).item() == pytest.approx(expected.item(), rel=1e-6)
    # DINOLoss keeps computing the same thing with EMA centering
    assert DINOLoss(k).forward(s, torch.log(pt) * 0.04, 0.04, 2).item() == pytest.approx(expected.item(), rel=1e-5)


# --------------------------------------------------------------------------- block masks

def test_block_mask_exact_count_and_blocky() -> None:
    rng = np.random.default_rng(0)
    for n in (0, 1, 5, 13, 37, 64):
        m = block_mask(8, 8, n, rng)
        assert m.shape == (8, 8) and int(m.sum()) == n
    # blocks: masked cells have more masked 4-neighbours than random cells would
    m = block_mask(14, 14, 60, np.random.default_rng(1))
    nb = sum(int(m[i, j] and m[i + di, j + dj]) for i in range(14) for j in range(14)
             for di, dj in ((0, 1), (1, 0)) if i + di < 14 and j + dj < 14)
    assert nb / 60 > 1.0  # random placement of 60/196 cells gives ~0.6 neighbour pairs per cell


def test_block_masker_statistics_and_determinism() -> None:
    mk = BlockMasker(grid=14, prob=0.5, ratio=(0.1, 0.5))
    draws = np.stack([mk(s) for s in range(2000)])  # [2000, 2, 196]
    assert (mk(7) == mk(7)).all() and not all((mk(s) == mk(s + 1)).all() for s in range(5))
    frac = draws.mean(-1).reshape(-1)
    masked = frac[frac > 0]
    assert len(masked) / len(frac) == pytest.approx(0.5, abs=0.03)  # mask probability
    assert masked.mean() == pytest.approx(0.3, abs=0.01)  # E[U(0.1, 0.5)]
    assert masked.min() >= 0.1 - 1 / 196 and masked.max() <= 0.5 + 1 / 196


def test_collate_masks_row_order() -> None:
    from fovea.data.loader import collate_multicrop
    items = []
    for i in range(3):
        crops = [torch.full((3, 4, 4), i, dtype=torch.uint8)] * 3
        m = torch.zeros(2, 4, dtype=torch.bool)
        m[0, i] = True      # global crop 1 of image i masks patch i
        m[1, 3] = i == 1    # global crop 2 masks patch 3 on image 1 only
        items.append((crops, 0, m))
    out = collate_multicrop(items)
    assert out["masks"].shape == (6, 4)
    assert out["masks"][:3].nonzero().tolist() == [[0, 0], [1, 1], [2, 2]]
    assert out["masks"][3:].nonzero().tolist() == [[1, 3]]
