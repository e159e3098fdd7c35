#!/usr/bin/env python
"""Training-step throughput of a fovea preset: images/s, achieved GFLOP/s, fraction of matmul peak.

Runs the real training step (``fovea.train.loop.Trainer.train_step``: schedules -> teacher and
student forward -> DINO loss -> backward -> freeze-last-layer -> gradient clipping -> AdamW step ->
EMA teacher update) on a method/optimizer built exactly as the Trainer builds them, but without a
run folder, checkpoints, logging or k-NN. By default the batches are random uint8 crops with the
preset's crop sizes (data loading excluded); ``--real-data`` iterates the preset's real loader.

It also measures the machine's fp32 matmul rate (square matmuls and the model's own MLP shapes)
and counts the FLOPs of one step both analytically and with ``torch.utils.flop_counter``.

Examples::

    python benchmarks/train_throughput.py                                   # dino_vittiny_fmnist, 10 steps
    python benchmarks/train_throughput.py dino_vittiny_fmnist --steps 2 --warmup 1 model.depth=2
    python benchmarks/train_throughput.py --compare data.batch_size=32,64,128 --steps 3
    python benchmarks/train_throughput.py my_run.yaml --device cuda --real-data
    python benchmarks/train_throughput.py dino_vittiny_cifar10 --augment-compare   # per_image vs batched

See benchmarks/README.md for the meaning of every reported figure.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fovea.config.loader import load_config
from fovea.config.schema import RunConfig
from fovea.models.flops import dims
from fovea.train.plan import make_plan, resolve_auto
from fovea.train.step import Stepper, build_stepper

DEFAULT_PRESET = "dino_vittiny_fmnist"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SQUARE_SIZES = {"cpu": [1024, 2048], "cuda": [4096, 8192]}
NOMINAL_STEPS_PER_EPOCH = 1000  # synthetic mode: data-set size assumed for the schedules


# ============================================================================ device / memory helpers

def resolve_device(pref: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cpu``; ``cuda`` / ``cuda:N``."""
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {pref}: CUDA is not available in this torch ({torch.__version__})")
        idx = int(pref.split(":")[1]) if ":" in pref else 0
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    if pref != "cpu":
        raise SystemExit(f"--device must be auto, cpu, cuda or cuda:N, got {pref!r}")
    return torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return (platform.processor() or platform.machine()) + f" ({os.cpu_count()} logical CPUs)"


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def current_rss_bytes() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def mib(n: float) -> float:
    return round(n / 2**20, 1)


# ============================================================================ matmul peak

