"""DINO loss (hand-computed), centering, DINO head and the DINO method (teacher handling)."""
from __future__ import annotations

import math

import pytest
import torch

from fovea.config.loader import load_config
from fovea.losses.dino import DINOLoss
from fovea.methods.base import StepValues
from fovea.methods.dino import DINO
from fovea.models.heads import DINOHead
from helpers import TINY_MODEL


# --------------------------------------------------------------------------- loss by hand

def _softmax(row: list[float], temp: float, center: list[float] | None = None) -> list[float]:
    c = center or [0.0] * len(row)
    z = [(v - cc) / temp for v, cc in zip(row, c)]
    mx = max(z)
    e = [math.exp(v - mx) for v in z]
    s = sum(e)
    return [v / s for v in e]


def _log_softmax(row: list[float], temp: float) -> list[float]:
    z = [v / temp for v in row]
    lse = math.log(sum(math.exp(v) for v in z))
    return [v - lse for v in z]


def _loss_by_hand(student: list[list[float]], teacher: list[list[float]], b: int, s_temp: float, t_temp: float,
                  center: list[float] | None = None) -> float:
    n_s, n_t = len(student) // b, len(teacher) // b
    total, pairs = 0.0, 0
    for i in range(n_t):
        for j in range(n_s):
            if i == j:
                continue
            ce = 0.0
            for r in range(b):
                pt = _softmax(teacher[i * b + r], t_temp, center)
                ls = _log_softmax(student[j * b + r], s_temp)
                ce += -sum(p * q for p, q in zip(pt, ls))
            total += ce / b
            pairs += 1
    assert pairs == 2 * n_s - 2
    return total / pairs


def test_dino_loss_tiny_hand_computed():
    student = [[0.2, -0.1, 0.05], [0.0, 0.3, -0.2], [-0.15, 0.1, 0.25]]  # g1, g2, local (B = 1)
    teacher = [[0.1, 0.02, -0.05], [-0.03, 0.08, 0.01]]
    loss_fn = DINOLoss(3, student_temp=0.1)
    got = loss_fn(torch.tensor(student), torch.tensor(teacher), teacher_temp=0.04, n_global=2).item()
    # the 4 pairs: (t0, s1), (t0, s2), (t1, s0), (t1, s2), written out explicitly
    def h(t_row, s_row):
        pt = _softmax(teacher[t_row], 0.04)
        ls = _log_softmax(student[s_row], 0.1)
        return -sum(p * q for p, q in zip(pt, ls))
    explicit = (h(0, 1) + h(0, 2) + h(1, 0) + h(1, 2)) / 4
    assert got == pytest.approx(explicit, abs=1e-6)
    assert got == pytest.approx(_loss_by_hand(student, teacher, 1, 0.1, 0.04), abs=1e-6)
    # an average over 6 pairs (all i, j) would differ: guards against counting same-view pairs
    with_same = (h(0, 0) + h(0, 1) + h(0, 2) + h(1, 0) + h(1, 1) + h(1, 2)) / 6
    assert abs(with_same - explicit) > 1e-3


def test_dino_loss_batch_and_locals_hand_computed():
    g = torch.Generator().manual_seed(0)
    b, k, n_local = 3, 5, 3
    student = (torch.randn((2 + n_local) * b, k, generator=g) * 0.5)
    teacher = (torch.randn(2 * b, k, generator=g) * 0.2)
    loss_fn = DINOLoss(k, student_temp=0.1)
    got = loss_fn(student, teacher, teacher_temp=0.07, n_global=2).item()
    exp = _loss_by_hand(student.tolist(), teacher.tolist(), b, 0.1, 0.07)
    assert got == pytest.approx(exp, abs=1e-6)


# --------------------------------------------------------------------------- centering

def test_update_center_ema():
    loss_fn = DINOLoss(3, center_momentum=0.9)
    assert torch.equal(loss_fn.center, torch.zeros(1, 3))
    t1 = torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, -1.0]])  # mean [2, 1, 1]
    loss_fn.update_center(t1)
    assert loss_fn.center.tolist()[0] == pytest.approx([0.2, 0.1, 0.1], abs=1e-7)
    t2 = torch.tensor([[0.0, 4.0, 2.0], [2.0, 4.0, 0.0], [1.0, 1.0, 1.0], [-3.0, 3.0, 1.0]])  # mean [0, 3, 1]
    loss_fn.update_center(t2)
    exp = [0.9 * c + 0.1 * m for c, m in zip([0.2, 0.1, 0.1], [0.0, 3.0, 1.0])]
    assert loss_fn.center.tolist()[0] == pytest.approx(exp, abs=1e-6)


