"""DINOv2 end-to-end on tiny models: 2 ranks (gloo) == 1 process with iBOT + Sinkhorn-Knopp, exact
resume across the high-resolution phase switch. Both marked slow (about a minute each): -m slow."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import TINY, rows, run_cli, run_torchrun

V2 = ["method=dinov2", "dino.centering=sinkhorn", "ibot.enabled=true", "ibot.out_dim=32", "ibot.mask_prob=0.7",
      "model.layerscale_init=1e-5", "dino.use_bn=false"]


def base(data: Path, out: Path) -> list[str]:
    return ["dino_vittiny_fmnist", *TINY, *V2, f"output_dir={out}", "data.train.kind=folder",
            f"data.train.path={data}", "data.eval_train=null", "data.eval_test=null"]


@pytest.mark.slow
def test_dinov2_two_ranks_match_one_process(folder: Path, tmp_path: Path) -> None:
    # KoLeo is per rank by definition (nearest neighbour within the rank's batch): off here.
    steps = ["optim.max_steps=3", "train.checkpoint_every_steps=100", "koleo.weight=0"]
    run_cli(base(folder, tmp_path / "one") + ["data.batch_size=8", *steps])
    run_torchrun(base(folder, tmp_path / "two") + ["data.batch_size=4", *steps])
    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for s in one:
        for key in ("loss/dino", "loss/ibot", "loss/total"):
            assert two[s][key] == pytest.approx(one[s][key], abs=1e-4), (s, key)
    assert one[1]["loss/ibot"] > 0 and abs(one[3]["loss/total"] - one[1]["loss/total"]) > 1e-4


@pytest.mark.slow
def test_highres_phase_runs_and_resumes_exactly(folder: Path, tmp_path: Path) -> None:
    # 6 steps, the last 2 at 24/12 px instead of 16/8; a checkpoint at step 4 (just before the switch)
    common = base(folder, tmp_path / "a") + ["data.batch_size=8", "optim.max_steps=6", "koleo.weight=0.1",
                                              "highres.steps=2", "highres.global_size=24", "highres.local_size=12",
                                              "train.checkpoint_every_steps=4"]
    run_cli(common)
    ref = rows(tmp_path / "a")
    assert sorted(ref) == list(range(1, 7))
    # resume from the step-4 checkpoint: steps 5-6 (the high-res phase) give the same losses
    ck = tmp_path / "a" / "checkpoints"
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    (tmp_path / "b" / "checkpoints" / "last.pt").write_bytes((ck / "step_00000004.pt").read_bytes())
    (tmp_path / "b" / "metrics.jsonl").write_text(
        "".join(json.dumps(ref[s]) + "\n" for s in range(1, 5)))
    run_cli([a.replace(str(tmp_path / "a"), str(tmp_path / "b")) for a in common])
    got = rows(tmp_path / "b")
    for s in (5, 6):
        assert got[s]["loss/total"] == pytest.approx(ref[s]["loss/total"], abs=1e-6)