def matmul_gflops(m: int, k: int, n: int, device: torch.device, dtype: torch.dtype,
                  min_time: float = 0.5, min_chunks: int = 3) -> float:
    """Best GFLOP/s of ``[m,k] @ [k,n]`` (2*m*k*n flops per call) over timed chunks of calls."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    c = torch.empty(m, n, device=device, dtype=dtype)
    torch.mm(a, b, out=c)  # warm-up (allocations, kernel selection)
    sync(device)
    t0 = time.perf_counter()
    torch.mm(a, b, out=c)
    sync(device)
    one = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(0.05 / one))  # ~50 ms per timed chunk
    best, spent, chunks = math.inf, 0.0, 0
    while chunks < min_chunks or spent < min_time:
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=c)
        sync(device)
        dt = time.perf_counter() - t0
        best, spent, chunks = min(best, dt / inner), spent + dt, chunks + 1
        if chunks >= 50:
            break
    return 2.0 * m * k * n / best / 1e9


def tokens_per_crop(cfg: RunConfig, size: int) -> int:
    """CLS (when the backbone has one) + register tokens + patches of one crop of ``size`` px."""
    return int(cfg.model.cls_token) + cfg.model.num_register_tokens + (size // cfg.model.patch_size) ** 2


def measure_matmul_peak(device: torch.device, sizes: list[int], min_time: float,
                        step_dtype: torch.dtype) -> dict[str, Any]:
    """fp32 square-matmul rates (and, when the step runs in bf16, bf16 ones too)."""
    out: dict[str, Any] = {"dtype": "fp32", "square_gflops": {}}
    for n in sizes:
        out["square_gflops"][str(n)] = round(matmul_gflops(n, n, n, device, torch.float32, min_time), 1)
    out["best_gflops"] = max(out["square_gflops"].values())
    if step_dtype == torch.bfloat16:
        out["bf16_square_gflops"] = {str(n): round(matmul_gflops(n, n, n, device, torch.bfloat16, min_time), 1)
                                     for n in sizes}
        out["bf16_best_gflops"] = max(out["bf16_square_gflops"].values())
    return out


def measure_model_shapes(cfg: RunConfig, device: torch.device, dtype: torch.dtype, min_time: float
                         ) -> dict[str, Any]:
    """Rate of the backbone's MLP fc1 matmul [B*N, D] x [D, 4D] for the global and the local crop group."""
    d, _, _, hid = dims(cfg.model)
    b, c = cfg.data.batch_size, cfg.crops
    if cfg.method == "ijepa":  # the target encoder's full view (the context encoder sees a subset)
        return {"target_fc1": {"shape": f"[{b * tokens_per_crop(cfg, c.global_size)}, {d}] x [{d}, {hid}]",
                               "gflops": round(matmul_gflops(b * tokens_per_crop(cfg, c.global_size), d, hid,
                                                             device, dtype, min_time), 1)}}
    groups = {"global": 2 * b * tokens_per_crop(cfg, c.global_size)}
    if c.n_local:
        groups["local"] = c.n_local * b * tokens_per_crop(cfg, c.local_size)
    res = {}
    for name, rows in groups.items():
        res[f"{name}_fc1"] = {"shape": f"[{rows}, {d}] x [{d}, {hid}]",
                              "gflops": round(matmul_gflops(rows, d, hid, device, dtype, min_time), 1)}
    return res


# ============================================================================ FLOP counting

def _cpu_sdpa_mapping() -> dict:
    """FlopCounterMode formulas for the CPU flash-attention kernels when torch lacks them."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    mapping: dict = {}
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in fc.flop_registry:
        mapping[fwd] = lambda q, k, v, *a, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v)
    if bwd is not None and bwd not in fc.flop_registry:
        mapping[bwd] = lambda g, q, k, v, *a, out_shape=None, **kw: fc.sdpa_backward_flop_count(g, q, k, v)
    return mapping


# ============================================================================ the step

def make_stepper(cfg: RunConfig, plan: Any, device: torch.device) -> Stepper:
    """The training loop's own :class:`~fovea.train.step.Stepper` (method, optimizer, schedules, bf16 rule),
    built by the same builder as the Trainer's, without a run folder, data source, logger or resume."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    t = build_stepper(cfg, plan, device)
    torch.manual_seed(cfg.train.seed + 1)
    t.method.train()
    return t


def param_counts(t: Stepper) -> dict[str, int]:
    s = t.method.student

    def n(mod: torch.nn.Module, trainable: bool = False) -> int:
        return sum(p.numel() for p in mod.parameters() if p.requires_grad or not trainable)

    head = getattr(s, "head", None) or getattr(s, "predictor", None)  # I-JEPA: the predictor
    return {"student_backbone": n(s.backbone), "student_head": n(head) if head is not None else 0,
            "student_total": n(s),
            "student_trainable": n(s, True), "teacher_total": n(t.method.teacher)}


