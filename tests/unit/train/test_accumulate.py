"""``train.accumulate``: micro-batches whose gradients add up to the whole batch's. Equal to one big batch
where every term is a mean over images with no batch statistics (DINO with its EMA centre, iBOT); not equal
where a term normalises over the batch (Sinkhorn-Knopp, KoLeo), as the README says."""
from __future__ import annotations

import pytest
import torch

from helpers import JEPA_TINY, TINY_MODEL, TINY_SD

from fovea.config.loader import load_config
from fovea.core.batch import split_batch
from fovea.methods.registry import spec_for
from fovea.train.plan import make_plan, resolve_auto
from fovea.train.step import build_stepper


def test_split_batch_keeps_every_layout() -> None:
    b = 6
    crops = [torch.arange(b).view(b, 1, 1, 1).expand(b, 3, 4, 4), torch.arange(b).view(b, 1, 1, 1) + 10]
    masks = torch.arange(2 * b).view(2 * b, 1).expand(2 * b, 5)  # rows: crop 1 of every image, then crop 2
    batch = {"crops": crops, "masks": masks, "skipped": 3, "tgt_idx": torch.arange(b * 2).view(b, 2)}
    parts = split_batch(batch, 3)
    assert [p["crops"][0][:, 0, 0, 0].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert [p["crops"][1][:, 0, 0, 0].tolist() for p in parts] == [[10, 11], [12, 13], [14, 15]]
    # the masks keep "crop 1 rows, then crop 2 rows" within each micro-batch
    assert [p["masks"][:, 0].tolist() for p in parts] == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]]
    assert [p["tgt_idx"].tolist() for p in parts][1] == [[4, 5], [6, 7]]
    assert [p["skipped"] for p in parts] == [3, 0, 0]
    assert split_batch(batch, 1)[0] is batch
    with pytest.raises(ValueError, match="does not split"):
        split_batch(batch, 4)


def _run(preset: str, overrides: list[str], steps: int = 3) -> tuple[list[float], dict[str, torch.Tensor]]:
    """``steps`` optimizer steps on the same synthetic batches; (total losses, student weights)."""
    cfg = load_config(preset, overrides)
    cfg = resolve_auto(cfg, 1024, 1)
    plan = make_plan(cfg, 1024, 1)
    st = build_stepper(cfg, plan, torch.device("cpu"))
    full = load_config(preset, [o for o in overrides if not o.startswith(("train.accumulate", "data.batch_size"))]
                       + ["data.batch_size=8"])
    spec = spec_for(cfg.method)
    st.method.train()
    out = []
    for step in range(steps):
        full.train.seed = step  # a different batch each step, the same in both arms
        batch = spec.synthetic_batch(full, torch.device("cpu"))
        out.append(st.step(batch, st.values(step))["loss/total"])
    return out, {k: v.detach().clone() for k, v in st.method.student.state_dict().items()}


DINO_PLAIN = [*TINY_MODEL, "dino.use_bn=false", "model.drop_path_rate=0", "optim.warmup_epochs=0",
              "optim.freeze_last_layer_epochs=0"]


@pytest.mark.parametrize("extra", [[], ["ibot.enabled=true", "ibot.separate_head=true", "ibot.out_dim=32"]],
                         ids=["dino", "dino+ibot"])
def test_accumulated_steps_equal_one_big_batch(extra: list[str]) -> None:
    big = _run("dino_vittiny_fmnist", DINO_PLAIN + extra + ["data.batch_size=8"])
    acc = _run("dino_vittiny_fmnist", DINO_PLAIN + extra + ["data.batch_size=4", "train.accumulate=2"])
    assert big[0] == pytest.approx(acc[0], rel=1e-5, abs=1e-6)
    for k, v in big[1].items():
        a = acc[1][k]
        if k.endswith("attn.qkv.bias"):  # the key bias gets no gradient (softmax is shift-invariant): AdamW turns
            d = v.shape[0] // 3           # its ~1e-10 round-off into lr-sized steps of either sign; leave it out
            v, a = torch.cat([v[:d], v[2 * d:]]), torch.cat([a[:d], a[2 * d:]])
        torch.testing.assert_close(a, v, rtol=1e-4, atol=1e-6, msg=k)


def test_batch_statistics_terms_differ_under_accumulation() -> None:
    """Sinkhorn-Knopp and KoLeo see each micro-batch on its own: the trajectory is not the big batch's."""
    big = _run("dinov2_vittiny_cifar10", TINY_SD + ["data.batch_size=8"], steps=2)
    acc = _run("dinov2_vittiny_cifar10", TINY_SD + ["data.batch_size=4", "train.accumulate=2"], steps=2)
    assert abs(big[0][0] - acc[0][0]) > 1e-4


def test_plan_counts_the_accumulated_batch() -> None:
    cfg = load_config("dino_vittiny_fmnist", ["data.batch_size=16", "train.accumulate=4"])
    plan = make_plan(cfg, 6400, 2)  # global batch 16 x 2 x 4 = 128 -> 50 steps per epoch
    assert plan.steps_per_epoch == 50
    one = make_plan(load_config("dino_vittiny_fmnist", ["data.batch_size=128"]), 6400, 1)
    assert plan.peak_lr == pytest.approx(one.peak_lr)  # the lr scales with the global batch


# ------------------------------------------------------------------ activation checkpointing, fp16, compile

def _steps(overrides: list[str], steps: int = 2) -> tuple[list[float], dict[str, torch.Tensor], dict]:
    cfg = resolve_auto(load_config("dino_vittiny_fmnist", overrides), 1024, 1)
    st = build_stepper(cfg, make_plan(cfg, 1024, 1), torch.device("cpu"))
    st.method.train()
    torch.manual_seed(5)  # the stream of stochastic depth
    out, logs = [], {}
    for step in range(steps):
        cfg.train.seed = step
        logs = st.step(spec_for(cfg.method).synthetic_batch(cfg, torch.device("cpu")), st.values(step))
        out.append(logs["loss/total"])
    return out, {k: v.detach().clone() for k, v in st.method.student.state_dict().items()}, logs


def test_activation_checkpointing_changes_nothing_but_memory() -> None:
    base = [*DINO_PLAIN, "data.batch_size=8", "model.drop_path_rate=0.3", "model.drop_path_mode=efficient"]
    plain = _steps(base)
    ckpt = _steps(base + ["train.activation_checkpointing=true"])
    assert plain[0] == ckpt[0]  # the stochastic-depth draws are replayed in the recomputation
    for k, v in plain[1].items():
        torch.testing.assert_close(ckpt[1][k], v, rtol=0, atol=0, msg=k)


def test_fp16_uses_a_gradient_scaler() -> None:
    base = [*DINO_PLAIN, "data.batch_size=8"]
    fp32 = _steps(base)
    fp16 = _steps(base + ["train.precision=fp16"])
    assert fp16[2]["amp_scale"] > 0 and all(torch.isfinite(torch.tensor(fp16[0])))
    assert fp16[0][0] == pytest.approx(fp32[0][0], rel=2e-2)  # float16 forward, same step


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_step() -> None:
    base = [*DINO_PLAIN, "data.batch_size=8"]
    eager = _steps(base)
    compiled = _steps(base + ["train.compile=true"])
    assert compiled[0] == pytest.approx(eager[0], rel=1e-4)
