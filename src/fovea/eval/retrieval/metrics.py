"""Retrieval metrics exactly as revisitop's ``compute_map`` scores them (METHODS.md 6b), pure functions.

``ranks`` everywhere is int [n_db, n_queries]: column ``q`` lists the database indices in order of
decreasing similarity (what revisitop's evaluator and ``--save-ranks`` hold).

Per query, with junk images removed from the ranking first (the positions of the positives shift
down by the number of junk images ranked above them):

- AP by the trapezoid rule: for the j-th positive (0-based) found at position r (0-based),
  add ((j / r, or 1 when r = 0) + (j + 1) / (r + 1)) / 2 / n_positives, where n_positives is the
  number of positives in the ground truth (a positive absent from a truncated ranking counts as
  never found). This is not sklearn's average_precision (which adds (j + 1) / (r + 1) / n_pos).
- mP@k: positions 1-based, k' = min(k, position of the last positive), mP@k = (positives at
  positions <= k') / k' (revisitop's cap, which lifts queries with fewer than k positives).

A query without positives is left out of the means (revisitop sets its AP to NaN and divides by the
number of the others). The revisited setups: Easy = (easy; junk + hard), Medium = (easy + hard; junk),
Hard = (hard; junk + easy), as (positives; junk).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

DEFAULT_KS = (1, 5, 10)
SETUPS = ("easy", "medium", "hard")


def trapezoid_ap(positions: np.ndarray, n_positives: int) -> float:
    """AP of one query from the sorted 0-based positions [P] of its found positives (junk removed)
    and the number of positives in its ground truth (revisitop's ``compute_ap``)."""
    if n_positives <= 0:
        raise ValueError("AP of a query without positives is undefined (leave the query out)")
    ap = 0.0
    for j, r in enumerate(np.asarray(positions, dtype=np.int64).tolist()):
        p0 = 1.0 if r == 0 else j / r
        p1 = (j + 1) / (r + 1)
        ap += (p0 + p1) / 2.0
    return ap / n_positives


def positive_positions(ranking: np.ndarray, positives: Sequence[int] | np.ndarray,
                       junk: Sequence[int] | np.ndarray = ()) -> np.ndarray:
    """Sorted 0-based positions [P] of the positives in ``ranking`` [n_db] (database indices) once the
    junk images are removed from it. A database index in both lists counts as junk, as revisitop's loop
    would shift it by itself (it never happens in the official ground truth)."""
    ranking = np.asarray(ranking, dtype=np.int64)
    is_pos = np.isin(ranking, np.asarray(positives, dtype=np.int64))
    is_junk = np.isin(ranking, np.asarray(junk, dtype=np.int64))
    kept = ~is_junk
    new_pos = np.cumsum(kept) - 1  # position of each kept entry in the junk-free ranking
    return new_pos[is_pos & kept]


def capped_precision(positions_1based: np.ndarray, k: int) -> float:
    """revisitop's mP@k term of one query: k' = min(k, last positive's 1-based position),
    (positives at positions <= k') / k'. ``positions_1based`` [P] must not be empty."""
    pos = np.asarray(positions_1based, dtype=np.int64)
    kq = min(int(pos.max()), int(k))
    return float((pos <= kq).sum()) / kq


def query_scores(ranking: np.ndarray, positives: Sequence[int] | np.ndarray, junk: Sequence[int] | np.ndarray = (),
                 ks: Sequence[int] = DEFAULT_KS) -> tuple[float, np.ndarray] | None:
    """(AP, [len(ks)] mP@k terms) of one query, or None when it has no positives. A query none of whose
    positives appear in ``ranking`` scores AP 0 and precision 0."""
    n_pos = len(np.asarray(positives).reshape(-1))
    if n_pos == 0:
        return None
    pos = positive_positions(ranking, positives, junk)
    ap = trapezoid_ap(pos, n_pos)
    if len(pos) == 0:
        return ap, np.zeros(len(ks))
    return ap, np.array([capped_precision(pos + 1, k) for k in ks])


def compute_map(ranks: np.ndarray, gnd: Sequence[dict], ks: Sequence[int] = DEFAULT_KS) -> dict:
    """mAP and mP@k over queries (fractions in [0, 1]) of ``ranks`` [n_db, n_q] and ``gnd`` (n_q dicts
    with ``ok`` and optional ``junk`` database indices): {"mAP", "mP@k"..., "aps": [n_q] (NaN for a query
    without positives), "n_queries" (those scored), "n_without_positives"}."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[1] != len(gnd):
        raise ValueError(f"ranks of shape {ranks.shape} for {len(gnd)} queries (expected [n_db, n_queries])")
    aps = np.full(len(gnd), np.nan)
    prs = np.full((len(gnd), len(ks)), np.nan)
    for q, g in enumerate(gnd):
        s = query_scores(ranks[:, q], g["ok"], g.get("junk", ()), ks)
        if s is not None:
            aps[q], prs[q] = s
    scored = ~np.isnan(aps)
    n = int(scored.sum())
    out: dict = {"mAP": float(aps[scored].mean()) if n else float("nan")}
    for i, k in enumerate(ks):
        out[f"mP@{k}"] = float(prs[scored, i].mean()) if n else float("nan")
    out.update({"aps": aps.tolist(), "n_queries": n, "n_without_positives": int(len(gnd) - n)})
    return out


def revisited_setups(gnd: Sequence[dict]) -> dict[str, list[dict]]:
    """The Easy / Medium / Hard ground truths ({"ok", "junk"} per query) of revisited gnd entries
    (each with ``easy``, ``hard``, ``junk`` lists)."""
    def cat(*lists: Sequence[int]) -> list[int]:
        return [int(i) for lst in lists for i in lst]
    return {
        "easy": [{"ok": cat(g["easy"]), "junk": cat(g["junk"], g["hard"])} for g in gnd],
        "medium": [{"ok": cat(g["easy"], g["hard"]), "junk": cat(g["junk"])} for g in gnd],
        "hard": [{"ok": cat(g["hard"]), "junk": cat(g["junk"], g["easy"])} for g in gnd],
    }


def score_setups(ranks: np.ndarray, setups: dict[str, list[dict]], ks: Sequence[int] = DEFAULT_KS) -> dict:
    """{setup: {"mAP", "mP@1", "mP@5", "mP@10" in percent, rounded to 2 decimals; "n_queries",
    "n_without_positives"}} for each setup of ``setups`` (see :func:`revisited_setups`)."""
    out: dict = {}
    for name, g in setups.items():
        m = compute_map(ranks, g, ks)
        row = {"mAP": round(100 * m["mAP"], 2)}
        row.update({f"mP@{k}": round(100 * m[f"mP@{k}"], 2) for k in ks})
        row.update({"n_queries": m["n_queries"], "n_without_positives": m["n_without_positives"]})
        out[name] = row
    return out


def ranks_from_similarity(sim: torch.Tensor | np.ndarray) -> np.ndarray:
    """int64 ranks [n_db, n_q] of a similarity matrix ``sim`` [n_db, n_q] (higher = more similar; torch or
    numpy): a stable descending sort of each column, so ties keep database order (NaN is ranked last)."""
    s = torch.nan_to_num(torch.as_tensor(sim).float(), nan=-float("inf"))
    return torch.argsort(s, dim=0, descending=True, stable=True).cpu().numpy().astype(np.int64)


def evaluate_setups(ranks: np.ndarray, gnd: Sequence[dict], ks: Sequence[int] = DEFAULT_KS) -> dict:
    """The revisited Easy / Medium / Hard scores (percent, see :func:`score_setups`) of ranks [n_db, n_q]
    and revisited gnd entries (``easy``, ``hard``, ``junk``); a setup none of whose queries has a positive
    is left out (so ``{}`` when no query has one)."""
    res = score_setups(ranks, revisited_setups(gnd), ks)
    return {k: v for k, v in res.items() if v["n_queries"] > 0}


def single_positive_ap(ranks: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Trapezoid AP [n_q] (fractions) of queries with one positive each: ``positive`` [n_q] database
    indices, ``ranks`` [n_db, n_q]. At 0-based position r the AP is 1 when r = 0, else (0 / r +
    1/(r+1)) / 2 = 1 / (2 (r+1)) (the Holidays / Copydays evaluator's rule, not 1 / (r+1))."""
    ranks = np.asarray(ranks)
    positive = np.asarray(positive, dtype=np.int64)
    r = np.argmax(ranks == positive[None, :], axis=0)  # 0-based position of each query's positive
    found = (ranks == positive[None, :]).any(axis=0)
    ap = np.where(r == 0, 1.0, 0.5 / (r + 1.0))
    return np.where(found, ap, 0.0)


def cosine_ranks(db: torch.Tensor, queries: torch.Tensor, valid_db: torch.Tensor | None = None,
                 chunk: int = 1024) -> np.ndarray:
    """Ranks [n_db, n_q] of L2-normalised descriptors ``db`` [n_db, D] against ``queries`` [n_q, D] by
    cosine similarity (their dot product); database rows with ``valid_db`` [n_db] False come last."""
    cols = []
    for i in range(0, queries.shape[0], chunk):
        sim = db.float() @ queries[i:i + chunk].float().T
        if valid_db is not None:
            sim[~valid_db.to(sim.device)] = -float("inf")
        cols.append(ranks_from_similarity(sim))
    return np.concatenate(cols, axis=1) if cols else np.zeros((db.shape[0], 0), np.int64)
