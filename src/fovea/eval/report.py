"""``fovea eval all``: run a set of protocols on one backbone and write report.md, report.json and
PNGs into ``RUN_DIR/eval`` (or another folder); headline scalars go to the run's metrics.jsonl /
TensorBoard under ``eval/...``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from fovea.eval.protocols import DEFAULT_PROTOCOLS, PAPER_PROTOCOLS, PROTOCOLS
from fovea.eval.suite import Suite

__all__ = ["DEFAULT_PROTOCOLS", "PROTOCOLS", "headline", "run_final_eval"]


def headline(results: dict) -> dict[str, float]:
    """Flat {"eval/<protocol>/<metric>": value} of the main numbers of each protocol's results."""
    out: dict[str, float] = {}
    if "knn" in results:
        for kind, accs in results["knn"]["features"].items():
            for k, v in accs.items():
                out[f"eval/knn/{kind}/{k}"] = v
    if "linear" in results:
        out["eval/linear/top1"] = results["linear"]["test_top1"]
    if "logreg" in results:
        out["eval/logreg/top1"] = results["logreg"]["test_top1"]
    if "fewshot" in results:
        for n, clfs in results["fewshot"]["shots"].items():
            for clf, r in clfs.items():
                out[f"eval/fewshot/{n}/{clf}"] = r["mean"]
    if "ood" in results:
        for k, r in results["ood"]["scores"].items():
            out[f"eval/ood/{k}/auroc"] = r["auroc"]
            out[f"eval/ood/{k}/fpr95"] = r["fpr95"]
    if "seg" in results:
        for m in ("linear", "hummingbird"):
            if m in results["seg"]:
                out[f"eval/seg/{m}/miou"] = results["seg"][m]["miou"]
    for name, module in PAPER_PROTOCOLS.items():
        if name in results:
            from fovea.eval.plugin import load_protocol
            out.update({f"eval/{name}/{k}": float(v) for k, v in load_protocol(module).headline(results[name]).items()})
    return out


def _paper_markdown(results: dict, out: Path) -> list[str]:
    """The report sections of the paper protocols, picture paths relative to the report folder ``out``."""
    from fovea.eval.plugin import load_protocol
    lines: list[str] = []
    prefix = str(out.resolve()) + "/"
    for name, module in PAPER_PROTOCOLS.items():
        if name in results:
            lines += [""] + [ln.replace(prefix, "") for ln in load_protocol(module).markdown(results[name])]
    return lines


def render_markdown(results: dict, meta: dict, out: Path | None = None) -> str:
    """report.md text: command, checkpoint, a table of headline numbers, details and pictures."""
    lines = ["# Evaluation report", "", f"- checkpoint: `{meta['checkpoint']}` ({meta['which']})",
             f"- command: `{meta['command']}`", f"- input size: {meta['size']} px; device {meta['device']}",
             f"- total time: {meta['seconds']:.1f} s", "", "| protocol | metric | value |", "|---|---|---|"]
    for key, v in headline(results).items():
        _, proto, metric = key.split("/", 2)
        lines.append(f"| {proto} | {metric} | {v:.2f} |")
    if "linear" in results:
        r = results["linear"]
        lines += ["", "## Linear probe", "",
                  f"Best on validation ({r['n_val']} images carved from train): features `{r['best']['features']}`, "
                  f"lr {r['best']['lr']:g} -> val {r['val_top1']:.2f}%, **test {r['test_top1']:.2f}%** "
                  f"({r['epochs']} epochs on {r['n_train']} images).", "",
                  "| features | test top-1 at its best lr |", "|---|---|"]
        lines += [f"| {n} | {a:.2f} |" for n, a in r["test_grid"].items()]
    if "logreg" in results:
        r = results["logreg"]
        lines += ["", "## Logistic regression", "", f"C = {r['best_C']:g} (validation sweep: "
                  + ", ".join(f"{c}: {a:.1f}" for c, a in r["sweep"].items()) + f"); test {r['test_top1']:.2f}%."]
    if "fewshot" in results:
        lines += ["", "## Few-shot", "", "| shots | classifier | mean | std |", "|---|---|---|---|"]
        for n, clfs in results["fewshot"]["shots"].items():
            lines += [f"| {n} | {c} | {r['mean']:.2f} | {r['std']:.2f} |" for c, r in clfs.items()]
    if "seg" in results:
        r = results["seg"]
        lines += ["", "## Dense", "", f"{r['num_classes']} classes, {r['n_train']} train / {r['n_test']} test "
                  f"pairs at {r['size']} px."]
        for m in ("linear", "hummingbird"):
            if m in r:
                lines.append(f"- {m}: mIoU {r[m]['miou']:.2f}%, pixel accuracy {r[m]['pixel_acc']:.2f}%")
    if "pictures" in results:
        p = results["pictures"]
        lines += ["", "## Pictures", "", f"Rows: image | PCA of patch features (foreground) | PCA (all patches), "
                  f"at {p['size']} px input.", "", f"![pca]({Path(p['pca']).name})", "",
                  "Rows: image | last-block CLS attention (mean of heads) | each head.", "",
                  f"![attention]({Path(p['attention']).name})"]
    lines += _paper_markdown(results, out or Path("."))
    if results.get("errors"):
        lines += ["", "## Protocols that failed", ""] + [f"- {k}: {v}" for k, v in results["errors"].items()]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in meta["timings"].items())]
    return "\n".join(lines) + "\n"


