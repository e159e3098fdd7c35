"""``fovea eval retrieval MODEL --data roxford5k:DIR|rparis6k:DIR|retrieval:DIR``: instance retrieval with
frozen global descriptors, scored exactly as revisitop's ``compute_map`` (METHODS.md 6b).

Descriptor per image (``--features backbone``): the CLS token (``--descriptor cls``; the mean patch token
for a backbone without CLS) or GeM-pooled last-block patch tokens (``--descriptor gem``, power
``--gem-p`` 3), L2-normalised; with ``--multiscale`` the input also at 1/sqrt 2 and 1/2 (bilinear),
the three descriptors averaged, then L2-normalised per image. Images: the longer side resized to
``--imsize`` (224, aspect kept, no crop), both sides rounded to multiples of the patch size. Queries are
cropped to their ``bbx`` first (``--query-crop true``, the revisited protocol; ``false`` = DINO v1's
script). ``--features pixels``: the raw-pixel baseline (the image squashed to ``--pixel-size`` squared
pixels, flattened, mean-centred, L2-normalised) through the same ranking and metrics.

Ranking: cosine similarity, database indices sorted by decreasing similarity; ``ranks`` int64 [n_db,
n_queries] saved to ``--save-ranks`` (default OUT/ranks.npy), the array revisitop's ``compute_map`` takes.
Metrics (percent): mAP and mP@1/5/10 for Easy / Medium / Hard (junk removed, trapezoid AP, capped mP@k,
queries without positives left out). ``retrieval:DIR`` (a user's own set) has one setup, reported under
"medium" (positives = positives.csv, junk = junk.csv). Unreadable database images are ranked last for
every query and counted in ``skipped``; an unreadable query or a missing file is refused.

Result: ``{"easy"|"medium"|"hard": {"mAP", "mP@1", "mP@5", "mP@10", "n_queries", "n_without_positives"},
"set", "n_queries", "n_db", "skipped": {"database", "files"}, "settings", "seconds": {"queries",
"database", "ranking", "total"}, "ranks": path, "pictures": [paths]}``.
"""
from __future__ import annotations

from typing import Any

from fovea.eval.plugin import EvalContext, Option, PaperProtocol

SETUP_ORDER = ("easy", "medium", "hard")


def run(ctx: EvalContext, opts: dict[str, Any]) -> dict:
    """Evaluate (see the module doc); heavy imports happen here."""
    from fovea.eval.retrieval.evaluate import evaluate
    return evaluate(ctx, opts)


def _setups(result: dict) -> list[str]:
    return [s for s in SETUP_ORDER if s in result]


def headline(result: dict) -> dict[str, float]:
    """{"<setup>/mAP", "<setup>/mP@10"} for every reported setup."""
    return {f"{s}/{m}": float(result[s][m]) for s in _setups(result) for m in ("mAP", "mP@10")}


def _settings_line(result: dict) -> str:
    s = result["settings"]
    desc = "raw pixels" if s["features"] == "pixels" else (
        "CLS" if s["descriptor"] == "cls" else f"GeM p={s['gem_p']:g}")
    return (f"{result['set']}: {result['n_queries']} queries, {result['n_db']} database images; {desc}, longer "
            f"side {s['imsize']} px{', multi-scale' if s['multiscale'] else ''}, query crop "
            f"{'on' if s['query_crop'] else 'off'}; skipped {result['skipped']['database']} unreadable database "
            f"images (ranked last); {result['seconds']['total']:.1f} s")


def markdown(result: dict) -> list[str]:
    """The report section: settings, the metrics table, the ranks file and the top-5 pictures."""
    lines = ["## Instance retrieval (revisitop protocol)", "", f"- {_settings_line(result)}",
             f"- ranks (n_db x n_queries, for revisitop's compute_map): `{result.get('ranks', '')}`", "",
             "| setup | queries | mAP | mP@1 | mP@5 | mP@10 |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for s in _setups(result):
        r = result[s]
        lines.append(f"| {s} | {r['n_queries']} | {r['mAP']:.2f} | {r['mP@1']:.2f} | {r['mP@5']:.2f} | "
                     f"{r['mP@10']:.2f} |")
    if result.get("pictures"):
        lines += ["", "Top 5 per query (query | best 5; green = positive, red = negative, grey = junk, Medium "
                  "setup):", ""]
        lines += [f"![retrieval]({p})" for p in result["pictures"]]
    return lines


def summary(result: dict) -> list[str]:
    """What the command prints without --json."""
    parts = [f"{s} mAP {result[s]['mAP']:.2f} mP@10 {result[s]['mP@10']:.2f}" for s in _setups(result)]
    return [f"[fovea] retrieval: {'; '.join(parts)}", f"[fovea] retrieval: {_settings_line(result)}"]


OPTIONS = (
    Option("data", {"metavar": "roxford5k:DIR", "help": "roxford5k:DIR or rparis6k:DIR (DIR/<name>/jpg/ and "
                    "DIR/<name>/gnd_<name>.pkl), or retrieval:DIR (DIR/queries/, DIR/database/, positives.csv "
                    "with columns query,database, optional junk.csv)"}),
    Option("descriptor", {"default": "cls", "choices": ["cls", "gem"],
                          "help": "global descriptor: the CLS token or GeM-pooled patch tokens"}),
    Option("gem-p", {"type": float, "default": 3.0, "help": "GeM power of --descriptor gem"}),
    Option("imsize", {"type": int, "default": 224, "help": "longer side in px (aspect kept; both sides rounded "
                                                           "to multiples of the patch size)"}),
    Option("multiscale", {"action": "store_true", "help": "average the descriptors at scales 1, 1/sqrt 2, 1/2, "
                                                          "then L2-normalise per image"}),
    Option("query-crop", {"default": "true", "choices": ["true", "false"],
                          "help": "crop each query to its bbx (the revisited protocol; DINO v1's script: false)"}),
    Option("features", {"default": "backbone", "choices": ["backbone", "pixels"],
                        "help": "backbone descriptors, or the raw-pixel baseline through the same ranking"}),
    Option("pixel-size", {"type": int, "default": 32, "help": "side of --features pixels (image squashed to "
                                                              "SIZE x SIZE, flattened, mean-centred)"}),
    Option("save-ranks", {"default": "", "metavar": "FILE.npy",
                          "help": "write the ranks (int64, n_db x n_queries, database indices) there "
                                  "(default OUT/ranks.npy)"}),
    Option("pictures", {"type": int, "default": 4, "help": "queries drawn with their top 5 (0 = none)"}),
)

PROTOCOL = PaperProtocol(
    name="retrieval",
    help="instance retrieval on revisited Oxford / Paris (mAP, mP@k; Easy / Medium / Hard)",
    description=__doc__ or "",
    options=OPTIONS,
    run=run,
    headline=headline,
    markdown=markdown,
    summary=summary,
)
