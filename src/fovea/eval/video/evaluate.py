"""``run`` of the video protocol: check the DAVIS folder and the options, propagate every sequence's
first mask with the frozen backbone's patch features (or raw pixel patches), write the results in the
DAVIS layout under ``ctx.out_dir`` and score them as the davis2017 evaluator does."""
from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fovea.errors import ConfigError
from fovea.eval.plugin import EvalContext
from fovea.eval.video.data import (VOID, Sequence, check_results, load_davis, parse_spec, read_frame, read_labels,
                                   read_mask, write_mask)
from fovea.eval.video.metrics import FIGURES, boundary_tolerance, evaluate_sequence, object_figures, summarise
from fovea.eval.video.propagate import first_labels, frame_size, propagate_sequence, resize_frame, to_mask

#: at most this many patch tokens go through the backbone in one forward (CPU attention is quadratic)
MAX_TOKENS_PER_BATCH = 16384


def check_options(opts: dict[str, Any], patch: int) -> None:
    """Refuse option values that cannot work, before any file is read."""
    if opts["n_last_frames"] < 0:
        raise ConfigError(f"--n-last-frames {opts['n_last_frames']}: must be >= 0")
    if opts["topk"] < 1:
        raise ConfigError(f"--topk {opts['topk']}: must be >= 1")
    if opts["radius"] < 0:
        raise ConfigError(f"--radius {opts['radius']}: must be >= 0 (0: no window)")
    if not opts["temperature"] > 0:
        raise ConfigError(f"--temperature {opts['temperature']}: must be > 0")
    if opts["pictures"] < 0:
        raise ConfigError(f"--pictures {opts['pictures']}: must be >= 0")
    for flag in ("short_side", "size_multiple"):
        v = opts[flag]
        if v <= 0 or v % patch:
            raise ConfigError(f"--{flag.replace('_', '-')} {v}: must be a positive multiple of the patch size {patch} "
                              "(the resized frame must tile into patches)")


