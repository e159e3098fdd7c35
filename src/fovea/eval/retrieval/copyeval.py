"""The run of ``fovea eval copydetect`` (see :mod:`fovea.eval.retrieval.copydetect` for the protocol)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fovea.errors import ConfigError
from fovea.eval.plugin import EvalContext
from fovea.eval.retrieval.data import load_copydays
from fovea.eval.retrieval.descriptors import DescriptorSpec, ImageList, describe, pca_whitening
from fovea.eval.retrieval.metrics import cosine_ranks, single_positive_ap


def image_source(spec: str, what: str, limit: int, seed: int) -> Any:
    """The image source of ``spec``: a plain folder path, or any fovea source spec (``folder:DIR``,
    ``parquet:FILE``, ``manifest:DIR``...); ``limit`` > 0 keeps a fixed random subset."""
    from fovea.data.specs import SpecError, source_from_spec
    s = f"folder:{spec}" if Path(spec).is_dir() else spec
    try:
        return source_from_spec(s, limit=limit, seed=seed, what=what)
    except ConfigError:
        raise
    except (SpecError, OSError, ValueError) as e:
        raise ConfigError(f"{what} {spec!r}: {e}") from None


def _names(src: Any) -> list[str]:
    paths = getattr(src, "paths", None)
    if paths is not None:
        return [str(p) for p in paths]
    return [f"{getattr(src, 'name', 'source')}#{i}" for i in range(len(src))]


def _check(opts: dict[str, Any]) -> list[str]:
    for k in ("imsize", "pixel_size"):
        if int(opts[k]) < 1:
            raise ConfigError(f"--{k.replace('_', '-')} {opts[k]}: must be positive")
    for k in ("distractors_limit", "whiten_limit", "whiten_dim", "pictures"):
        if int(opts[k]) < 0:
            raise ConfigError(f"--{k.replace('_', '-')} {opts[k]}: must be 0 or more")
    if float(opts["gem_p"]) <= 0:
        raise ConfigError(f"--gem-p {opts['gem_p']}: must be positive")
    blocks = [b.strip().strip("/") for b in str(opts["blocks"]).split(",") if b.strip()]
    if not blocks:
        raise ConfigError("--blocks: name at least one query folder (strong)")
    return blocks


def evaluate(ctx: EvalContext, opts: dict[str, Any]) -> dict:
    """Describe originals, distractors, copies (and the whitening set), whiten, rank, score."""
    t0 = time.time()
    blocks = _check(opts)
    cd = load_copydays(opts["data"], blocks)
    dspec = str(opts["distractors"] or "")
    if not dspec and (cd.root / "distractors").is_dir():
        dspec = str(cd.root / "distractors")
    dsrc = None if dspec in ("", "none") else image_source(dspec, "--distractors", int(opts["distractors_limit"]),
                                                           ctx.seed)
    wspec = str(opts["whiten"] or "")
    wsrc = None if wspec in ("", "none") else image_source(wspec, "--whiten", int(opts["whiten_limit"]), ctx.seed)
    spec = DescriptorSpec(features=opts["features"], kind="cls+gem", gem_p=float(opts["gem_p"]),
                          pixel_size=int(opts["pixel_size"]))
    mode = "none" if spec.features == "pixels" else "square"
    kw: dict[str, Any] = {"mode": mode, "size": int(opts["imsize"]), "multiple": ctx.patch_size}

    orig_list = ImageList(cd.originals, **kw)
    orig, bad_o = describe(ctx, orig_list, spec, "originals")
    dis_list = ImageList(source=dsrc, **kw) if dsrc is not None else None
    dis, bad_d = describe(ctx, dis_list, spec, "distractors") if dis_list is not None else (orig[:0], [])
    q_list = ImageList(cd.queries, **kw)
    q, bad_q = describe(ctx, q_list, spec, "copies")
    t1 = time.time()
    bad_w: list[int] = []
    n_whiten = 0
    if wsrc is not None:
        w, bad_w = describe(ctx, ImageList(source=wsrc, **kw), spec, "whitening set")
        keep = torch.ones(len(w), dtype=torch.bool)
        keep[bad_w] = False
        n_whiten = int(keep.sum())
        if n_whiten < 2:
            raise ConfigError(f"--whiten {wspec}: {n_whiten} readable images, at least 2 are needed")
        mu, proj = pca_whitening(w[keep], int(opts["whiten_dim"]))

        def white(x: Tensor) -> Tensor:
            return (x - mu) @ proj
        orig, dis, q = white(orig), white(dis) if len(dis) else dis, white(q)
    t2 = time.time()
    db = F.normalize(torch.cat([orig, dis.reshape(-1, orig.shape[1])]), dim=1)
    valid = torch.ones(len(db), dtype=torch.bool)
    valid[bad_o] = False
    valid[[len(orig) + i for i in bad_d]] = False
    qkeep = [i for i in range(len(cd.queries)) if i not in set(bad_q)]
    if not qkeep:
        raise ConfigError(f"{opts['data']}: no readable query image")
    ranks = cosine_ranks(db, F.normalize(q[qkeep], dim=1), valid)
    positive = np.asarray([cd.positive[i] for i in qkeep], dtype=np.int64)
    aps = single_positive_ap(ranks, positive)
    qblocks = [cd.blocks[i] for i in qkeep]
    per_block = {b: round(100 * float(aps[[k for k, x in enumerate(qblocks) if x == b]].mean()), 2)
                 for b in blocks if b in qblocks}
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ranks_path, gnd_path = out / "copydetect_ranks.npy", out / "copydetect_gnd.json"
    np.save(ranks_path, ranks)
    db_names = [str(p) for p in cd.originals] + (_names(dsrc) if dsrc is not None else [])
    gnd_path.write_text(json.dumps({"database": db_names, "queries": [str(cd.queries[i]) for i in qkeep],
                                    "positive": positive.tolist(), "blocks": qblocks}))
    t3 = time.time()
    result: dict = {
        "mAP": round(100 * float(aps.mean()), 2), "per_block": per_block,
        "top1": round(100 * float((ranks[0] == positive).mean()), 2),
        "n_queries": len(qkeep), "n_originals": len(cd.originals), "n_distractors": len(dis),
        "n_whiten": n_whiten,
        "skipped": {"originals": len(bad_o), "queries": len(bad_q), "distractors": len(bad_d), "whiten": len(bad_w),
                    "files": [str(cd.originals[i]) for i in bad_o] + [str(cd.queries[i]) for i in bad_q]},
        "settings": {"features": spec.features, "gem_p": spec.gem_p, "imsize": int(opts["imsize"]),
                     "blocks": blocks, "distractors": dspec or "none", "whiten": wspec if wsrc is not None else "",
                     "whiten_dim": int(opts["whiten_dim"]), "pixel_size": spec.pixel_size,
                     "patch_size": ctx.patch_size, "data": str(opts["data"])},
        "ranks": str(ranks_path.resolve()), "gnd": str(gnd_path.resolve()),
    }
    pictures: list[str] = []
    if int(opts["pictures"]) > 0:
        from fovea.eval.retrieval.pictures import pick_queries, top_grid
        gnd = [{"ok": [int(p)], "junk": []} for p in positive]

        def db_image(i: int) -> np.ndarray | None:
            if i < len(orig_list):
                return orig_list.raw(i)
            return dis_list.raw(i - len(orig_list)) if dis_list is not None else None
        which = pick_queries(gnd, int(opts["pictures"]))
        path = top_grid(lambda k: q_list.raw(qkeep[k]), db_image, ranks, gnd, which, out / "copydetect_top5.png")
        pictures.append(str(path.resolve()))
    result["pictures"] = pictures
    result["seconds"] = {"describe": round(t1 - t0, 2), "whiten": round(t2 - t1, 2), "ranking": round(t3 - t2, 2),
                         "total": round(time.time() - t0, 2)}
    return result
