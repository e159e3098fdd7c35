"""The run of ``fovea eval retrieval`` (see :mod:`fovea.eval.retrieval.protocol` for the protocol)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fovea.errors import ConfigError
from fovea.eval.plugin import EvalContext
from fovea.eval.retrieval.data import RetrievalSet, load_retrieval
from fovea.eval.retrieval.descriptors import MULTISCALE, DescriptorSpec, ImageList, describe
from fovea.eval.retrieval.metrics import cosine_ranks, revisited_setups, score_setups


def check_options(opts: dict[str, Any]) -> None:
    """Refuse bad option values before any work."""
    if int(opts["imsize"]) < 1:
        raise ConfigError(f"--imsize {opts['imsize']}: must be a positive number of pixels")
    if float(opts["gem_p"]) <= 0:
        raise ConfigError(f"--gem-p {opts['gem_p']}: must be positive")
    if int(opts["pixel_size"]) < 1:
        raise ConfigError(f"--pixel-size {opts['pixel_size']}: must be positive")
    if int(opts["pictures"]) < 0:
        raise ConfigError(f"--pictures {opts['pictures']}: must be 0 or more")


def setups_of(rs: RetrievalSet) -> dict[str, list[dict]]:
    """{setup: per-query {"ok", "junk"}}: Easy / Medium / Hard for a revisited set, "medium" alone for a
    user's set."""
    return revisited_setups(rs.gnd) if rs.revisited else {"medium": rs.gnd}


def spec_of(opts: dict[str, Any]) -> DescriptorSpec:
    """The descriptor settings of the options."""
    return DescriptorSpec(features=opts["features"], kind=opts["descriptor"], gem_p=float(opts["gem_p"]),
                          scales=MULTISCALE if opts["multiscale"] else (1.0,), pixel_size=int(opts["pixel_size"]))


def evaluate(ctx: EvalContext, opts: dict[str, Any]) -> dict:
    """Describe queries (cropped to their bbx unless --query-crop false) and database, rank by cosine
    similarity, save the ranks, score every setup, draw the top-5 pictures."""
    t0 = time.time()
    check_options(opts)
    rs = load_retrieval(opts["data"])
    setups = setups_of(rs)
    if not any(len(g["ok"]) for gs in setups.values() for g in gs):
        raise ConfigError(f"--data {opts['data']}: no query has a positive image")
    crop = str(opts["query_crop"]).lower() == "true"
    spec = spec_of(opts)
    p, size = ctx.patch_size, int(opts["imsize"])
    mode = "none" if spec.features == "pixels" else "longer"
    boxes = rs.bbx if crop else None
    qlist = ImageList(rs.queries, boxes=boxes, mode=mode, size=size, multiple=p)
    q, bad_q = describe(ctx, qlist, spec, "query descriptors")
    if bad_q:
        b = boxes[bad_q[0]] if boxes is not None else None
        raise ConfigError(f"{rs.queries[bad_q[0]]}: unreadable query image"
                          + (f" (or its bbx {b} leaves under 2 px)" if b is not None else ""))
    t1 = time.time()
    dblist = ImageList(rs.database, mode=mode, size=size, multiple=p)
    db, bad_db = describe(ctx, dblist, spec, "database descriptors")
    t2 = time.time()
    valid = torch.ones(len(rs.database), dtype=torch.bool)
    valid[bad_db] = False
    ranks = cosine_ranks(F.normalize(db, dim=1), F.normalize(q, dim=1), valid)
    ranks_path = Path(opts["save_ranks"]) if opts["save_ranks"] else ctx.out_dir / "ranks.npy"
    if ranks_path.suffix != ".npy":
        ranks_path = ranks_path.with_name(ranks_path.name + ".npy")  # what np.save would write
    ranks_path.parent.mkdir(parents=True, exist_ok=True)
    np.save(ranks_path, ranks)
    result: dict = score_setups(ranks, setups)
    t3 = time.time()
    result.update({
        "set": rs.kind, "n_queries": len(rs.queries), "n_db": len(rs.database),
        "skipped": {"database": len(bad_db), "files": [str(rs.database[i]) for i in bad_db]},
        "settings": {"features": spec.features, "descriptor": spec.kind, "gem_p": spec.gem_p, "imsize": size,
                     "multiscale": bool(opts["multiscale"]), "query_crop": crop, "pixel_size": spec.pixel_size,
                     "patch_size": p, "data": str(opts["data"])},
        "ranks": str(ranks_path.resolve()),
    })
    pictures: list[str] = []
    if int(opts["pictures"]) > 0:
        from fovea.eval.retrieval.pictures import pick_queries, top_grid
        medium = setups["medium"]
        which = pick_queries(medium, int(opts["pictures"]))
        if which:
            qraw = ImageList(rs.queries, boxes=boxes, mode="none")
            path = top_grid(qraw.raw, dblist.raw, ranks, medium, which, ctx.out_dir / "retrieval_top5.png")
            pictures.append(str(path.resolve()))
    result["pictures"] = pictures
    result["seconds"] = {"queries": round(t1 - t0, 2), "database": round(t2 - t1, 2),
                         "ranking": round(t3 - t2, 2), "total": round(time.time() - t0, 2)}
    return result