def _stats(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def needs_auto(cfg: RunConfig) -> bool:
    """True when the method resolves values from the data-set size ('auto' values such as dino.out_dim=null)."""
    return resolve_auto(cfg, 1000, 1) != resolve_auto(cfg, 10**6, 1)


def dataset_size(cfg: RunConfig, args: argparse.Namespace) -> tuple[int, str]:
    """Training-set size used for the schedules and the 'auto' values, and where it came from.

    ``--n-images`` wins; ``--real-data`` and configs with auto values read the size of ``data.train``
    (no images are decoded for the size); otherwise a nominal 1000 steps per epoch.
    """
    if args.n_images:
        return args.n_images, "--n-images"
    if not args.synthetic or needs_auto(cfg):
        try:
            from fovea.data.sources import build_source
            return len(build_source(cfg.data.train)), "data.train"
        except Exception as e:  # noqa: BLE001
            if not args.synthetic:
                raise
            print(f"[bench] cannot open data.train to size the auto values ({type(e).__name__}: {e}); "
                  f"assuming {NOMINAL_STEPS_PER_EPOCH} steps per epoch; pass --n-images N to choose", flush=True)
    return cfg.data.batch_size * NOMINAL_STEPS_PER_EPOCH, "nominal"


def synthetic_canvas(cfg: RunConfig) -> tuple[int, str]:
    """Canvas side of the synthetic batches with ``crops.augment=batched``, and where it came from:
    ``crops.canvas``; else the training data's auto value (``data.train`` probed, as in training); else, when
    ``data.train`` cannot be opened, the global crop size."""
    if cfg.crops.canvas:
        return cfg.crops.canvas, "crops.canvas"
    try:
        from fovea.data.sources import build_source
        from fovea.methods.dino_spec import batched_canvas
        return batched_canvas(cfg, build_source(cfg.data.train)), "auto (data.train)"
    except Exception as e:  # noqa: BLE001
        print(f"[bench] cannot open data.train for the canvas size ({type(e).__name__}: {e}); using "
              f"crops.global_size={cfg.crops.global_size}; pass crops.canvas=N to choose", flush=True)
        return cfg.crops.global_size, "crops.global_size"


def run_one(cfg: RunConfig, args: argparse.Namespace, device: torch.device, peak: dict[str, Any]
            ) -> dict[str, Any]:
    """Build, warm up, count FLOPs and time ``args.steps`` training steps of ``cfg``."""
    rss_before = current_rss_bytes()
    n_images, n_images_from = dataset_size(cfg, args)
    cfg = resolve_auto(cfg, n_images, 1)  # auto K / teacher momentum, as the Trainer does
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    b = cfg.data.batch_size

    # ---- batches
    real = not args.synthetic
    if real:
        from fovea.data.loader import make_train_loader
        from fovea.data.sources import build_source, probe_source
        source = build_source(cfg.data.train)
        probe_source(source)
        plan = make_plan(cfg, len(source), 1)
        t = make_stepper(cfg, plan, device)
        dataset, collate = t.spec.train_data(cfg, source, "")  # as the Trainer builds it (iBOT / I-JEPA masks)
        res_n_images = (len(source), "data.train")
        state: dict[str, Any] = {"epoch": 0, "it": None}

        def next_batch() -> dict:
            while True:
                if state["it"] is None:
                    state["it"] = iter(make_train_loader(dataset, b, 0, 1, cfg.train.seed, state["epoch"], 0,
                                                         cfg.data.num_workers, pin_memory=device.type == "cuda",
                                                         collate_fn=collate))
                try:
                    return next(state["it"])
                except StopIteration:
                    state["it"], state["epoch"] = None, state["epoch"] + 1
        canvas = (getattr(dataset, "canvas", 0), "data.train") if t.augment is not None else None
    else:
        plan = make_plan(cfg, n_images, 1)
        t = make_stepper(cfg, plan, device)
        res_n_images = (n_images, n_images_from)
        canvas = None
        if t.augment is not None:  # crops.augment=batched: canvases, cropped inside the timed step
            canvas = synthetic_canvas(cfg)
            cfg = copy.deepcopy(cfg)
            cfg.crops.canvas = canvas[0]
        synthetic = t.spec.synthetic_batch(cfg, device)  # made once, already on the device

        def next_batch() -> dict:
            return {k: (list(v) if isinstance(v, list) else v) for k, v in synthetic.items()}
    step_dtype = torch.bfloat16 if t.bf16 else torch.float32
    # default: the first step after the prototypes' freeze (the steady state)
    step = args.start_step if args.start_step is not None else next(
        (s for s in range(plan.total_steps) if not t.values(s).sched.get("freeze_last_layer")), 0)

    last: dict = {}

    def one_step() -> tuple[float, float, dict]:
        nonlocal step
        t0 = time.perf_counter()
        batch = next_batch()
        last["batch"] = batch
        t1 = time.perf_counter()
        logs = t.step(batch, t.values(step))
        sync(device)
        t2 = time.perf_counter()
        step += 1
        return t2 - t1, t2 - t0, logs

    for _ in range(args.warmup):
        one_step()

    # ---- FLOPs: analytic, and FlopCounterMode on one extra (untimed) step
    ana = t.spec.flops(cfg, last.get("batch") or next_batch())
    counted, counter_error = None, None
    if not args.no_flop_counter:
        try:
            from torch.utils.flop_counter import FlopCounterMode
            with FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping()) as fcm:
                one_step()
            counted = int(fcm.get_total_flops())
        except Exception as e:  # noqa: BLE001 - report and fall back to the analytic count
            counter_error = f"{type(e).__name__}: {e}"
    use_counter = bool(counted)
    flops = counted if use_counter else ana["total"]

    # ---- timed steps
    compute, total, logs = [], [], {}
    for _ in range(args.steps):
        c_s, t_s, logs = one_step()
        compute.append(c_s)
        total.append(t_s)
    st = _stats(compute)
    ips = b / st["mean"]
    gflops = flops / st["mean"] / 1e9
    ref_peak = peak.get("bf16_best_gflops") if step_dtype == torch.bfloat16 else peak["best_gflops"]

    tok_g, tok_l = tokens_per_crop(cfg, cfg.crops.global_size), tokens_per_crop(cfg, cfg.crops.local_size)
    n_global, n_local = (1, 0) if cfg.method == "ijepa" else (2, cfg.crops.n_local)
    d, depth, heads, hid = dims(cfg.model)
    res: dict[str, Any] = {
        "preset": cfg.name, "overrides": list(args.all_overrides),
        "device": device.type, "device_name": device_name(device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "precision": "bf16" if t.bf16 else "fp32",
        "data": "real" if real else "synthetic",
        "augment": "batched" if t.augment is not None else "per_image",
        **({"canvas": {"side": canvas[0], "from": canvas[1]}} if canvas is not None else {}),
        "model": {"arch": cfg.model.arch, "embed_dim": d, "depth": depth, "num_heads": heads, "mlp_hidden": hid,
                  "patch_size": cfg.model.patch_size, "registers": cfg.model.num_register_tokens,
                  "head": {"out_dim": cfg.dino.out_dim, "hidden_dim": cfg.dino.hidden_dim,
                           "bottleneck_dim": cfg.dino.bottleneck_dim, "nlayers": cfg.dino.nlayers},
                  **({"predictor": f"{cfg.ijepa.pred_dim}x{cfg.ijepa.pred_depth}"} if cfg.method == "ijepa" else {})},
        "batch_size": b,
        "n_images": {"value": res_n_images[0], "from": res_n_images[1]},
        "method": cfg.method,
        "crops": {"global": n_global, "local": n_local, "global_size": cfg.crops.global_size,
                  "local_size": cfg.crops.local_size},
        "tokens_per_image": {"global_crop": tok_g, "local_crop": tok_l if n_local else 0, **ana["tokens_per_image"]},
        "params": param_counts(t),
        "steps": args.steps, "warmup": args.warmup, "first_timed_step": step - args.steps,
        "step_time_s": st, "step_times_s": compute,
        "images_per_s": ips,
        "crops_per_s": ips * (n_global + n_local),
        "flops_per_step": flops,
        "flops_source": "flop_counter" if use_counter else "analytic",
        "flops": {"analytic": ana["total"], "flop_counter": counted,
                  "counter_over_analytic": (counted / ana["total"]) if counted else None,
                  "agree_within_10pct": (abs(counted / ana["total"] - 1) <= 0.10) if counted else None,
                  "counter_error": counter_error, "analytic_breakdown": ana},
        "gflops": gflops,
        "matmul_peak": peak,
        "frac_of_peak": gflops / ref_peak if ref_peak else None,
        "frac_of_peak_reference": ("bf16" if step_dtype == torch.bfloat16 else "fp32") + " square-matmul best",
        "last_loss": logs.get("loss/jepa", logs.get("loss/dino")),
    }
    if real:
        tt = _stats(total)
        res["step_time_with_data_s"] = tt
        res["images_per_s_with_data"] = b / tt["mean"]
        res["data_wait_s_mean"] = tt["mean"] - st["mean"]
        res["num_workers"] = cfg.data.num_workers
    if args.model_shapes:
        res["model_shape_matmul"] = measure_model_shapes(cfg, device, step_dtype, args.matmul_time)
    if device.type == "cuda":
        res["peak_memory"] = {"kind": "torch.cuda.max_memory_allocated",
                              "bytes": torch.cuda.max_memory_allocated(device),
                              "mib": mib(torch.cuda.max_memory_allocated(device)),
                              "host_peak_rss_mib": mib(peak_rss_bytes())}
    else:
        res["peak_memory"] = {"kind": "ru_maxrss (process peak RSS)", "bytes": peak_rss_bytes(),
                              "mib": mib(peak_rss_bytes()), "rss_before_build_mib": mib(rss_before)}
    gc.collect()
    return res


# ============================================================================ reporting

def _fmt_flops(x: float | None) -> str:
    return "-" if not x else f"{x / 1e9:,.2f} GFLOP"


def print_table(r: dict[str, Any]) -> None:
    st, fl, pk = r["step_time_s"], r["flops"], r["matmul_peak"]
    square = ", ".join(f"n={n}: {v:,.1f}" for n, v in pk["square_gflops"].items())
    rows = [
        ("preset", f"{r['preset']}  {' '.join(r['overrides'])}".rstrip()),
        ("device", f"{r['device']} - {r['device_name']}"),
        ("torch / threads / precision", f"{r['torch']} / {r['threads']} / {r['precision']}"),
        ("data", r["data"]),
        ("augment", r.get("augment", "per_image") + (
            f" (on the device inside the step; {r['canvas']['side']}-px canvas, {r['canvas']['from']})"
            if "canvas" in r else " (in the loader)" if r["data"] == "real" else " (crops made once)")),
        ("model", f"{r['model']['arch']} D={r['model']['embed_dim']} depth={r['model']['depth']} "
                  f"heads={r['model']['num_heads']} patch={r['model']['patch_size']}, "
                  + (f"predictor {r['model']['predictor']}" if "predictor" in r["model"]
                     else f"head K={r['model']['head']['out_dim']}")),
        ("params (student / trainable)", f"{r['params']['student_total']:,} / {r['params']['student_trainable']:,} "
                                         f"(backbone {r['params']['student_backbone']:,})"),
    ]
    tk = r["tokens_per_image"]
    if r.get("method") == "ijepa":
        rows += [("batch x views", f"{r['batch_size']} x 1 view of {r['crops']['global_size']}px"),
                 ("tokens / image", f"target encoder {tk['teacher']}, context encoder {tk['student']}, "
                                    f"predictor {tk['predictor']} (padded)")]
    else:
        rows += [("batch x crops", f"{r['batch_size']} x (2 x {r['crops']['global_size']}px + "
                                   f"{r['crops']['local']} x {r['crops']['local_size']}px)"),
                 ("tokens / image (student)", f"{tk['student']} (global crop {tk['global_crop']}, "
                                              f"local crop {tk['local_crop']})")]
    rows += [
        ("timed steps (warm-up)", f"{r['steps']} ({r['warmup']})"),
        ("step time", f"{st['mean'] * 1e3:,.1f} ms +- {st['std'] * 1e3:,.1f} "
                      f"(median {st['median'] * 1e3:,.1f}, min {st['min'] * 1e3:,.1f})"),
        ("images/s", f"{r['images_per_s']:,.1f}  ({r['crops_per_s']:,.0f} crops/s)"),
    ]
    if "images_per_s_with_data" in r:
        rows.append(("images/s incl. data loading",
                     f"{r['images_per_s_with_data']:,.1f}  (data wait {r['data_wait_s_mean'] * 1e3:,.1f} ms/step, "
                     f"{r['num_workers']} workers)"))
    agree = "" if fl["counter_over_analytic"] is None else \
        f"  counter/analytic = {fl['counter_over_analytic']:.3f}"
    rows += [
        ("FLOPs / step", f"{_fmt_flops(r['flops_per_step'])} ({r['flops_source']})"),
        ("  FlopCounterMode / analytic", f"{_fmt_flops(fl['flop_counter'])} / {_fmt_flops(fl['analytic'])}{agree}"),
        ("achieved", f"{r['gflops']:,.1f} GFLOP/s"),
        ("matmul peak fp32 (GFLOP/s)", square),
    ]
    if "bf16_square_gflops" in pk:
        rows.append(("matmul peak bf16 (GFLOP/s)",
                     ", ".join(f"n={n}: {v:,.1f}" for n, v in pk["bf16_square_gflops"].items())))
    for name, v in r.get("model_shape_matmul", {}).items():
        rows.append((f"matmul {name}", f"{v['gflops']:,.1f} GFLOP/s  {v['shape']}"))
    if r["frac_of_peak"] is not None:
        rows.append(("fraction of peak", f"{100 * r['frac_of_peak']:.1f}% of {r['frac_of_peak_reference']}"))
    pm = r["peak_memory"]
    rows.append(("peak memory", f"{pm['mib']:,.1f} MiB ({pm['kind']})"))
    if fl["counter_error"]:
        rows.append(("FlopCounterMode error", fl["counter_error"]))
    w = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{w}}  {v}" for k, v in rows), flush=True)


