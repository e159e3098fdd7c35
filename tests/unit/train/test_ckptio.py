"""Checkpoint formats in one process: FSDP over a process group of one rank (gloo) trains as the plain
model does, and full checkpoints cross between the layouts (optimizer states keyed by index or by name)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.distributed as dist
from helpers import TINY_MODEL

from fovea.config.loader import load_config
from fovea.core.checkpoint import load_checkpoint
from fovea.core.distributed import DistInfo
from fovea.methods.registry import spec_for
from fovea.train.ckptio import by_name, load_full, save_full
from fovea.train.plan import make_plan, resolve_auto
from fovea.train.sharding import fsdp_modules, full_state
from fovea.train.step import Stepper, build_stepper

ARGS = [*TINY_MODEL, "dino.use_bn=false", "model.drop_path_rate=0", "optim.warmup_epochs=0", "data.batch_size=8",
        "optim.freeze_last_layer_epochs=0", "ibot.enabled=true", "ibot.separate_head=true", "ibot.out_dim=32"]


@pytest.fixture
def one_rank_group(tmp_path: Path) -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _stepper(extra: list[str] = ()) -> Stepper:  # type: ignore[assignment]
    cfg = resolve_auto(load_config("dino_vittiny_fmnist", [*ARGS, *extra]), 1024, 1)
    st = build_stepper(cfg, make_plan(cfg, 1024, 1), torch.device("cpu"), DistInfo())
    st.method.train()
    return st


def _train(st: Stepper, steps: range) -> list[float]:
    out = []
    for step in steps:
        st.cfg.train.seed = step
        out.append(st.step(spec_for(st.cfg.method).synthetic_batch(st.cfg, torch.device("cpu")), st.values(step))
                   ["loss/total"])
    st.cfg.train.seed = 0
    return out


def _state(st: Stepper) -> dict[str, torch.Tensor]:
    sd = full_state(st.method) if fsdp_modules(st.method) else st.method.state_dict()
    return {k: v.detach().clone() for k, v in sd.items()}


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=tol, rtol=0), k


def test_fsdp_trains_as_the_plain_model_and_checkpoints_cross(one_rank_group: None, tmp_path: Path) -> None:
    plain, sharded = _stepper(), _stepper(["train.strategy=fsdp"])
    assert sharded.fsdp and not plain.fsdp and len(fsdp_modules(sharded.method)) > 4
    lp, ls = _train(plain, range(3)), _train(sharded, range(3))
    assert ls == pytest.approx(lp, abs=1e-6) and abs(lp[2] - lp[0]) > 1e-4
    _assert_close(_state(plain), _state(sharded))
    # the sharded run's gathered last.pt (optimizer keyed by name) resumes in a plain process, and the reverse
    run_state = {"step": 3}
    save_full(sharded.method, sharded.optimizer, run_state, tmp_path / "fsdp.pt", DistInfo(), None)
    save_full(plain.method, plain.optimizer, run_state, tmp_path / "plain.pt", DistInfo(), None)
    from_fsdp, from_plain = load_checkpoint(tmp_path / "fsdp.pt"), load_checkpoint(tmp_path / "plain.pt")
    assert all(isinstance(k, str) for k in from_fsdp["optimizer"]["state"])
    assert all(isinstance(k, int) for k in from_plain["optimizer"]["state"])
    a, b = _stepper(), _stepper(["train.strategy=fsdp"])
    load_full(a.method, a.optimizer, from_fsdp)
    load_full(b.method, b.optimizer, from_plain)  # index-keyed optimizer state into the sharded layout
    ref = _train(plain, range(3, 5))
    assert _train(a, range(3, 5)) == pytest.approx(ref, abs=1e-6)
    assert _train(b, range(3, 5)) == pytest.approx(ref, abs=1e-6)
    _assert_close(_state(plain), _state(a))
    _assert_close(_state(plain), _state(b))


def test_optimizer_state_by_name_loads_as_the_index_keyed_one() -> None:
    src = _stepper()
    _train(src, range(2))
    osd = copy.deepcopy(src.optimizer.state_dict())  # load_state_dict keeps the given tensors: no aliasing
    named = by_name(osd, src.method.student, src.optimizer)
    assert len(named["state"]) == len(osd["state"]) and all(isinstance(k, str) for k in named["state"])
    dst = _stepper()
    load_full(dst.method, dst.optimizer, {"model": copy.deepcopy(src.method.state_dict()), "optimizer": named})
    got = dst.optimizer.state_dict()
    for i, st in osd["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(got["state"][i][key], st[key]), (i, key)
    assert _train(dst, range(2, 4)) == pytest.approx(_train(src, range(2, 4)), abs=1e-7)
