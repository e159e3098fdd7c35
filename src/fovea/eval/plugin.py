"""The plug-in contract of the data-set protocols of the papers (retrieval, copy detection, video
propagation, keypoint correspondence, depth): each reads its data set's own on-disk layout, runs a
frozen backbone through :class:`EvalContext`, and returns one JSON-able result.

A protocol module defines ``PROTOCOL = PaperProtocol(...)``; :mod:`fovea.eval.protocols` lists the
modules, ``fovea eval NAME`` gets one sub-command per protocol (its options as declared) and
``fovea eval all`` the same options prefixed with ``--NAME-`` (``--retrieval-data``). Modules
import their heavy parts inside ``run`` so building the CLI stays cheap.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fovea.data.augment import IMAGENET_MEAN, IMAGENET_STD, normalize
from fovea.models.vit import Features, VisionTransformer


@dataclass(frozen=True)
class Option:
    """One command-line option of a protocol: ``flag`` without dashes ("imsize", "query-crop") and the
    keyword arguments of ``argparse.ArgumentParser.add_argument`` (type, default, help, choices...).
    The value reaches ``run`` under ``flag`` with dashes as underscores (``query_crop``)."""

    flag: str
    kwargs: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.flag.replace("-", "_")


@dataclass
class EvalContext:
    """What a protocol gets: the frozen backbone (eval mode, on ``device``), its preprocessing, and
    where to write files (``out_dir``: predictions, pictures)."""

    backbone: VisionTransformer
    device: torch.device
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    batch_size: int = 64
    workers: int = 0
    progress: bool = True
    out_dir: Path = Path(".")
    seed: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def patch_size(self) -> int:
        return int(self.backbone.patch_size)

    def to_input(self, imgs: np.ndarray | Tensor) -> Tensor:
        """uint8 RGB images [B, H, W, 3] (numpy or tensor; or one [H, W, 3]) -> normalised float
        [B, 3, H, W] on ``device``."""
        x = torch.as_tensor(np.ascontiguousarray(imgs) if isinstance(imgs, np.ndarray) else imgs)
        if x.ndim == 3:
            x = x[None]
        return normalize(x.permute(0, 3, 1, 2).contiguous().to(self.device), self.mean, self.std)

    @torch.no_grad()
    def features(self, x: Tensor) -> Features:
        """:meth:`VisionTransformer.forward_features` of a normalised batch [B, 3, H, W] (H, W multiples
        of the patch size): ``cls`` [B, D] or None, ``patches`` [B, h*w, D] after the final norm."""
        self.backbone.eval()
        return self.backbone.forward_features(x.to(self.device))

    @torch.no_grad()
    def patch_grid(self, x: Tensor) -> Tensor:
        """Last-block patch tokens after the final norm as a grid [B, h, w, D] (float32, on device)."""
        b, _, hh, ww = x.shape
        p = self.patch_size
        if hh % p or ww % p:
            raise ValueError(f"input {hh}x{ww} px is not a multiple of the patch size {p}")
        return self.features(x).patches.float().reshape(b, hh // p, ww // p, -1)

    @torch.no_grad()
    def global_descriptor(self, x: Tensor) -> Tensor:
        """CLS token [B, D] (the mean patch token for a backbone without CLS), float32."""
        f = self.features(x)
        return (f.patches.mean(1) if f.cls is None else f.cls).float()


@dataclass(frozen=True)
class PaperProtocol:
    """A data-set protocol: ``run(ctx, opts) -> result`` (a JSON-able dict, figures in percent unless
    the unit is metres), ``headline(result) -> {"metric": value}`` (flat, for report.md's table and
    the run's metrics log; keys without the protocol name), ``markdown(result) -> lines`` (its report
    section, pictures linked by file name relative to ``ctx.out_dir``) and ``summary(result) -> lines``
    (what the command prints without ``--json``)."""

    name: str
    help: str
    description: str
    options: tuple[Option, ...]
    run: Callable[[EvalContext, dict[str, Any]], dict]
    headline: Callable[[dict], dict[str, float]]
    markdown: Callable[[dict], list[str]]
    summary: Callable[[dict], list[str]]
    #: flag of the option that names the data set (required by the sub-command; in ``eval all`` the
    #: protocol runs when ``--NAME-DATA`` is given)
    data_flag: str = "data"


def load_protocol(module: str) -> PaperProtocol:
    """The ``PROTOCOL`` of ``module`` (a dotted path)."""
    proto = getattr(importlib.import_module(module), "PROTOCOL")
    if not isinstance(proto, PaperProtocol):
        raise TypeError(f"{module}.PROTOCOL is not a PaperProtocol")
    return proto
