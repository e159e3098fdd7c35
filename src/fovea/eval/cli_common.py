"""What the ``fovea eval`` commands share: the options that load and run a frozen backbone, and the
evaluation :class:`~fovea.eval.suite.Suite` built from parsed arguments."""
from __future__ import annotations

import argparse


def add_backbone_options(p: argparse.ArgumentParser, workers: int = 0) -> None:
    """--which, --batch-size, --workers and --device: how a command loads and runs a frozen backbone."""
    p.add_argument("--which", choices=["teacher", "student"], default="teacher",
                   help="which backbone of a training checkpoint")
    p.add_argument("--batch-size", type=int, default=256, help="feature-extraction batch size")
    p.add_argument("--workers", type=int, default=workers, help="data-loading worker processes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _spec(s: str | None) -> dict | None:
    from fovea.data.specs import parse_source_spec
    return parse_source_spec(s) if s else None


def make_suite(args: argparse.Namespace):
    """Build a :class:`fovea.eval.suite.Suite` from parsed arguments."""
    from fovea.eval.suite import Suite, SuiteOptions
    g = lambda k, d=None: getattr(args, k, d)  # noqa: E731
    opts = SuiteOptions(train=_spec(g("train")), test=_spec(g("test")), ood=_spec(g("ood")),
                        seg_train=g("seg_train", "") or "", seg_test=g("seg_test", "") or "",
                        pictures=_spec(g("pictures")), size=g("size", 0) or 0, seg_size=g("seg_size", 0) or 0,
                        pictures_size=g("pictures_size", 0) or 0, limit_train=g("limit_train", 0) or 0,
                        limit_test=g("limit_test", 0) or 0, which=args.which, batch_size=args.batch_size,
                        workers=args.workers, device=args.device, cache=not g("no_cache", False),
                        progress=not args.json, seed=args.seed)
    return Suite(args.checkpoint, opts)