def print_compare(key: str, runs: list[tuple[str, dict[str, Any]]]) -> None:
    head = (f"{key:>20}  {'img/s':>9}  {'step ms':>9}  {'+-':>7}  {'GFLOP/step':>10}  {'GFLOP/s':>8}  "
            f"{'% peak':>6}  {'peak MiB':>9}")
    print(head)
    print("-" * len(head))
    for v, r in runs:
        st = r["step_time_s"]
        frac = "-" if r["frac_of_peak"] is None else f"{100 * r['frac_of_peak']:.1f}"
        print(f"{v:>20}  {r['images_per_s']:9.1f}  {st['mean'] * 1e3:9.1f}  {st['std'] * 1e3:7.1f}  "
              f"{r['flops_per_step'] / 1e9:10.2f}  {r['gflops']:8.1f}  {frac:>6}  {r['peak_memory']['mib']:9.1f}")


AUGMENT_MODES = ("per_image", "batched")


def print_augment_compare(rows: list[dict[str, Any]]) -> None:
    """One row per ``crops.augment`` mode (batched twice: with the preset's loader workers and with none): step-only
    (synthetic) and loop (real data) images/s; loop / step divides the loop by the per-image step alone (ready crops)."""
    head = (f"{'crops.augment':>13}  {'step-only img/s':>15}  {'step ms':>8}  {'loop img/s':>10}  "
            f"{'step (real) img/s':>17}  {'data wait ms':>12}  {'workers':>7}  {'loop / step':>11}")
    print(head)
    print("-" * len(head))
    for r in rows:
        def f(v: float | None, spec: str) -> str:
            return "-" if v is None else format(v, spec)
        print(f"{r['augment']:>13}  {f(r['step_only_images_per_s'], '15.1f')}  {f(r['step_only_ms'], '8.1f')}  "
              f"{f(r['loop_images_per_s'], '10.1f')}  {f(r['loop_step_images_per_s'], '17.1f')}  "
              f"{f(r['loop_data_wait_ms'], '12.1f')}  {r['num_workers']!s:>7}  "
              f"{f(r.get('loop_over_step_only'), '11.2f')}")


