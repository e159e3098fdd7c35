"""``fovea eval correspondence MODEL --data spair:DIR``: keypoint transfer on SPair-71k by nearest-neighbour
matching of dense frozen features (METHODS.md 6b; Franca's 3D probing table, probe3d).

Both images are resized to S x S (``--size``, 224), the last block's patch tokens (after the final
norm) are bilinearly upsampled to S x S (``--resolution pixel``) or kept at the patch grid
(``--resolution patch``), L2-normalised; each source keypoint goes to the target pixel (cell) of
highest cosine similarity; the prediction is correct when within alpha x max(bbox width, height) of
the true target keypoint, in ORIGINAL target pixels. ``--features pixels`` runs the same matching on
raw-pixel features (normalised RGB of a ``--pixel-window`` neighbourhood minus its mean).

Result (figures in percent): ``{"pck@<alpha>": {"per_keypoint", "per_image", "n_pairs", "n_keypoints",
"per_category": {cat: {...same...}}}, "n_pairs", "n_keypoints", "n_images", "n_categories", "skipped":
{"pairs", "images", "files"}, "settings", "seconds": {"read", "features", "matching", "total"}, "matches":
path, "pictures": [paths]}``. Pairs using an unreadable image are skipped and counted.
"""
from __future__ import annotations

from typing import Any

from fovea.eval.plugin import EvalContext, Option, PaperProtocol

DEFAULT_ALPHAS = "0.05,0.1,0.15"


def run(ctx: EvalContext, opts: dict[str, Any]) -> dict:
    """Evaluate (see the module doc); heavy imports happen here."""
    from fovea.eval.correspondence.evaluate import evaluate
    return evaluate(ctx, opts)


def _alpha_keys(result: dict) -> list[str]:
    return [k for k in result if k.startswith("pck@")]


def _main_key(result: dict) -> str:
    keys = _alpha_keys(result)
    return "pck@0.1" if "pck@0.1" in keys else keys[0]


def headline(result: dict) -> dict[str, float]:
    """{"pck@A/per_keypoint", "pck@A/per_image"} for every alpha A."""
    out: dict[str, float] = {}
    for k in _alpha_keys(result):
        out[f"{k}/per_keypoint"] = float(result[k]["per_keypoint"])
        out[f"{k}/per_image"] = float(result[k]["per_image"])
    return out


def _settings_line(result: dict) -> str:
    s = result.get("settings", {})
    return (f"size {s.get('size')} px, {s.get('resolution')} resolution, {s.get('features')} features, "
            f"split {s.get('split')}; {result['n_pairs']} pairs, {result['n_keypoints']} keypoints, "
            f"{result['n_categories']} categories; skipped {result['skipped']['pairs']} pairs "
            f"({result['skipped']['images']} unreadable images); {result['seconds']['total']:.1f} s")


def markdown(result: dict) -> list[str]:
    """The report section: settings, PCK per alpha, per category at alpha 0.1, the pictures."""
    lines = ["## Keypoint correspondence (SPair layout)", "", f"- {_settings_line(result)}",
             f"- matches: `{result.get('matches', '')}`", "",
             "| PCK | per keypoint | per image |", "| --- | ---: | ---: |"]
    for k in _alpha_keys(result):
        lines.append(f"| {k} | {result[k]['per_keypoint']:.2f} | {result[k]['per_image']:.2f} |")
    main = _main_key(result)
    lines += ["", f"Per category ({main}):", "", "| category | pairs | per keypoint | per image |",
              "| --- | ---: | ---: | ---: |"]
    for cat, r in result[main]["per_category"].items():
        lines.append(f"| {cat} | {r['n_pairs']} | {r['per_keypoint']:.2f} | {r['per_image']:.2f} |")
    if result.get("pictures"):
        lines += ["", "Matches (green: correct at alpha 0.1, red: wrong; white ring: true target point):", ""]
        lines += [f"![correspondence]({p})" for p in result["pictures"]]
    return lines


def summary(result: dict) -> list[str]:
    """What the command prints without --json."""
    parts = [f"{k} {result[k]['per_keypoint']:.2f}% per keypoint, {result[k]['per_image']:.2f}% per image"
             for k in _alpha_keys(result)]
    return [f"[fovea] correspondence: {'; '.join(parts)}", f"[fovea] correspondence: {_settings_line(result)}"]


OPTIONS = (
    Option("data", {"metavar": "spair:DIR", "help": "SPair-71k folder (JPEGImages/<category>/, PairAnnotation/<split>/)"}),
    Option("split", {"default": "test", "help": "pair folder PairAnnotation/<split>/ (SPair: trn, val, test)"}),
    Option("size", {"type": int, "default": 224, "help": "both images resized to SIZE x SIZE (a multiple of the "
                                                         "patch size for backbone features)"}),
    Option("resolution", {"default": "pixel", "choices": ["pixel", "patch"],
                          "help": "match on patch features bilinearly upsampled to SIZE (pixel) or on the patch grid"}),
    Option("features", {"default": "backbone", "choices": ["backbone", "pixels"],
                        "help": "backbone patch tokens, or the raw-pixel baseline (mean-subtracted RGB neighbourhoods)"}),
    Option("alpha", {"default": DEFAULT_ALPHAS, "help": "comma-separated PCK alphas (threshold = alpha x max side "
                                                        "of the target box, original pixels)"}),
    Option("pixel-window", {"type": int, "default": 9, "help": "odd neighbourhood side of --features pixels (px at SIZE)"}),
    Option("max-pairs", {"type": int, "default": 0, "help": "evaluate at most N pairs, spread over categories (0 = all)"}),
    Option("save-matches", {"default": "", "metavar": "FILE.json",
                            "help": "write every pair's keypoints, predictions, truths and thresholds there "
                                    "(default OUT/matches.json)"}),
    Option("pictures", {"type": int, "default": 4, "help": "pairs drawn with their matches (0 = none)"}),
)

PROTOCOL = PaperProtocol(
    name="correspondence",
    help="SPair keypoint transfer by nearest-neighbour dense features (PCK)",
    description=__doc__ or "",
    options=OPTIONS,
    run=run,
    headline=headline,
    markdown=markdown,
    summary=summary,
)