def frame_features(ctx: EvalContext, seq: Sequence, size: tuple[int, int], mode: str) -> Iterator[Tensor]:
    """L2-normalised features [h, w, D] of each frame of ``seq`` resized to ``size``, in order: the
    backbone's last-block patch tokens after the final norm (mode "model") or the normalised pixels of each
    patch flattened (mode "pixels", D = 3 p^2)."""
    p = ctx.patch_size
    tokens = (size[0] // p) * (size[1] // p)
    bs = max(1, min(ctx.batch_size, MAX_TOKENS_PER_BATCH // tokens))
    for b0 in range(0, len(seq.frames), bs):
        imgs = np.stack([resize_frame(read_frame(f), size) for f in seq.frames[b0:b0 + bs]])
        x = ctx.to_input(imgs)
        if mode == "pixels":
            g = F.unfold(x.float(), p, stride=p).transpose(1, 2).reshape(len(x), size[0] // p, size[1] // p, -1)
        else:
            g = ctx.patch_grid(x)
        g = F.normalize(g.float(), dim=-1)
        yield from g


def predict_sequence(ctx: EvalContext, seq: Sequence, size: tuple[int, int], opts: dict[str, Any], out: Path,
                     bar: Any = None) -> int:
    """Propagate the first mask of ``seq`` over its frames, writing ``out/<seq>/<frame>.png``; -> frames written."""
    m0 = read_mask(seq.annotations[0])
    m0 = np.where(m0 == VOID, 0, m0).astype(np.uint8)
    write_mask(out / seq.name / seq.result_name(seq.frames[0]), m0, seq.palette)
    first = first_labels(m0, size, ctx.patch_size, seq.n_objects + 1).to(ctx.device)
    feats = frame_features(ctx, seq, size, opts["features"])
    with torch.no_grad():
        soft_iter = propagate_sequence(feats, first, opts["n_last_frames"], opts["topk"], opts["radius"],
                                       opts["temperature"])
        for f, soft in zip(seq.frames[1:], soft_iter):
            write_mask(out / seq.name / seq.result_name(f), to_mask(soft, ctx.patch_size, seq.height, seq.width),
                       seq.palette)
            if bar is not None:
                bar.update(1)
    return len(seq.frames)


def score(seqs: list[Sequence], pred_dir: Path) -> tuple[dict[str, dict[str, float]], int, list[str]]:
    """Per-object figures (fractions) of the results under ``pred_dir`` -> (per_object, frames scored per
    object summed, names of sequences with fewer than 3 annotated frames: nothing to score)."""
    per_object: dict[str, dict[str, float]] = {}
    n_scored, unscored = 0, []
    for s in seqs:
        if len(s.annotations) < 3:
            unscored.append(s.name)
            continue
        gt = read_labels(s.annotations)
        pred = read_labels([pred_dir / s.name / a.name for a in s.annotations])
        try:
            res = evaluate_sequence(gt, pred, s.n_objects, VOID)
        except ValueError as e:
            raise ConfigError(f"{pred_dir / s.name}: {e}") from None
        for k, v in res.items():
            per_object[f"{s.name}_{k}"] = object_figures(v)
            n_scored += len(v["J"])
    return per_object, n_scored, unscored


def _pct(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) else round(100.0 * v, 4)


def run(ctx: EvalContext, opts: dict[str, Any]) -> dict:
    """The video protocol (see :mod:`fovea.eval.video.protocol`)."""
    from tqdm import tqdm
    t0 = time.time()
    p = ctx.patch_size
    check_options(opts, p)
    root = parse_spec(opts["data"])
    score_only = bool(opts.get("score_only"))
    pred_dir = Path(ctx.out_dir)
    seqs = load_davis(root, opts["split"], check_frames=not score_only)
    sizes = {s.name: frame_size(s.height, s.width, opts["short_side"], opts["size_multiple"]) for s in seqs}
    for s in seqs:
        if min(sizes[s.name]) < p:
            raise ConfigError(f"{s.frames[0]}: {s.width}x{s.height} frames resize to {sizes[s.name][1]}x"
                              f"{sizes[s.name][0]} with --short-side {opts['short_side']} --size-multiple "
                              f"{opts['size_multiple']}: smaller than one patch")
    if score_only:
        check_results(pred_dir, seqs)
    t_check = time.time() - t0
    n_frames = sum(len(s.frames) for s in seqs)
    t1 = time.time()
    if not score_only:
        with tqdm(total=n_frames - len(seqs), desc="video", disable=not ctx.progress) as bar:
            for s in seqs:
                predict_sequence(ctx, s, sizes[s.name], opts, pred_dir, bar)
    t_prop = time.time() - t1
    t2 = time.time()
    per_object, n_scored, unscored = score(seqs, pred_dir)
    glob = summarise(per_object) if per_object else {k: float("nan") for k in FIGURES}
    t_score = time.time() - t2
    pictures: list[str] = []
    t3 = time.time()
    if opts["pictures"] > 0:
        from fovea.eval.video.pictures import sequence_strip
        for s in seqs[:opts["pictures"]]:
            pictures.append(str(sequence_strip(s, pred_dir, pred_dir / f"video_{s.name}.png").resolve()))
    t_pic = time.time() - t3
    n_prop = 0 if score_only else n_frames - len(seqs)
    return {
        **{k: _pct(v) for k, v in glob.items()},
        "per_object": {name: {k: _pct(v) for k, v in o.items()} for name, o in per_object.items()},
        "n_sequences": len(seqs), "n_objects": len(per_object), "n_frames": n_frames,
        "n_frames_propagated": n_prop, "n_object_frames_scored": n_scored, "unscored_sequences": unscored,
        "skipped": 0, "score_only": score_only, "split": opts["split"], "data": str(root),
        "pred_dir": str(pred_dir.resolve()),
        "settings": {"features": opts["features"], "n_last_frames": opts["n_last_frames"], "topk": opts["topk"],
                     "radius": opts["radius"], "temperature": opts["temperature"],
                     "short_side": opts["short_side"], "size_multiple": opts["size_multiple"], "patch_size": p},
        "input_sizes": {s.name: list(sizes[s.name]) for s in seqs},
        "boundary_tolerance_px": sorted({boundary_tolerance(s.height, s.width) for s in seqs}),
        "pictures": pictures,
        "seconds": round(time.time() - t0, 2), "seconds_check": round(t_check, 2),
        "seconds_propagation": round(t_prop, 2), "seconds_scoring": round(t_score, 2),
        "seconds_pictures": round(t_pic, 2),
        "seconds_per_frame": round(t_prop / n_prop, 4) if n_prop else None,
    }