def run_report(suite: Suite, protocols: list[str], out_dir: str | Path | None = None,
               settings: dict | None = None, command: str = "", log_step: int | None = None,
               strict: bool = False, paper_flat: bool = False) -> dict:
    """Run ``protocols`` (subset of PROTOCOLS) and write report.json / report.md / PNGs to ``out_dir``
    (default RUN_DIR/eval). ``settings`` maps protocol -> keyword arguments of its Suite method.
    A failing protocol is recorded under "errors" (raised when ``strict``). A paper protocol (retrieval,
    video, ...) writes its files into ``out_dir/NAME`` (into ``out_dir`` itself with ``paper_flat``: the
    one-protocol command). Returns the results.
    """
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol(s) {unknown}; choose from {', '.join(PROTOCOLS)}")
    out = Path(out_dir) if out_dir else suite.run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    settings = settings or {}
    results: dict = {"errors": {}}
    t_all = time.time()
    for p in PROTOCOLS:
        if p not in protocols:
            continue
        t0 = time.time()
        try:
            kw = settings.get(p, {})
            if p in PAPER_PROTOCOLS:
                results[p] = suite.paper(p, out if paper_flat else out / p, kw)
            else:
                results[p] = suite.pictures(out, **kw) if p == "pictures" else getattr(suite, p)(**kw)
        except Exception as e:  # noqa: BLE001 - one failing protocol does not lose the others
            if strict:
                raise
            results["errors"][p] = f"{type(e).__name__}: {e}"
            print(f"[fovea] eval {p} failed: {results['errors'][p]}", flush=True)
        suite.timings[p] = round(time.time() - t0, 1)
        if suite.opts.progress and p in results:
            print(f"[fovea] eval {p} done [{suite.timings[p]}s]", flush=True)
    meta = {"checkpoint": str(suite.checkpoint), "which": suite.opts.which, "command": command,
            "size": suite.size, "device": str(suite.device), "seconds": time.time() - t_all,
            "timings": dict(suite.timings)}
    results["meta"] = meta
    (out / "report.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(render_markdown(results, meta, out))
    scalars = headline(results)
    if scalars and log_step is not None:
        from fovea.core.logging import MetricLogger
        logger = MetricLogger(suite.run_dir)
        logger.log(log_step, scalars)
        logger.close()
    return results


def checkpoint_step(run_dir: Path) -> int:
    """The training step recorded in RUN_DIR/results.json (0 when unknown)."""
    try:
        return int(json.loads((run_dir / "results.json").read_text()).get("steps", 0))
    except (OSError, ValueError):
        return 0


def run_final_eval(run_dir: str | Path, protocols: list[str], step: int, workers: int = 0,
                   batch_size: int = 256, progress: bool = True) -> dict:
    """The end-of-training hook (``eval.final``): evaluate RUN_DIR's final teacher with the run's
    labelled splits and write RUN_DIR/eval/report.*; scalars are logged at ``step``."""
    from fovea.eval.suite import SuiteOptions
    opts = SuiteOptions(workers=workers, batch_size=batch_size, progress=progress)
    suite = Suite(run_dir, opts)  # checkpoints/last.pt: the teacher and the run's full config
    return run_report(suite, protocols, None, None, f"fovea train ... eval.final={protocols}", step)
