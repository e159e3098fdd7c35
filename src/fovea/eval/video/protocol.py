"""``fovea eval video MODEL --data davis:DIR --out PRED_DIR``: semi-supervised video object segmentation
by label propagation on DAVIS-2017 (DINO v1's evaluation; METHODS.md section 6b).

Each sequence's first-frame mask is propagated with the frozen backbone's last-block patch tokens (after
the final norm, L2-normalised): frame t takes its labels from frame 0 and the ``--n-last-frames``
previous frames, top-``--topk`` of exp(cos / ``--temperature``) within ``--radius`` patches. Results are
palette PNGs in the DAVIS results layout (``PRED_DIR/<seq>/00000.png``..., frame 0 = the given mask,
the palette of the input annotation), which the davis2017 evaluator reads as they are; the figures are
that evaluator's J / F Mean, Recall, Decay and J&F-Mean (percent), per object as ``<seq>_<obj>``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fovea.eval.plugin import EvalContext, Option, PaperProtocol

OPTIONS = (
    Option("data", {"metavar": "SPEC", "help": "DAVIS-2017 root as 'davis:DIR' (JPEGImages/480p/<seq>/*.jpg, "
                                               "Annotations/480p/<seq>/*.png, ImageSets/2017/<split>.txt)"}),
    Option("split", {"default": "val", "help": "sequence list ImageSets/2017/SPLIT.txt"}),
    Option("n-last-frames", {"type": int, "default": 7, "metavar": "N", "help": "previous frames in the context "
                                                                                  "besides the first (0: the first only)"}),
    Option("topk", {"type": int, "default": 5, "metavar": "K", "help": "context patches kept per target patch"}),
    Option("radius", {"type": int, "default": 12, "metavar": "R", "help": "window radius in patches around the "
                                                                          "target patch's position (0: no window)"}),
    Option("temperature", {"type": float, "default": 0.1, "metavar": "T", "help": "affinity exp(cos / T)"}),
    Option("short-side", {"type": int, "default": 480, "metavar": "PX", "help": "frames resized so the shorter side is "
                                                                               "PX (a multiple of the patch size)"}),
    Option("size-multiple", {"type": int, "default": 64, "metavar": "PX", "help": "the longer side is floored to a "
                                                                                "multiple of PX (64 as DINO; a multiple "
                                                                                "of the patch size)"}),
    Option("features", {"choices": ["model", "pixels"], "default": "model",
                        "help": "model: the backbone's patch tokens; pixels: each patch's normalised pixels "
                                "(a baseline through the same propagation)"}),
    Option("pictures", {"type": int, "default": 2, "metavar": "N", "help": "sequences drawn as frame strips with "
                                                                           "the masks overlaid (0: none)"}),
    Option("score-only", {"action": "store_true", "help": "score the results already in --out against the "
                                                          "annotations, without running the model"}),
)


def run(ctx: EvalContext, opts: dict[str, Any]) -> dict:
    """Propagate, write the DAVIS results into ``ctx.out_dir``, score (see the module doc)."""
    from fovea.eval.video.evaluate import run as _run
    return _run(ctx, opts)


def headline(r: dict) -> dict[str, float]:
    """J&F-Mean, J-Mean, F-Mean (percent) where scored."""
    return {k: float(r[k]) for k in ("J&F-Mean", "J-Mean", "F-Mean") if r.get(k) is not None}


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def markdown(r: dict) -> list[str]:
    """The report section: settings, the global table, per-object J / F, the strips."""
    s = r["settings"]
    sizes = sorted({f"{w}x{h}" for h, w in r["input_sizes"].values()})
    lines = ["## Video object segmentation (DAVIS-2017 label propagation)", "",
             f"{r['n_sequences']} sequences ({r['split']}), {r['n_objects']} objects, {r['n_frames']} frames; "
             + ("scored existing results" if r["score_only"] else
                f"features `{s['features']}`, context = first + {s['n_last_frames']} previous frames, "
                f"top-{s['topk']}, radius {s['radius']}, T = {s['temperature']}, short side {s['short_side']} "
                f"(longer side floored to a multiple of {s['size_multiple']}: input {', '.join(sizes)})")
             + f"; results (DAVIS layout) in `{r['pred_dir']}`; {r['seconds']:.1f} s.", "",
             "| " + " | ".join(k for k in ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall",
                                           "F-Decay")) + " |", "|" + "---|" * 7,
             "| " + " | ".join(_f(r[k]) for k in ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall",
                                                  "F-Decay")) + " |"]
    if r["per_object"]:
        lines += ["", "| object | J-Mean | F-Mean |", "|---|---|---|"]
        lines += [f"| {n} | {_f(o['J-Mean'])} | {_f(o['F-Mean'])} |" for n, o in r["per_object"].items()]
    if r["unscored_sequences"]:
        lines += ["", "Not scored (fewer than 3 annotated frames): " + ", ".join(r["unscored_sequences"])]
    if r["pictures"]:
        lines += ["", "Frames with the propagated mask (top) and the ground truth (bottom):", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in r["pictures"]]
    return lines


def summary(r: dict) -> list[str]:
    """What ``fovea eval video`` prints without --json."""
    return [f"[fovea] video: J&F-Mean {_f(r['J&F-Mean'])}  J-Mean {_f(r['J-Mean'])}  F-Mean {_f(r['F-Mean'])}  "
            f"(J-Recall {_f(r['J-Recall'])}, J-Decay {_f(r['J-Decay'])}, F-Recall {_f(r['F-Recall'])}, "
            f"F-Decay {_f(r['F-Decay'])}; {r['n_objects']} objects in {r['n_sequences']} sequences, "
            f"{r['seconds']:.1f} s)",
            f"[fovea] video: results in the DAVIS layout under {r['pred_dir']}"]


PROTOCOL = PaperProtocol(
    name="video",
    help="DAVIS-2017 video object segmentation by label propagation (J&F)",
    description=__doc__ or "",
    options=OPTIONS,
    run=run,
    headline=headline,
    markdown=markdown,
    summary=summary,
)