def augment_compare_row(mode: str, synthetic: dict[str, Any] | None, real: dict[str, Any] | None) -> dict[str, Any]:
    return {"augment": mode,
            "step_only_images_per_s": synthetic["images_per_s"] if synthetic else None,
            "step_only_ms": synthetic["step_time_s"]["mean"] * 1e3 if synthetic else None,
            "loop_images_per_s": real["images_per_s_with_data"] if real else None,
            "loop_step_images_per_s": real["images_per_s"] if real else None,
            "loop_data_wait_ms": real["data_wait_s_mean"] * 1e3 if real else None,
            "num_workers": real["num_workers"] if real else None,
            "canvas": (synthetic or real or {}).get("canvas")}


# ============================================================================ CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_throughput.py",
        description="Measure the training step of a fovea preset: images/s, step time, achieved GFLOP/s "
                    "(analytic and FlopCounterMode FLOP counts), fraction of the measured matmul peak and "
                    "peak memory. Prints a table and writes a JSON file. Nothing is written to runs/.",
        epilog="Defaults: 10 timed steps after 2 warm-up steps, synthetic data, device auto. "
               "Overrides and options may be given in any order.")
    p.add_argument("preset", nargs="?", default=DEFAULT_PRESET,
                   help=f"preset name (see `fovea presets`) or path to a YAML run config (default: {DEFAULT_PRESET})")
    p.add_argument("overrides", nargs="*", default=[],
                   help="config overrides key.sub=value, as for `fovea train` (e.g. model.depth=6 data.batch_size=64)")
    p.add_argument("--steps", type=int, default=10, help="number of timed training steps (default: 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps before the FLOP-count step and the timed steps (default: 2)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="override data.batch_size (images per step; each gives 2 global + n_local crops)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu; the default), cpu, cuda or cuda:N")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="where to write the results; default benchmarks/results/train_throughput_<preset>_<device>"
                        "[_compare_<key>].json; 'none' to skip")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--synthetic", dest="synthetic", action="store_true", default=True,
                      help="random uint8 crops with the preset's crop sizes, made once on the device "
                           "(data loading and host-to-device copies excluded); the default")
    data.add_argument("--real-data", dest="synthetic", action="store_false",
                      help="iterate the preset's real multi-crop loader (data.train, data.num_workers) and also "
                           "report the data-inclusive images/s")
    p.add_argument("--compare", default=None, metavar="KEY=V1,V2,...",
                   help="repeat the measurement for each value of one config key and print a row per value")
    p.add_argument("--augment-compare", action="store_true",
                   help="measure crops.augment=per_image and crops.augment=batched, each step-only (synthetic "
                        "batches: crops, or canvases cropped inside the step) and in the loop (--real-data: "
                        "data.train through the loader): 4 runs, one table, one JSON file")
    p.add_argument("--start-step", type=int, default=None,
                   help="schedule step of the first warm-up step (lr, wd, momentum, teacher temperature); "
                        "default: the first step after the freeze-last-layer phase")
    p.add_argument("--matmul-sizes", default=None, metavar="N1,N2",
                   help="square matmul sizes for the peak rate; default 1024,2048 on CPU, 4096,8192 on CUDA")
    p.add_argument("--matmul-time", type=float, default=0.5,
                   help="seconds spent timing each matmul shape; the best ~50 ms chunk is kept (default: 0.5)")
    p.add_argument("--no-model-shapes", dest="model_shapes", action="store_false",
                   help="skip timing the model's own fc1 matmul shapes [B*N, D] x [D, 4D]")
    p.add_argument("--n-images", type=int, default=None, metavar="N",
                   help="training-set size used for the schedules and for 'auto' config values (dino.out_dim=null, "
                        "optim.momentum_teacher=null); default: the size of data.train when it is needed (--real-data "
                        "or auto values), else 1000 batches")
    p.add_argument("--no-flop-counter", action="store_true",
                   help="skip the FlopCounterMode step and use the analytic FLOP count")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_intermixed_args(argv)
    if "=" in args.preset and not Path(args.preset).exists():  # only overrides were given
        args.overrides = [args.preset, *args.overrides]
        args.preset = DEFAULT_PRESET
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.compare is not None and ("=" not in args.compare or not args.compare.split("=", 1)[1]):
        p.error("--compare must look like key.sub=V1,V2")
    if args.augment_compare and args.compare is not None:
        p.error("--augment-compare and --compare cannot be combined")
    return args