def test_center_used_in_next_call_not_updated_by_forward():
    student = [[0.2, -0.1, 0.05], [0.0, 0.3, -0.2], [-0.15, 0.1, 0.25]]
    teacher = [[0.1, 0.02, -0.05], [-0.03, 0.08, 0.01]]
    s, t = torch.tensor(student), torch.tensor(teacher)
    loss_fn = DINOLoss(3, student_temp=0.1, center_momentum=0.9)
    first = loss_fn(s, t, 0.04, n_global=2).item()
    assert torch.equal(loss_fn.center, torch.zeros(1, 3))  # forward leaves the centre alone
    again = loss_fn(s, t, 0.04, n_global=2).item()
    assert again == first
    loss_fn.update_center(t)
    center = [0.1 * (teacher[0][c] + teacher[1][c]) / 2 for c in range(3)]
    assert loss_fn.center.tolist()[0] == pytest.approx(center, abs=1e-7)
    second = loss_fn(s, t, 0.04, n_global=2).item()
    assert second == pytest.approx(_loss_by_hand(student, teacher, 1, 0.1, 0.04, center), abs=1e-6)
    assert abs(second - first) > 1e-4
    probs = loss_fn.teacher_probs(t, 0.04)
    for r in range(2):
        assert probs[r].tolist() == pytest.approx(_softmax(teacher[r], 0.04, center), abs=1e-6)


# --------------------------------------------------------------------------- head

def test_dino_head_shapes_and_frozen_norm():
    torch.manual_seed(0)
    head = DINOHead(12, 40, hidden_dim=16, bottleneck_dim=8, nlayers=3, norm_last_layer=True)
    x = torch.randn(5, 12)
    out = head.logits(x)
    assert tuple(out.shape) == (5, 40)
    assert head.last_layer.weight_g.requires_grad is False
    assert tuple(head.last_layer.weight_g.shape) == (40, 1)
    assert tuple(head.last_layer.weight_v.shape) == (40, 8)
    w = head.last_layer.weight.detach()
    for r in range(40):
        assert math.sqrt(sum(v * v for v in w[r].tolist())) == pytest.approx(1.0, abs=1e-5)
    out.sum().backward()
    assert head.last_layer.weight_g.grad is None
    assert head.last_layer.weight_v.grad is not None
    assert head.mlp[0].weight.grad is not None


def test_dino_head_trainable_norm():
    torch.manual_seed(0)
    head = DINOHead(12, 40, hidden_dim=16, bottleneck_dim=8, nlayers=2, norm_last_layer=False)
    assert head.last_layer.weight_g.requires_grad is True
    (head.logits(torch.randn(5, 12)) ** 2).sum().backward()
    g = head.last_layer.weight_g.grad
    assert g is not None and g.abs().sum() > 0
    assert any(p is head.last_layer.weight_g for p in head.parameters() if p.requires_grad)


@pytest.mark.parametrize("nlayers", [1, 3])
def test_dino_head_features_l2_normalised(nlayers):
    torch.manual_seed(1)
    head = DINOHead(12, 30, hidden_dim=16, bottleneck_dim=8, nlayers=nlayers, norm_last_layer=False)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    seen = {}
    head.last_layer.register_forward_hook(lambda mod, inp, out: seen.__setitem__("z", inp[0].detach()))
    x = torch.randn(4, 12) * 3
    with torch.no_grad():
        out = head.logits(x)
    z = seen["z"]
    for r in range(4):
        assert math.sqrt(sum(v * v for v in z[r].tolist())) == pytest.approx(1.0, abs=1e-5)
    # recompute the logits by hand: z = mlp(x)/||mlp(x)||, logits[n, k] = g_k * <z_n, v_k>/||v_k||
    with torch.no_grad():
        h = head.mlp(x)
    v, gain = head.last_layer.weight_v.detach(), head.last_layer.weight_g.detach()[:, 0]
    for n in range(4):
        hn = h[n].tolist()
        norm_h = math.sqrt(sum(a * a for a in hn))
        for k in range(30):
            vk = v[k].tolist()
            norm_v = math.sqrt(sum(a * a for a in vk))
            dot = sum(a * b for a, b in zip(hn, vk))
            assert out[n, k].item() == pytest.approx(gain[k].item() * dot / (norm_h * norm_v), abs=1e-5)


