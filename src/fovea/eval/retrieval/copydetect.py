"""``fovea eval copydetect MODEL --data copydays:DIR [--distractors SPEC] [--whiten SPEC]``: copy detection
on the Copydays "strong" subset as DINO v1 evaluates it (METHODS.md 6b).

Layout read (the INRIA Copydays distribution): ``DIR/original/NNNN00.jpg`` (157 originals, ``NNNN`` = block
id) and ``DIR/strong/NNNNxx.jpg`` (229 strong copies); a copy's one positive is the original whose file name
has the same first 4 characters. ``--blocks`` picks other query folders too (``jpegqual/50``, ``crops/20``:
files named like their original). Distractors: ``--distractors SPEC`` (a folder or any fovea source spec:
``folder:DIR``, ``parquet:FILE``, ...; default ``DIR/distractors/`` when it exists, ``none`` = without).

Descriptor: the CLS token concatenated with GeM-pooled (p = ``--gem-p`` 4) last-block patch tokens of the
image squashed to ``--imsize`` x ``--imsize`` (320); with ``--whiten SPEC`` PCA whitening learned on that
separate image set (its mean removed, projected on its covariance's eigenvectors scaled by eigenvalue^-1/2,
eigenvalues floored at 1e-5 x the largest; all axes unless ``--whiten-dim``); then L2-normalised.
``--features pixels``: the raw-pixel baseline through the same code. Database = originals + distractors,
cosine similarity; AP per query by the Holidays / Copydays evaluator's trapezoid rule (one positive at
0-based rank r: 1 when r = 0, else 1 / (2 (r + 1))); mAP over queries, in percent.

Unreadable originals and distractors are ranked last and counted, unreadable queries (and whitening images)
left out and counted. Result: ``{"mAP", "per_block": {block: mAP}, "top1", "n_queries", "n_originals",
"n_distractors", "n_whiten", "skipped": {"originals", "queries", "distractors", "whiten", "files"},
"settings", "seconds", "ranks", "gnd", "pictures"}``; ``ranks`` = OUT/copydetect_ranks.npy (int64 [n_db,
n_queries]: database indices, originals first then distractors) and ``gnd`` = OUT/copydetect_gnd.json
(database and query names, each query's positive).
"""
from __future__ import annotations

from typing import Any

from fovea.eval.plugin import EvalContext, Option, PaperProtocol


def run(ctx: EvalContext, opts: dict[str, Any]) -> dict:
    """Evaluate (see the module doc); heavy imports happen here."""
    from fovea.eval.retrieval.copyeval import evaluate
    return evaluate(ctx, opts)


def headline(result: dict) -> dict[str, float]:
    """{"mAP", "top1"} (percent)."""
    return {"mAP": float(result["mAP"]), "top1": float(result["top1"])}


def _settings_line(result: dict) -> str:
    s, k = result["settings"], result["skipped"]
    desc = "raw pixels" if s["features"] == "pixels" else f"CLS + GeM p={s['gem_p']:g}"
    return (f"{result['n_queries']} queries ({', '.join(s['blocks'])}) against {result['n_originals']} originals + "
            f"{result['n_distractors']} distractors; {desc} at {s['imsize']}x{s['imsize']} px, whitening "
            f"{s['whiten'] or 'none'} ({result['n_whiten']} images); skipped {k['originals']} originals, "
            f"{k['queries']} queries, {k['distractors']} distractors, {k['whiten']} whitening images; "
            f"{result['seconds']['total']:.1f} s")


def markdown(result: dict) -> list[str]:
    """The report section."""
    lines = ["## Copy detection (Copydays layout)", "", f"- {_settings_line(result)}",
             f"- ranks: `{result.get('ranks', '')}`, ground truth: `{result.get('gnd', '')}`", "",
             "| queries | mAP | top-1 |", "| --- | ---: | ---: |",
             f"| all | {result['mAP']:.2f} | {result['top1']:.2f} |"]
    lines += [f"| {b} | {v:.2f} | |" for b, v in result["per_block"].items()] if len(result["per_block"]) > 1 else []
    if result.get("pictures"):
        lines += ["", "Top 5 per copy (copy | best 5; green = its original, red = another image):", ""]
        lines += [f"![copydetect]({p})" for p in result["pictures"]]
    return lines


def summary(result: dict) -> list[str]:
    """What the command prints without --json."""
    return [f"[fovea] copydetect: mAP {result['mAP']:.2f}, top-1 {result['top1']:.2f}",
            f"[fovea] copydetect: {_settings_line(result)}"]


OPTIONS = (
    Option("data", {"metavar": "copydays:DIR", "help": "Copydays folder (DIR/original/NNNN00.jpg, "
                                                       "DIR/strong/NNNNxx.jpg)"}),
    Option("blocks", {"default": "strong", "help": "comma list of query folders below DIR (strong, jpegqual/50, "
                                                   "crops/20, ...)"}),
    Option("distractors", {"default": "", "metavar": "SPEC",
                           "help": "distractor images: a folder or a source spec (folder:DIR, parquet:FILE, ...); "
                                   "default DIR/distractors/ when it exists; none = without"}),
    Option("distractors-limit", {"type": int, "default": 0, "help": "use at most N distractors (0 = all)"}),
    Option("whiten", {"default": "", "metavar": "SPEC",
                      "help": "learn PCA whitening on these images (a folder or a source spec; default: none)"}),
    Option("whiten-limit", {"type": int, "default": 0, "help": "use at most N whitening images (0 = all)"}),
    Option("whiten-dim", {"type": int, "default": 0, "help": "whitened dimensions kept (0 = all)"}),
    Option("imsize", {"type": int, "default": 320, "help": "images squashed to IMSIZE x IMSIZE (rounded to a "
                                                           "multiple of the patch size)"}),
    Option("gem-p", {"type": float, "default": 4.0, "help": "GeM power of the pooled patch tokens"}),
    Option("features", {"default": "backbone", "choices": ["backbone", "pixels"],
                        "help": "backbone descriptors, or the raw-pixel baseline through the same ranking"}),
    Option("pixel-size", {"type": int, "default": 32, "help": "side of --features pixels"}),
    Option("pictures", {"type": int, "default": 4, "help": "copies drawn with their top 5 (0 = none)"}),
)

PROTOCOL = PaperProtocol(
    name="copydetect",
    help="copy detection on Copydays strong (mAP over originals + distractors)",
    description=__doc__ or "",
    options=OPTIONS,
    run=run,
    headline=headline,
    markdown=markdown,
    summary=summary,
)
