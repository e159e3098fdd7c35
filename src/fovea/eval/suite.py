"""The evaluation suite of one backbone: loads it once, caches frozen features per run, and runs
each protocol (k-NN, linear, logreg, few-shot, OOD, dense, pictures) on request.

Sources are SourceConfig-like dicts (``{"kind": "parquet", "path": ...}``); missing train/test
sources default to the run's ``data.eval_train`` / ``data.eval_test``.
"""
from __future__ import annotations

from collections.abc import Sequence

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fovea.errors import ConfigError
from fovea.data.augment import IMAGENET_MEAN, IMAGENET_STD
from fovea.data.base import ImageSource
from fovea.data.specs import source_from_spec
from fovea.eval.bank import FeatureBank, cache_key, cached_bank, extract_bank
from fovea.hub.backbone import load_backbone


@dataclass
class SuiteOptions:
    """Data and extraction settings shared by the protocols (CLI flags of ``fovea eval``)."""

    train: dict | None = None  # labelled train source (None = run's data.eval_train)
    test: dict | None = None  # labelled test source (None = run's data.eval_test)
    ood: dict | None = None  # out-of-distribution source for `ood`
    seg_train: str = ""  # segmentation pairs: DIR (images/ + masks/) or IMAGES:MASKS
    seg_test: str = ""
    pictures: dict | None = None  # source of the picture grid (None = test source)
    size: int = 0  # input px of image-level protocols (0 = run's eval size)
    seg_size: int = 0  # input px of dense protocols (0 = size)
    pictures_size: int = 0  # input px of pictures (0 = size)
    limit_train: int = 0
    limit_test: int = 0
    which: str = "teacher"
    batch_size: int = 256
    workers: int = 0
    device: str = "auto"
    cache: bool = True
    progress: bool = True
    seed: int = 0
    extra: dict = field(default_factory=dict)  # per-protocol settings


def _source(fields: dict, limit: int = 0) -> ImageSource:
    return source_from_spec(None, fields, limit, what="an evaluation split")