# --------------------------------------------------------------------------- DINO method

TINY = TINY_MODEL


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, TINY)


def _method(cfg) -> DINO:
    torch.manual_seed(0)
    return DINO(cfg)


def test_teacher_is_separate_frozen_copy(cfg):
    m = _method(cfg)
    s_params = dict(m.student.named_parameters())
    t_params = dict(m.teacher.named_parameters())
    assert s_params.keys() == t_params.keys()
    s_ptrs = {p.data_ptr() for p in m.student.parameters()}
    for name, tp in t_params.items():
        assert tp.data_ptr() not in s_ptrs, name
        assert torch.equal(tp, s_params[name]), name
        assert tp.requires_grad is False
    m.train()
    assert m.student.training and m.student.backbone.blocks[0].training
    assert not m.teacher.training
    assert all(not mod.training for mod in m.teacher.modules())
    assert all(blk.drop_path_rate == 0.0 for blk in m.teacher.backbone.blocks)
    # modifying the student does not touch the teacher
    with torch.no_grad():
        m.student.backbone.pos_embed.add_(1.0)
    assert not torch.equal(m.student.backbone.pos_embed, m.teacher.backbone.pos_embed)


def test_after_step_ema(cfg):
    m = _method(cfg)

    def ema(momentum: float) -> None:
        m.after_step(StepValues(step=0, epoch=0.0, lr=0.0, weight_decay=0.0, sched={"momentum": momentum}))
    sp = m.student.backbone.blocks[1].mlp.fc1.weight
    tp = m.teacher.backbone.blocks[1].mlp.fc1.weight
    with torch.no_grad():
        sp.add_(torch.randn_like(sp))
    t0, s0 = tp.detach().clone().double(), sp.detach().clone().double()
    untouched_before = m.teacher.backbone.norm.weight.detach().clone()
    ema(0.9)
    expected = 0.9 * t0 + 0.1 * s0
    assert torch.allclose(tp.double(), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(tp.double(), s0, atol=1e-3)
    # an unperturbed parameter (student == teacher) stays where it was
    assert torch.allclose(m.teacher.backbone.norm.weight, untouched_before, atol=1e-7)
    ema(0.0)
    assert torch.equal(tp, sp)
    with torch.no_grad():
        sp.mul_(3.0)
    before = tp.detach().clone()
    ema(1.0)
    assert torch.equal(tp, before)


def test_training_step_backward_no_teacher_grads(cfg):
    m = _method(cfg)
    m.train()
    g = torch.Generator().manual_seed(0)
    b = 2
    crops = [torch.randint(0, 256, (b, 3, 16, 16), dtype=torch.uint8, generator=g) for _ in range(2)]
    crops += [torch.randint(0, 256, (b, 3, 8, 8), dtype=torch.uint8, generator=g) for _ in range(2)]
    sv = StepValues(step=0, epoch=0.0, lr=1e-3, weight_decay=0.04,
                    sched={"momentum": 0.996, "teacher_temp": 0.04, "freeze_last_layer": 0.0})
    center = m.terms["dino"].levels[0].center
    center_before = center.clone()
    loss, logs = m.training_step({"crops": crops}, sv)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert float(logs["loss/dino"]) == pytest.approx(loss.item())
    loss.backward()
    assert all(p.grad is None for p in m.teacher.parameters())
    assert m.student.backbone.patch_embed.proj.weight.grad is not None
    assert m.student.head.last_layer.weight_v.grad is not None
    # the centre moves after the optimizer step (with the teacher logits of the two global crops), not before
    assert torch.equal(center, center_before)
    m.after_step(sv)
    assert not torch.equal(center, center_before)
    with torch.no_grad():
        from fovea.data.augment import normalize
        c = cfg.crops
        (t_logits,), *_ = m.teacher([normalize(x, c.mean, c.std) for x in crops[:2]])
    assert torch.allclose(center, 0.1 * t_logits.mean(0, keepdim=True), atol=1e-6)


def test_collapse_stats_on_known_distributions() -> None:
    import math
    from fovea.methods.terms.dino import collapse_stats
    k = 8
    uniform = torch.full((5, k), 1.0 / k)
    s = collapse_stats(uniform)
    assert float(s["diag/teacher_entropy"]) == pytest.approx(math.log(k), abs=1e-6)
    assert float(s["diag/teacher_batch_entropy"]) == pytest.approx(math.log(k), abs=1e-6)
    same = torch.zeros(5, k)
    same[:, 3] = 1.0  # every sample picks prototype 3
    s = collapse_stats(same)
    assert float(s["diag/teacher_entropy"]) == pytest.approx(0.0, abs=1e-6)
    assert float(s["diag/teacher_batch_entropy"]) == pytest.approx(0.0, abs=1e-6)
    spread = torch.eye(k)  # one-hot, each sample its own prototype: healthy
    s = collapse_stats(spread)
    assert float(s["diag/teacher_entropy"]) == pytest.approx(0.0, abs=1e-6)
    assert float(s["diag/teacher_batch_entropy"]) == pytest.approx(math.log(k), abs=1e-6)


def test_bn_head_teacher_uses_batch_statistics_and_stays_eval() -> None:
    from fovea.config.loader import load_config
    from fovea.methods.dino import DINO
    from fovea.train.plan import resolve_auto
    cfg = resolve_auto(load_config(None, [
        "model.arch=vit_tiny", "model.depth=1", "model.embed_dim=48", "model.num_heads=3", "model.patch_size=4",
        "model.img_size=16", "crops.global_size=16", "crops.local_size=8", "crops.n_local=1", "dino.out_dim=32",
        "dino.hidden_dim=16", "dino.bottleneck_dim=8", "dino.use_bn=true"]), 100, 1)
    m = DINO(cfg).train()
    bns = [x for x in m.teacher.head.modules() if isinstance(x, torch.nn.BatchNorm1d)]
    assert len(bns) == 2  # one per hidden layer of the 3-layer head
    assert all(b.training for b in bns) and not m.teacher.training and not m.teacher.backbone.training
    # batch statistics: each hidden feature has mean ~0 over the batch after the teacher's BN
    x = torch.randn(64, 48) * 5 + 3
    h = m.teacher.head.mlp[1](m.teacher.head.mlp[0](x))
    assert torch.allclose(h.mean(0), torch.zeros(16), atol=1e-5)
    m.eval()
    assert not any(b.training for b in bns)


@pytest.mark.parametrize("matryoshka", [False, True])
def test_bn_both_teacher_heads_use_batch_statistics(matryoshka: bool) -> None:
    # the separate iBOT head's BatchNorm behaves like the DINO head's: batch statistics in training
    from fovea.config.loader import load_config
    from fovea.methods.dino import DINO
    from fovea.train.plan import resolve_auto
    over = ["model.arch=vit_tiny", "model.depth=1", "model.embed_dim=48", "model.num_heads=3", "model.patch_size=4",
            "model.img_size=16", "crops.global_size=16", "crops.local_size=8", "crops.n_local=1", "dino.out_dim=32",
            "dino.hidden_dim=16", "dino.bottleneck_dim=8", "dino.use_bn=true", "ibot.enabled=true",
            "ibot.separate_head=true", "ibot.out_dim=32"]
    if matryoshka:
        over += ["matryoshka.enabled=true", "matryoshka.widths=[12,48]"]
    m = DINO(resolve_auto(load_config(None, over), 100, 1)).train()
    for head in (m.teacher.head, m.teacher.patch_head):
        bns = [x for x in head.modules() if isinstance(x, torch.nn.BatchNorm1d)]
        assert len(bns) == (4 if matryoshka else 2) and all(b.training for b in bns)
    # numerically: the iBOT head's hidden features have batch mean ~0 (not the initial running stats' output)
    head = m.teacher.patch_head.levels[-1] if matryoshka else m.teacher.patch_head
    x = torch.randn(64, 48) * 5 + 3
    h = head.mlp[1](head.mlp[0](x))
    assert torch.allclose(h.mean(0), torch.zeros(16), atol=1e-5)
    m.eval()
    assert not any(b.training for b in m.teacher.patch_head.modules() if isinstance(b, torch.nn.BatchNorm1d))
