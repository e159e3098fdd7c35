"""``fovea eval depth``: check the NYU folder, train the linear depth probe on the train split's frozen features,
score the test split (METHODS.md section 6b), write the head, predictions and pictures."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fovea.errors import ConfigError
from fovea.eval.depth.data import Pair, check_split, parse_spec, read_depth
from fovea.eval.depth.metrics import METRICS, average_metrics, image_metrics
from fovea.eval.depth.probe import LINEAR_EPS, UPSAMPLE, DepthHead, feature_dim, probe_blocks, train_head
from fovea.eval.depth.store import CACHE_LIMIT, SplitStore
from fovea.eval.plugin import EvalContext

NYU_SIZE = (480, 640)


def _flag(v: Any, name: str) -> bool:
    s = str(v).lower()
    if s in ("true", "1", "yes"):
        return True
    if s in ("false", "0", "no"):
        return False
    raise ConfigError(f"--{name} {v!r}: expected true or false")


def check_options(opts: dict[str, Any]) -> dict[str, Any]:
    """The validated settings (ConfigError naming the option otherwise)."""
    s = {k: opts[k] for k in ("probe", "bins", "min_depth", "max_depth", "bin_norm", "size", "epochs", "lr",
                              "weight_decay", "probe_batch", "features", "pictures")}
    s["eigen_crop"] = str(opts["eigen_crop"]).lower()
    if s["eigen_crop"] not in ("auto", "true", "false"):
        raise ConfigError(f"--eigen-crop {opts['eigen_crop']!r}: expected auto, true or false")
    s["flip"] = _flag(opts["flip"], "flip")
    s["cache"] = str(opts["cache"]).lower()
    if s["cache"] not in ("auto", "true", "false"):
        raise ConfigError(f"--cache {opts['cache']!r}: expected auto, true or false")
    s["baselines"] = _flag(opts["baselines"], "baselines")
    if s["probe"] not in ("lin1", "lin4"):
        raise ConfigError(f"--probe {s['probe']!r}: expected lin1 or lin4")
    if s["bin_norm"] not in ("linear", "softmax"):
        raise ConfigError(f"--bin-norm {s['bin_norm']!r}: expected linear or softmax")
    if s["features"] not in ("backbone", "pixels"):
        raise ConfigError(f"--features {s['features']!r}: expected backbone or pixels")
    if not 0 < s["min_depth"] < s["max_depth"]:
        raise ConfigError(f"--min-depth {s['min_depth']} / --max-depth {s['max_depth']}: need 0 < min < max")
    for k, lo in (("bins", 2), ("epochs", 1), ("probe_batch", 1), ("size", 0), ("pictures", 0)):
        if s[k] < lo:
            raise ConfigError(f"--{k.replace('_', '-')} {s[k]}: must be at least {lo}")
    if s["lr"] <= 0 or s["weight_decay"] < 0:
        raise ConfigError(f"--lr {s['lr']} / --weight-decay {s['weight_decay']}: need lr > 0, weight decay >= 0")
    return s


def _crop(setting: str, shape: tuple[int, int]) -> bool:
    """Eigen crop for a label of ``shape``: auto -> only at 480x640; true -> always (scaled to other sizes)."""
    return setting == "true" or (setting == "auto" and tuple(shape) == NYU_SIZE)


class _Baselines:
    """The train-set mean depth as a constant and the per-pixel mean depth map (at the first train label's
    size, resized bilinearly to other sizes; pixels never valid take the mean depth), scored like the probe."""

    def __init__(self, labels: list[np.ndarray], min_d: float, max_d: float) -> None:
        shape = labels[0].shape
        tot = np.zeros(shape, np.float64)
        cnt = np.zeros(shape, np.float64)
        for d in labels:
            if d.shape != shape:
                import cv2
                d = cv2.resize(d, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
            v = (d > min_d) & (d <= max_d)
            tot += np.where(v, d, 0)
            cnt += v
        self.mean = float(tot.sum() / max(cnt.sum(), 1))
        self.map = np.where(cnt > 0, tot / np.maximum(cnt, 1), self.mean).astype(np.float32)
        self.scores: dict[str, list[dict[str, float]]] = {"mean_depth": [], "mean_map": []}

    def score(self, gt: np.ndarray, min_d: float, max_d: float, crop: bool) -> None:
        import cv2
        m = self.map if self.map.shape == gt.shape else cv2.resize(self.map, (gt.shape[1], gt.shape[0]))
        for name, pred in (("mean_depth", np.full_like(gt, self.mean)), ("mean_map", m)):
            r = image_metrics(pred, gt, min_d, max_d, crop)
            if r is not None:
                self.scores[name].append(r)

    def result(self) -> dict[str, Any]:
        return {"train_mean_depth": self.mean, **{k: average_metrics(v) for k, v in self.scores.items()}}


def _save_head(head: DepthHead, out_dir: Path, info: dict[str, Any]) -> tuple[str, str]:
    from safetensors.torch import save_file
    out_dir.mkdir(parents=True, exist_ok=True)
    st, js = out_dir / "depth_head.safetensors", out_dir / "depth_head.json"
    state = {k: v.detach().cpu().contiguous() for k, v in
             (("weight", head.conv.weight), ("bias", head.conv.bias), ("bins", head.bins)) if v is not None}
    save_file(state, str(st))
    js.write_text(json.dumps(info, indent=1) + "\n")
    return str(st.resolve()), str(js.resolve())


def run(ctx: EvalContext, opts: dict[str, Any]) -> dict:
    """See :mod:`fovea.eval.depth.protocol` for the options and the result."""
    t0 = time.time()
    s = check_options(opts)
    root = parse_spec(str(opts["data"]))
    if not root.is_dir():
        raise ConfigError(f"{root}: no such folder (--data nyu:DIR)")
    train, skip_train = check_split(root, "train")
    test, skip_test = check_split(root, "test")
    if not train or not test:
        raise ConfigError(f"{root}: no readable {'train' if not train else 'test'} image")
    pred_dir = Path(opts["save_predictions"]) if opts.get("save_predictions") else None
    if pred_dir is not None:
        try:
            pred_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--save-predictions {pred_dir}: cannot create the folder ({e})") from None
    bb = ctx.backbone
    blocks = probe_blocks(s["probe"], int(bb.depth))
    channels = feature_dim(bb, s["probe"], s["features"])
    min_d, max_d = float(s["min_depth"]), float(s["max_depth"])

    store = SplitStore(ctx, train, s["size"], blocks, s["features"], s["flip"])
    cache = s["cache"] == "true" or (s["cache"] == "auto" and store.cache_bytes(channels) <= CACHE_LIMIT)
    t1 = time.time()
    if cache:
        store.build_cache(ctx.batch_size, ctx.progress)
        if not store.pairs:
            raise ConfigError(f"{root}: no train image decodes")
    t_feat = time.time() - t1
    head = DepthHead(channels, s["bins"], min_d, max_d, s["bin_norm"], ctx.seed).to(ctx.device)
    t1 = time.time()
    history = train_head(head, store.get, store.keys, s["epochs"], s["lr"], s["weight_decay"], s["probe_batch"],
                         s["flip"], ctx.seed, ctx.progress)
    t_train = time.time() - t1

    base = None
    if s["baselines"]:
        labels = [g.numpy() for g in store.labels] if store.labels is not None else \
            [read_depth(p.depth) for p in store.pairs]
        base = _Baselines(labels, min_d, max_d)

    t1 = time.time()
    test_store = SplitStore(ctx, test, s["size"], blocks, s["features"])
    per_image: list[dict[str, float]] = []
    no_valid: list[str] = []
    pictures: list[str] = []
    shown = set(range(min(s["pictures"], len(test))))
    crops = 0
    from fovea.eval.depth.pictures import depth_panel
    from fovea.eval.depth.metrics import valid_mask
    with torch.no_grad():
        for idx, imgs, deps, f in test_store.iter_batches(ctx.batch_size, ctx.progress, "depth test"):
            preds = head(f, (deps.shape[1], deps.shape[2])).float().cpu().numpy()
            for j, i in enumerate(idx):
                pair: Pair = test_store.pairs[i]
                crop = _crop(s["eigen_crop"], pair.size)
                crops += crop
                r = image_metrics(preds[j], deps[j], min_d, max_d, crop)
                if r is None:
                    no_valid.append(pair.rel)
                else:
                    per_image.append(r)
                if base is not None:
                    base.score(deps[j], min_d, max_d, crop)
                if pred_dir is not None:
                    dst = pred_dir / (pair.name + ".npy")
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    np.save(dst, preds[j].astype(np.float32))
                if i in shown:
                    v = valid_mask(deps[j], min_d, max_d, crop)
                    pic = ctx.out_dir / "depth_pictures" / f"{len(pictures):02d}_{pair.name.replace('/', '_')}.png"
                    pictures.append(str(depth_panel(imgs[j], deps[j], preds[j], v, pic).resolve()))
    t_test = time.time() - t1

    p = ctx.patch_size
    settings = {**s, "data": str(opts["data"]), "cache": cache, "blocks": [b + 1 for b in blocks],
                "channels": channels, "linear_eps": LINEAR_EPS, "upsample": UPSAMPLE,
                "bins_rule": "linspace(min_depth, max_depth, bins)", "optimizer": "AdamW, cosine decay to 0",
                "loss": "SigLoss sqrt(mean(g^2) - 0.85 mean(g)^2), no x10",
                "input_sizes": sorted({f"{h}x{w}" for h, w in test_store.in_sizes + store.in_sizes}),
                "grids": sorted({f"{h // p}x{w // p}" for h, w in test_store.in_sizes + store.in_sizes}),
                "eigen_cropped_test_images": crops, "seed": ctx.seed}
    info = {"settings": settings, "backbone": {"patch_size": p, "depth": int(bb.depth),
                                                "embed_dim": int(bb.embed_dim), "cls_token": bb.cls_token is not None},
            "train_loss": history}
    head_st, head_js = _save_head(head, ctx.out_dir, info)
    skipped = {"train": skip_train + store.skipped, "test": skip_test + test_store.skipped}
    res: dict[str, Any] = {**average_metrics(per_image)}
    res.update({"n_train": sum(q.rel not in set(store.skipped) for q in store.pairs), "n_test": len(test), "n_test_scored": len(per_image),
                "n_test_no_valid": len(no_valid), "no_valid": no_valid,
                "skipped": sum(len(v) for v in skipped.values()), "skipped_files": skipped,
                "settings": settings, "train_loss": history, "head": head_st, "head_settings": head_js,
                "predictions": str(pred_dir.resolve()) if pred_dir is not None else None, "pictures": pictures,
                "baselines": base.result() if base is not None else None, "seconds_features": t_feat,
                "seconds_train": t_train, "seconds_test": t_test, "seconds": time.time() - t0})
    return res


__all__ = ["run", "check_options", "METRICS"]