class Suite:
    """One backbone (from a run folder, .pt or .safetensors) and its cached feature banks."""

    def __init__(self, checkpoint: str | Path, opts: SuiteOptions) -> None:
        self.opts = opts
        self.checkpoint = Path(checkpoint)
        self.backbone, self.meta = load_backbone(checkpoint, which=opts.which)
        self.run_dir = self.checkpoint if self.checkpoint.is_dir() else self.checkpoint.parent
        self.ckpt_file = self._ckpt_file()
        dev = opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(dev)
        self.backbone.to(self.device)
        data, crops = self.meta.get("data", {}) or {}, self.meta.get("crops", {}) or {}
        self.data = data
        self.size = opts.size or data.get("eval_size") or crops.get("global_size") or self.backbone.cfg.img_size
        self.mean = crops.get("mean") or list(IMAGENET_MEAN)
        self.std = crops.get("std") or list(IMAGENET_STD)
        self.cache_dir = self.run_dir / "eval" / "cache" if opts.cache else None
        self.timings: dict[str, float] = {}
        self._banks: dict[str, FeatureBank] = {}

    def _ckpt_file(self) -> Path:
        if self.checkpoint.is_dir():
            for c in (self.checkpoint / "checkpoints" / "last.pt", self.checkpoint / "backbone.safetensors"):
                if c.exists():
                    return c
        return self.checkpoint

    def source(self, role: str):
        """The image source of ``role`` (train, test, ood, pictures) with its limit applied."""
        o = self.opts
        spec = {"train": o.train, "test": o.test, "ood": o.ood, "pictures": o.pictures}[role]
        if spec is None and role in ("train", "test"):
            spec = self.data.get(f"eval_{role}")
            if not spec:
                raise ConfigError(f"no --{role} given and the checkpoint's config has no data.eval_{role}")
        if spec is None and role == "pictures":
            return self.source("test")
        if spec is None:
            raise ConfigError(f"the {role} protocol needs --{role} SPEC")
        return _source(spec, {"train": o.limit_train, "test": o.limit_test, "ood": o.limit_test}.get(role, 0))

    def bank(self, role: str) -> FeatureBank:
        """Frozen features of the ``role`` source (computed once, cached in RUN/eval/cache)."""
        if role in self._banks:
            return self._banks[role]
        src = self.source(role)
        t0 = time.time()
        key = cache_key(self.ckpt_file, self.opts.which, src, self.size, 4)
        bank, hit = cached_bank(self.cache_dir, key, lambda: extract_bank(
            self.backbone, src, self.size, self.device, 4, self.opts.batch_size, self.opts.workers, self.mean,
            self.std, self.opts.progress, f"{role} features"))
        self.timings[f"features_{role}"] = round(time.time() - t0, 1)
        if self.opts.progress:
            print(f"[fovea] {role} features: {len(bank)} images of {src.name} at {self.size}px"
                  f"{' (cached)' if hit else ''} [{self.timings[f'features_{role}']}s]", flush=True)
        self._banks[role] = bank
        return bank

    # ----------------------------------------------------------------- protocols
    def kind(self, kind: str) -> str:
        """``kind`` as this backbone can give it: without a CLS token (I-JEPA) ``cls`` and ``both``
        are the mean patch token, and are reported under that name (``@W`` widths kept)."""
        base, at, w = kind.partition("@")
        if base in ("cls", "both") and not self.bank("train").has_cls:
            return "mean_patch" + at + w
        return kind

    def knn(self, ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07,
            kinds: Sequence[str] = ("cls",), test_classes: list[int] | None = None,
            test_labels: str = "subset") -> dict:
        """{"features": {kind: {"k=K": top-1 %}}, "temperature"}; ``test_classes``: see
        :mod:`fovea.eval.subset`."""
        from fovea.eval.knn import knn_accuracy
        tr, te = self.bank("train"), self.bank("test")
        kinds = list(dict.fromkeys(self.kind(k) for k in kinds))
        res = {kind: {f"k={k}": a for k, a in knn_accuracy(tr.get(kind), tr.labels, te.get(kind), te.labels,
                                                            list(ks), temperature, test_classes, test_labels).items()}
               for kind in kinds}
        out = {"features": res, "temperature": temperature, "n_train": len(tr), "n_test": len(te)}
        return out if test_classes is None else {**out, "test_classes": len(test_classes)}

    def linear(self, epochs: int = 10, batch_size: int = 1024, val_fraction: float = 0.1,
               configs: list[str] | None = None, lrs: list[float] | None = None,
               test_classes: list[int] | None = None, test_labels: str = "subset") -> dict:
        """See :func:`fovea.eval.linear.linear_probe`."""
        from fovea.eval.linear import linear_probe
        return linear_probe(self.bank("train"), self.bank("test"), configs, lrs, epochs, batch_size, val_fraction,
                            self.opts.seed, self.opts.progress, test_classes, test_labels)

    def logreg(self, kind: str = "cls", cs: list[float] | None = None, sweep_limit: int = 10000,
               max_iter: int = 1000) -> dict:
        """See :func:`fovea.eval.logreg.logreg_eval`."""
        from fovea.eval.logreg import logreg_eval
        tr, te = self.bank("train"), self.bank("test")
        kind = self.kind(kind)
        return {**logreg_eval(tr.get(kind), tr.labels, te.get(kind), te.labels, cs, 0.1, sweep_limit, max_iter,
                              self.opts.seed), "features": kind}

    def fewshot(self, shots: Sequence[int] = (1, 5, 10), draws: int = 5, kind: str = "cls", c: float = 1.0) -> dict:
        """See :func:`fovea.eval.fewshot.fewshot_eval`."""
        from fovea.eval.fewshot import fewshot_eval
        tr, te = self.bank("train"), self.bank("test")
        kind = self.kind(kind)
        return {"shots": fewshot_eval(tr.get(kind), tr.labels, te.get(kind), te.labels, list(shots), draws, c,
                                      seed=self.opts.seed), "features": kind, "draws": draws, "C": c}

    def ood(self, ks: Sequence[int] = (1, 50), kind: str = "cls") -> dict:
        """k-th-NN OOD: bank = train, positives = test, negatives = the --ood source."""
        from fovea.eval.ood import ood_eval
        tr, te, oo = self.bank("train"), self.bank("test"), self.bank("ood")
        kind = self.kind(kind)
        return {"scores": ood_eval(tr.get(kind), te.get(kind), oo.get(kind), list(ks)), "features": kind,
                "n_id": len(te), "n_ood": len(oo)}

    def seg(self, methods: tuple[str, ...] = ("linear", "hummingbird"), epochs: int = 20, k: int = 30,
            temperature: float = 0.02, memory_size: int = 200_000, ignore_index: int = 255,
            num_classes: int = 0) -> dict:
        """Linear segmentation and HummingBird mIoU on the --seg-train / --seg-test pairs."""
        from fovea.data.segmentation import seg_source_from_spec
        from fovea.eval.dense import extract_dense, hummingbird, infer_num_classes, linear_segmentation
        if not (self.opts.seg_train and self.opts.seg_test):
            raise ConfigError("the seg protocol needs --seg-train and --seg-test (DIR with images/ + masks/)")
        size = self.opts.seg_size or self.size
        t0 = time.time()
        ftr, mtr = extract_dense(self.backbone, seg_source_from_spec(self.opts.seg_train), size, self.device,
                                 mean=self.mean, std=self.std, progress=self.opts.progress)
        fte, mte = extract_dense(self.backbone, seg_source_from_spec(self.opts.seg_test), size, self.device,
                                 mean=self.mean, std=self.std, progress=self.opts.progress)
        self.timings["features_seg"] = round(time.time() - t0, 1)
        c = num_classes or infer_num_classes(mtr, mte, ignore_index=ignore_index)
        out: dict = {"num_classes": c, "size": size, "n_train": len(ftr), "n_test": len(fte)}
        if "linear" in methods:
            out["linear"] = linear_segmentation(ftr, mtr, fte, mte, c, epochs, ignore_index=ignore_index,
                                                seed=self.opts.seed)
        if "hummingbird" in methods:
            out["hummingbird"] = hummingbird(ftr, mtr, fte, mte, c, k, temperature, memory_size, ignore_index,
                                             self.opts.seed)
        return out

    def pictures(self, out_dir: str | Path, n_images: int = 8, display: int = 128) -> dict:
        """PCA and attention PNG grids (see :func:`fovea.eval.pictures.make_pictures`)."""
        from fovea.eval.pictures import make_pictures
        size = self.opts.pictures_size or self.size
        return {**make_pictures(self.backbone, self.source("pictures"), out_dir, size, n_images, display,
                                self.device, self.mean, self.std, self.opts.seed), "size": size}

    def paper(self, name: str, out_dir: str | Path, settings: dict) -> dict:
        """Run the paper protocol ``name`` (:data:`fovea.eval.protocols.PAPER_PROTOCOLS`) with its option
        values ``settings``, writing its files into ``out_dir``."""
        from fovea.eval.plugin import EvalContext, load_protocol
        from fovea.eval.protocols import PAPER_PROTOCOLS
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        ctx = EvalContext(self.backbone, self.device, list(self.mean), list(self.std), self.opts.batch_size,
                          self.opts.workers, self.opts.progress, out.resolve(), self.opts.seed, self.meta)
        return load_protocol(PAPER_PROTOCOLS[name]).run(ctx, dict(settings))
