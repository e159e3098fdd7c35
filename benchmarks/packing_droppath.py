#!/usr/bin/env python
"""Packed vs unpacked multi-crop forward+backward, and efficient vs plain stochastic depth.

Times the student backbone of a preset on one step's crops (2 global + n_local local crops per
image, random pixels, iBOT masks on the global crops when the preset enables iBOT): forward through
``forward_features_list`` and backward of a scalar built from every crop's CLS and patch tokens.
Variants (the rows):

- ``unpacked``: crops of equal size concatenated, one backbone pass per crop size (the default on CPU);
- ``packed/segments``, ``packed/mask``, ``packed/njt``: one packed token sequence per step with
  block-diagonal attention (see fovea/models/packing.py); ``mask`` is skipped when its [T, T] scores
  would exceed ``--mask-limit-mib``;
- each of the above with stochastic depth at ``--drop-path`` (uniform over depth), ``plain`` (mask
  whole samples after computing the branch) and ``efficient`` (branch on a (1-p) subset).

Variants are interleaved round by round (``--steps`` rounds after ``--warmup``) so that load from
other processes affects them alike; the median and min of each are reported.

    python benchmarks/packing_droppath.py                                  # dinov2_vittiny_cifar10, CPU
    python benchmarks/packing_droppath.py dinov2_vits14_imagenette --device cuda --batch-size 32
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from fovea.config.loader import load_config
from fovea.masking.block import BlockMasker
from fovea.models.vit import VisionTransformer

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_crops(cfg, b: int, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Random normalised crops and (iBOT) masks of one step."""
    g = torch.Generator().manual_seed(0)
    c = cfg.crops
    xs = [torch.randn(b, 3, c.global_size, c.global_size, generator=g) for _ in range(2)]
    xs += [torch.randn(b, 3, c.local_size, c.local_size, generator=g) for _ in range(c.n_local)]
    masks: list[torch.Tensor | None] = [None] * len(xs)
    if cfg.ibot.enabled:
        mk = BlockMasker(c.global_size // cfg.model.patch_size, cfg.ibot.mask_prob, tuple(cfg.ibot.mask_ratio))
        m = torch.from_numpy(__import__("numpy").stack([mk(i) for i in range(b)]))  # [b, 2, Np]
        masks[0], masks[1] = m[:, 0], m[:, 1]
    return [x.to(device) for x in xs], [None if m is None else m.to(device) for m in masks]


def step(model: VisionTransformer, xs: list[torch.Tensor], masks: list, device: torch.device, bf16: bool) -> float:
    """One forward+backward; returns its wall time in seconds."""
    sync(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        outs = model.forward_features_list(xs, masks)
        loss = sum(o.cls.float().square().mean() + o.patches.float().mean()
                   for o in outs)
    loss.backward()
    sync(device)
    dt = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", nargs="?", default="dinov2_vittiny_cifar10", help="preset name or YAML path")
    ap.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    ap.add_argument("--batch-size", type=int, default=64, help="images per step (each gives 2 + n_local crops)")
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (every variant once per round)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--drop-path", type=float, default=0.4, help="stochastic-depth rate of the drop-path rows (0 = none)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = the preset's train.threads)")
    ap.add_argument("--impls", default="segments,mask,njt", help="packed attention implementations to time")
    ap.add_argument("--mask-limit-mib", type=float, default=512, help="skip packed/mask above this score size")
    ap.add_argument("--json", default="", help="results file (default benchmarks/results/packing_droppath_<preset>_<device>.json; none = skip)")
    args = ap.parse_args(argv)

    cfg = load_config(args.preset, args.overrides)
    threads = args.threads or cfg.train.threads
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(args.device)
    bf16 = device.type == "cuda" and cfg.train.precision != "fp32"
    xs, masks = make_crops(cfg, args.batch_size, device)
    tokens = sum(x.shape[0] * (1 + cfg.model.num_register_tokens + (x.shape[-1] // cfg.model.patch_size) ** 2)
                 for x in xs)
    heads = VisionTransformer(cfg.model).num_heads
    mask_mib = tokens * tokens * heads * 4 / 2**20

    torch.manual_seed(0)
    model = VisionTransformer(cfg.model).to(device).train()
    variants: list[tuple[str, str, str, float, str]] = []  # (name, packing, impl, rate, mode)
    impls = [i for i in args.impls.split(",") if i]
    rates = ((0.0, ["plain"]),) + (((args.drop_path, ["plain", "efficient"]),) if args.drop_path > 0 else ())
    for rate, modes in rates:
        for mode in modes:
            suffix = "" if rate == 0 else f" dp{rate:g}/{mode}"
            variants.append(("unpacked" + suffix, "unpacked", "segments", rate, mode))
            for impl in impls:
                if impl == "mask" and mask_mib > args.mask_limit_mib:
                    continue
                variants.append((f"packed/{impl}" + suffix, "packed", impl, rate, mode))

    def configure(packing: str, impl: str, rate: float, mode: str) -> None:
        model.cfg.packing, model.cfg.packed_attention = packing, impl
        for blk in model.blocks:
            blk.drop_path_rate, blk.drop_path_mode = rate, mode

    times: dict[str, list[float]] = {v[0]: [] for v in variants}
    for r in range(args.warmup + args.steps):
        for name, packing, impl, rate, mode in variants:
            configure(packing, impl, rate, mode)
            torch.manual_seed(r)
            dt = step(model, xs, masks, device, bf16)
            if r >= args.warmup:
                times[name].append(dt)
            print(f"  round {r}{' (warm-up)' if r < args.warmup else ''}: {name:<34} {dt:.3f} s", flush=True)

    base = statistics.median(times["unpacked"])
    rows = []
    print(f"{args.preset}: batch {args.batch_size}, {len(xs)} crops/image, {tokens} tokens/step, "
          f"device {device}, threads {torch.get_num_threads()}, {'bf16' if bf16 else 'fp32'}, "
          f"{args.steps} rounds (median / min, s)")
    print(f"{'variant':<34} {'median':>8} {'min':>8} {'vs unpacked':>12}")
    for name, *_ in variants:
        med, mn = statistics.median(times[name]), min(times[name])
        rows.append({"variant": name, "median_s": round(med, 4), "min_s": round(mn, 4),
                     "speedup_vs_unpacked": round(base / med, 3), "times_s": [round(t, 4) for t in times[name]]})
        print(f"{name:<34} {med:8.3f} {mn:8.3f} {base / med:11.2f}x")
    out = {"preset": args.preset, "overrides": args.overrides, "batch_size": args.batch_size,
           "crops_per_image": len(xs), "tokens_per_step": tokens, "drop_path": args.drop_path,
           "device": str(device), "threads": torch.get_num_threads(), "precision": "bf16" if bf16 else "fp32",
           "torch": torch.__version__, "rounds": args.steps, "rows": rows, "command": " ".join(sys.argv)}
    if args.json != "none":
        path = Path(args.json) if args.json else RESULTS_DIR / f"packing_droppath_{Path(args.preset).stem}_{device.type}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