def _split_values(text: str) -> list[str]:
    """``"1,2,[a,b],3"`` -> ['1', '2', '[a,b]', '3'] (commas inside brackets are kept)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def default_json(preset: str, device: torch.device, compare: str | None, augment_compare: bool = False) -> Path:
    stem = Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset
    name = f"train_throughput_{re.sub(r'[^A-Za-z0-9_.-]', '_', stem)}_{device.type}"
    if compare:
        name += "_compare_" + re.sub(r"[^A-Za-z0-9_.-]", "_", compare.split("=", 1)[0])
    if augment_compare:
        name += "_augment"
    return RESULTS_DIR / f"{name}.json"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what is written to the JSON file."""
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"data.batch_size={args.batch_size}"] if args.batch_size else [])
    variants: list[tuple[str | None, list[str]]] = [(None, overrides)]
    if args.compare:
        key, vals = args.compare.split("=", 1)
        variants = [(v, overrides + [f"{key}={v}"]) for v in _split_values(vals)]
    if args.augment_compare:  # each mode twice: step-only (synthetic), then the loop (real data)
        variants = [(f"{m}/{d}", overrides + [f"crops.augment={m}"]) for m in AUGMENT_MODES
                    for d in ("synthetic", "real")]
        # batched, the loader in the training process: its workers would only decode, and compete for the cores
        variants.append(("batched0/real", overrides + ["crops.augment=batched", "data.num_workers=0"]))
    cfgs = [(v, ov, load_config(args.preset, ov)) for v, ov in variants]  # fail on bad keys before any work
    device = resolve_device(args.device)
    if cfgs[0][2].train.threads:
        torch.set_num_threads(cfgs[0][2].train.threads)
    bf16 = any(c.train.precision == "bf16" or (c.train.precision == "auto" and device.type == "cuda")
               for _, _, c in cfgs)
    sizes = ([int(s) for s in args.matmul_sizes.split(",")] if args.matmul_sizes
             else SQUARE_SIZES[device.type])
    print(f"[bench] {args.preset} on {device} ({device_name(device)}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; measuring matmul peak {sizes} ...", flush=True)
    peak = measure_matmul_peak(device, sizes, args.matmul_time, torch.bfloat16 if bf16 else torch.float32)

    runs = []
    for v, ov, cfg in cfgs:
        args.all_overrides = ov
        run_args = args
        if args.augment_compare:  # v = "<mode>/<synthetic|real>"
            run_args = argparse.Namespace(**{**vars(args), "synthetic": str(v).endswith("/synthetic")})
            label = f" [crops.augment={str(v).split('/')[0].rstrip('0')}]"
        else:
            label = f" [{args.compare.split('=', 1)[0]}={v}]" if args.compare and v is not None else ""
        fc_step = "" if args.no_flop_counter else " + 1 FLOP-count"
        print(f"[bench] {cfg.name}{label}: {args.warmup} warm-up{fc_step} + {args.steps} timed steps, "
              f"batch {cfg.data.batch_size}, {'real' if not run_args.synthetic else 'synthetic'} data", flush=True)
        r = run_one(cfg, run_args, device, peak)
        print_table(r)
        runs.append((v, r))

    if args.augment_compare:
        by = {str(v): r for v, r in runs}
        rows = [augment_compare_row(m, by.get(f"{m}/synthetic"), by.get(f"{m}/real")) for m in AUGMENT_MODES]
        rows.append(augment_compare_row("batched", by.get("batched/synthetic"), by.get("batched0/real")))
        pure = rows[0]["step_only_images_per_s"]  # the step alone, on ready-made crops
        for row in rows:
            row["loop_over_step_only"] = (round(row["loop_images_per_s"] / pure, 3)
                                          if pure and row["loop_images_per_s"] else None)
        print()
        print_augment_compare(rows)
        out = {"augment_compare": rows, "matmul_peak": peak,
               "runs": {str(v): r for v, r in runs}}
    elif args.compare:
        print()
        print_compare(args.compare.split("=", 1)[0], [(str(v), r) for v, r in runs])
        out: dict[str, Any] = {"compare": args.compare.split("=", 1)[0], "values": [v for v, _ in runs],
                               "matmul_peak": peak, "runs": [r for _, r in runs]}
    else:
        out = runs[0][1]
    out["command"] = " ".join(["python", "benchmarks/train_throughput.py", *(argv if argv is not None else sys.argv[1:])])
    if (args.json or "").lower() != "none":
        path = Path(args.json) if args.json else default_json(args.preset, device, args.compare, args.augment_compare)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2))
        print(f"[bench] wrote {path}", flush=True)
    return out


if __name__ == "__main__":
    main()
