"""Distributed evaluation: two gloo ranks share the feature extraction and rank 0 gets the bank a single
process computes (same rows, same order), and the k-NN figures with it."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import free_port

from fovea.data.sources import SourceConfig, build_source
from fovea.models.vit import ViTConfig, VisionTransformer


def _model() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(arch="vit_tiny", depth=1, embed_dim=24, num_heads=2, patch_size=8,
                                       img_size=24)).eval()


def _rank(rank: int, world: int, port: int, folder: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from fovea.eval.bank import extract_bank_sharded
        from fovea.eval.knn import evaluate_knn_sharded
        src = build_source(SourceConfig(kind="folder", path=folder))
        bank = extract_bank_sharded(_model(), src, 24, torch.device("cpu"), n_last=2, batch_size=5, progress=False)
        knn = evaluate_knn_sharded(_model(), src, src, [1, 5], 0.07, ["cls", "mean_patch"], 24, torch.device("cpu"),
                                   batch_size=7, num_workers=0, progress=False)
        assert (bank is None) == (rank != 0) and (knn is None) == (rank != 0)
        if rank == 0:
            torch.save({"bank": bank.state(), "knn": knn}, out)
    finally:
        dist.destroy_process_group()


def test_two_ranks_extract_the_single_process_bank(folder: Path, tmp_path: Path) -> None:
    from fovea.eval.bank import extract_bank
    from fovea.eval.knn import evaluate_knn
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank, args=(2, free_port(), str(folder), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=False)
    src = build_source(SourceConfig(kind="folder", path=str(folder)))
    want = extract_bank(_model(), src, 24, torch.device("cpu"), n_last=2, batch_size=5, progress=False)
    assert len(src) == 48 and got["bank"]["labels"].tolist() == want.labels.tolist()
    for key in ("cls", "mean_patch", "registers"):
        torch.testing.assert_close(got["bank"][key], getattr(want, key), rtol=1e-5, atol=1e-6)
    one = evaluate_knn(_model(), src, src, [1, 5], 0.07, ["cls", "mean_patch"], 24, torch.device("cpu"),
                       batch_size=7, num_workers=0, progress=False)
    assert got["knn"]["features"] == one["features"] and got["knn"]["n_train"] == 48
