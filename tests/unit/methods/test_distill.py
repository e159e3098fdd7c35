"""method: distill (features target): the loss by hand, only the student learns, the EMA is the result,
a teacher at another resolution, and the config checks."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fovea.config.loader import load_config
from fovea.hub.backbone import export_backbone
from fovea.methods.base import StepValues
from fovea.methods.distill import Distill, token_loss
from fovea.models.vit import ViTConfig, VisionTransformer

STUDENT = ["method=distill", "model.arch=vit_tiny", "model.depth=1", "model.embed_dim=24", "model.num_heads=2",
           "model.patch_size=4", "model.img_size=16", "crops.global_size=16", "crops.n_local=0",
           "model.drop_path_rate=0", "optim.momentum_teacher=0.9"]


def teacher_folder(tmp: Path, patch: int = 4) -> Path:
    torch.manual_seed(3)
    vit = VisionTransformer(ViTConfig(arch="vit_tiny", depth=2, embed_dim=48, num_heads=3, patch_size=patch,
                                      img_size=16, drop_path_rate=0.0))
    export_backbone(vit, tmp / "teacher", extra={"crops": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}})
    return tmp / "teacher"


def _batch(b: int = 4, size: int = 16) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"crops": [torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g) for _ in range(2)]}


SV = StepValues(step=0, epoch=0.0, lr=1e-3, weight_decay=0.0, sched={"momentum": 0.9})


def train_steps(m: Distill, batch: dict, sv: StepValues, n: int) -> float:
    """``n`` AdamW steps of the student on one batch (the EMA follows); the last loss."""
    opt = torch.optim.AdamW([p for p in m.student.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(n):
        loss, _ = m.training_step(batch, sv)
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_step(sv)
    return float(loss.detach())


def test_token_loss_hand_values() -> None:
    s = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # cos = 1 and 0 -> mean(1 - cos) = 0.5
    assert float(token_loss(s, t, "cosine")) == pytest.approx(0.5)
    # smooth-L1 on the normalised tokens: row 2 differs by (-1, 1): 0.5 + 0.5 = 1 per token -> mean 0.5
    assert float(token_loss(s, t, "smooth_l1")) == pytest.approx(0.5)


def test_distill_step_by_hand_and_only_the_student_learns(tmp_path: Path) -> None:
    cfg = load_config(None, STUDENT + [f"distill.teacher={teacher_folder(tmp_path)}", "distill.patch_weight=0.5"])
    torch.manual_seed(0)
    m = Distill(cfg).train()
    assert not any(k.startswith("frozen") for k in m.state_dict())  # the teacher is re-read, never saved
    batch = _batch()
    loss, logs = m.training_step(batch, SV)
    c = cfg.crops
    with torch.no_grad():  # independent recomputation in float64
        tx = [((t.double() / 255) - 0.5) / 0.25 for t in batch["crops"]]
        sx = [((t.float() / 255) - torch.tensor(c.mean).view(1, 3, 1, 1)) / torch.tensor(c.std).view(1, 3, 1, 1)
              for t in batch["crops"]]
        t_out = [m.frozen.backbone.double().forward_features(t) for t in tx]
        m.frozen.float()
        s_out = [m.student.backbone.forward_features(x) for x in sx]

        def cos_dist(a: torch.Tensor, b: torch.Tensor) -> float:
            a, b = a.double(), b.double()
            return float((1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean())
        want_cls = cos_dist(torch.cat([m.student.cls_proj(o.cls) for o in s_out]), torch.cat([o.cls for o in t_out]))
        want_patch = cos_dist(torch.cat([m.student.patch_proj(o.patches) for o in s_out]),
                              torch.cat([o.patches for o in t_out]))
    assert float(logs["loss/distill_cls"]) == pytest.approx(want_cls, rel=1e-4)
    assert float(logs["loss/distill_patch"]) == pytest.approx(want_patch, rel=1e-4)
    assert float(loss.detach()) == pytest.approx(want_cls + 0.5 * want_patch, rel=1e-4)
    frozen0 = [p.clone() for p in m.frozen.parameters()]
    ema0 = [p.clone() for p in m.teacher.parameters()]
    last = train_steps(m, batch, SV, 30)
    assert last < 0.7 * float(loss.detach())  # the student learns the teacher's features
    assert all(torch.equal(a, b) for a, b in zip(m.frozen.parameters(), frozen0))  # frozen
    assert all(p.grad is None for p in m.frozen.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(m.teacher.parameters(), ema0))  # the EMA follows
    assert m.eval_backbone() is m.teacher.backbone


def test_teacher_at_another_resolution_and_patch_size(tmp_path: Path) -> None:
    # a patch-8 teacher seeing the crops at 32 px (4 x 4 grid) and a patch-4 student at 16 px (4 x 4 grid)
    cfg = load_config(None, STUDENT + [f"distill.teacher={teacher_folder(tmp_path, patch=8)}", "distill.teacher_size=32",
                                       "distill.loss=smooth_l1"])
    m = Distill(cfg).train()
    loss, logs = m.training_step(_batch(), SV)
    assert torch.isfinite(loss) and float(logs["loss/distill_patch"]) > 0


def test_distill_config_errors_name_the_key(tmp_path: Path) -> None:
    from fovea.errors import ConfigError
    with pytest.raises(ConfigError, match="distill.teacher"):
        load_config(None, STUDENT)
    with pytest.raises(ConfigError, match="distill.target"):
        load_config(None, STUDENT + ["distill.teacher=x", "distill.target=logits"])


# ------------------------------------------------------------------------------------ distill.target=heads

def teacher_with_heads(tmp: Path, ibot: bool = True) -> tuple[Path, dict]:
    """An imported-style folder: backbone.safetensors + heads.safetensors (DINO head, iBOT head)."""
    from safetensors.torch import save_file

    from fovea.models.heads import DINOHead
    folder = teacher_folder(tmp)
    torch.manual_seed(5)
    heads = {"dino_head": DINOHead(48, 32, 40, 16, 3)}
    if ibot:
        heads["ibot_head"] = DINOHead(48, 24, 40, 16, 3)
    save_file({f"{h}.{k}": v.contiguous() for h, m in heads.items() for k, v in m.state_dict().items()},
              str(folder / "heads.safetensors"))
    return folder, heads


SV_HEADS = StepValues(step=0, epoch=0.0, lr=1e-3, weight_decay=0.0,
                      sched={"momentum": 0.9, "teacher_temp": 0.05, "freeze_last_layer": 0.0})


def test_heads_target_losses_by_hand(tmp_path: Path) -> None:
    folder, heads = teacher_with_heads(tmp_path)
    cfg = load_config(None, STUDENT + [f"distill.teacher={folder}", "distill.target=heads", "dino.student_temp=0.1",
                                       "ibot.loss_weight=0.5"])
    torch.manual_seed(0)
    m = Distill(cfg).train()
    assert set(m.terms) == {"dino", "ibot"}
    # the student's heads have the teacher's shapes (prototypes included) at the student's width
    assert m.student.head.last_layer.weight_v.shape == (32, 16)
    assert m.student.patch_head is not None and m.student.patch_head.last_layer.weight_v.shape == (24, 16)
    assert m.student.head.mlp[0].in_features == 24
    # the teacher's heads are the file's, frozen, and not saved with the run
    assert torch.equal(m.frozen.head.last_layer.weight_v, heads["dino_head"].last_layer.weight_v)
    assert not any(k.startswith("frozen") for k in m.state_dict())
    batch = _batch()
    loss, logs = m.training_step(batch, SV_HEADS)
    c = cfg.crops
    with torch.no_grad():  # float64 re-derivation: EMA centre 0 at the first step, no masking
        tx = [((t.double() / 255) - 0.5) / 0.25 for t in batch["crops"]]
        sx = [((t.float() / 255) - torch.tensor(c.mean).view(1, 3, 1, 1)) / torch.tensor(c.std).view(1, 3, 1, 1)
              for t in batch["crops"]]
        fb = m.frozen.backbone.double()
        t_out = [fb.forward_features(t) for t in tx]
        th, tp = heads["dino_head"].double(), heads["ibot_head"].double()
        s_out = [m.student.backbone.forward_features(x) for x in sx]
        p_t = [torch.softmax(th.logits(o.cls) / 0.05, -1) for o in t_out]
        ls = [torch.log_softmax(m.student.head.logits(o.cls).double() / 0.1, -1) for o in s_out]
        want_dino = float(((-(p_t[0] * ls[1]).sum(-1)).mean() + (-(p_t[1] * ls[0]).sum(-1)).mean()) / 2)
        ce = []
        for o_t, o_s in zip(t_out, s_out):
            q = torch.softmax(tp.logits(o_t.patches.reshape(-1, 48)) / 0.05, -1)
            lp = torch.log_softmax(m.student.patch_head.logits(o_s.patches.reshape(-1, 24)).double() / 0.1, -1)
            ce.append(-(q * lp).sum(-1))
        want_ibot = float(torch.cat(ce).mean())  # every patch of every image counts the same (equal grids)
        m.frozen.float()
    assert float(logs["loss/dino"]) == pytest.approx(want_dino, rel=1e-4)
    assert float(logs["loss/ibot"]) == pytest.approx(want_ibot, rel=1e-4)
    assert float(loss.detach()) == pytest.approx(want_dino + 0.5 * want_ibot, rel=1e-4)
    frozen0 = [p.clone() for p in m.frozen.parameters()]
    assert train_steps(m, batch, SV_HEADS, 25) < float(loss.detach())  # the student's heads learn the targets
    assert all(torch.equal(a, b) for a, b in zip(m.frozen.parameters(), frozen0))


def test_heads_target_from_a_fovea_run_checkpoint(tmp_path: Path) -> None:
    """A fovea run's teacher heads are rebuilt from the run's own config (BN head, shared iBOT head)."""
    from fovea.config.loader import to_dict
    from fovea.methods.dino import DINO
    run_cfg = load_config(None, ["model.arch=vit_tiny", "model.depth=1", "model.embed_dim=48", "model.num_heads=3",
                                 "model.patch_size=4", "model.img_size=16", "dino.out_dim=32", "dino.hidden_dim=40",
                                 "dino.bottleneck_dim=16", "dino.use_bn=true", "ibot.enabled=true",
                                 "ibot.separate_head=false"])
    torch.manual_seed(1)
    run = DINO(run_cfg)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"config": to_dict(run_cfg), "model": run.state_dict()}, tmp_path / "run" / "checkpoints" / "last.pt")
    cfg = load_config(None, STUDENT + [f"distill.teacher={tmp_path / 'run'}", "distill.target=heads"])
    m = Distill(cfg).train()
    assert set(m.terms) == {"dino", "ibot"}  # the run's shared head teaches the patches too
    assert m.frozen.patch_head is m.frozen.head and m.student.shared_head
    assert torch.equal(m.frozen.head.last_layer.weight_v, run.teacher.head.last_layer.weight_v)
    assert any(isinstance(x, torch.nn.BatchNorm1d) and x.training for x in m.frozen.head.modules())
    loss, logs = m.training_step(_batch(), SV_HEADS)
    assert torch.isfinite(loss) and "loss/ibot" in logs


def test_heads_target_needs_heads(tmp_path: Path) -> None:
    cfg = load_config(None, STUDENT + [f"distill.teacher={teacher_folder(tmp_path)}", "distill.target=heads"])
    with pytest.raises(ValueError, match="has no DINO head"):
        Distill(cfg)
    folder, _ = teacher_with_heads(tmp_path / "b", ibot=False)  # DINO head only: the DINO term alone
    m = Distill(load_config(None, STUDENT + [f"distill.teacher={folder}", "distill.target=heads"]))
    assert set(m.terms) == {"dino"}
