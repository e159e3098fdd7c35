"""Readers of the retrieval and copy-detection layouts; every listed file is checked to exist before any work.

``roxford5k:DIR`` / ``rparis6k:DIR`` (revisitop's files): ``DIR/<name>/jpg/<image>.jpg`` and
``DIR/<name>/gnd_<name>.pkl``, a pickled dict {``imlist``: database image names, ``qimlist``: query image
names (both without ``.jpg``; queries are also files of ``jpg/``), ``gnd``: one dict per query {``bbx``:
[x1, y1, x2, y2] in original pixels, ``easy``, ``hard``, ``junk``: indices into ``imlist``}}. ``DIR`` may
also be the ``<name>`` folder itself.

``retrieval:DIR`` (a user's own set): ``DIR/queries/`` and ``DIR/database/`` (image files, sorted by
name), ``DIR/positives.csv`` with a header row ``query,database`` (file names, one positive pair a row)
and optionally ``DIR/junk.csv`` (same columns: pairs ignored in the scoring). One setup (reported under
"medium": positives = positives.csv, junk = junk.csv); queries without a positive are left out.

``copydays:DIR`` (the INRIA Copydays distribution as DINO v1's evaluator reads it): ``DIR/original/`` the
157 originals ``NNNN00.jpg`` (``NNNN`` = block id), ``DIR/strong/`` the 229 strong copies ``NNNNxx.jpg``
(``xx`` = copy number); optionally ``DIR/jpegqual/<q>/`` and ``DIR/crops/<p>/`` (the other blocks, files
named like their original). A copy's original is the original whose name starts with the same first 4
characters. Not part of Copydays: ``DIR/distractors/`` (used when present and --distractors is not given).
"""
from __future__ import annotations

import csv
import pickle
from dataclasses import dataclass
from pathlib import Path

from fovea.data.decode import IMAGE_EXTENSIONS
from fovea.errors import ConfigError

REVISITED = ("roxford5k", "rparis6k")


@dataclass
class RetrievalSet:
    """A retrieval set: ``queries`` [n_q] and ``database`` [n_db] image paths, ``gnd`` per query
    ({"easy", "hard", "junk"} for revisited sets, {"ok", "junk"} for a user's set; database indices),
    ``bbx`` per query ([x1, y1, x2, y2] or None) and ``kind`` ("roxford5k", "rparis6k" or "retrieval")."""

    kind: str
    root: Path
    queries: list[Path]
    database: list[Path]
    gnd: list[dict]
    bbx: list[list[float] | None]

    @property
    def revisited(self) -> bool:
        return self.kind in REVISITED


def parse_spec(spec: str, kinds: tuple[str, ...]) -> tuple[str, Path]:
    """``KIND:DIR`` -> (KIND, DIR) for KIND in ``kinds``; DIR must be a folder."""
    kind, sep, path = str(spec).partition(":")
    if not sep or kind not in kinds or not path:
        raise ConfigError(f"--data {spec!r}: expected {' or '.join(k + ':DIR' for k in kinds)}")
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"--data {spec}: {root} is not a folder")
    return kind, root


def load_retrieval(spec: str) -> RetrievalSet:
    """The set of ``roxford5k:DIR``, ``rparis6k:DIR`` or ``retrieval:DIR`` (see the module doc)."""
    kind, root = parse_spec(spec, (*REVISITED, "retrieval"))
    return load_revisited(kind, root) if kind in REVISITED else load_user_set(root)


def _image_path(folder: Path, stem: str, listed_in: Path) -> Path:
    name = str(stem)
    p = folder / (name if Path(name).suffix.lower() in IMAGE_EXTENSIONS else f"{name}.jpg")
    if not p.is_file():
        raise ConfigError(f"{p}: missing image (listed in {listed_in})")
    return p


def load_revisited(name: str, root: Path) -> RetrievalSet:
    """Read ``root/<name>/gnd_<name>.pkl`` (or ``root/gnd_<name>.pkl``) and check every image exists."""
    base = root / name if (root / name).is_dir() else root
    pkl = base / f"gnd_{name}.pkl"
    if not pkl.is_file():
        raise ConfigError(f"{pkl}: missing ground-truth pickle (the revisitop layout is DIR/{name}/jpg/*.jpg "
                          f"and DIR/{name}/gnd_{name}.pkl)")
    try:
        with open(pkl, "rb") as f:
            cfg = pickle.load(f)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ConfigError(f"{pkl}: cannot read the pickle ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise ConfigError(f"{pkl}: expected a dict with keys imlist, qimlist and gnd")
    imlist, qimlist, gnd = list(cfg["imlist"]), list(cfg["qimlist"]), list(cfg["gnd"])
    if len(gnd) != len(qimlist):
        raise ConfigError(f"{pkl}: {len(qimlist)} names in qimlist but {len(gnd)} gnd entries")
    n_db = len(imlist)
    entries: list[dict] = []
    boxes: list[list[float] | None] = []
    for i, g in enumerate(gnd):
        if not isinstance(g, dict):
            raise ConfigError(f"{pkl}: gnd[{i}] is not a dict")
        entry = {}
        for key in ("easy", "hard", "junk"):
            idx = [int(v) for v in g.get(key, [])]
            bad = [v for v in idx if not 0 <= v < n_db]
            if bad:
                raise ConfigError(f"{pkl}: gnd[{i}]['{key}'] holds index {bad[0]}, outside the {n_db} images "
                                  "of imlist")
            entry[key] = idx
        entries.append(entry)
        b = g.get("bbx")
        if b is not None and len(b) != 4:
            raise ConfigError(f"{pkl}: gnd[{i}]['bbx'] must be [x1, y1, x2, y2]")
        boxes.append(None if b is None else [float(v) for v in b])
    jpg = base / "jpg"
    if not jpg.is_dir():
        raise ConfigError(f"{jpg}: missing image folder (the revisitop layout is DIR/{name}/jpg/)")
    queries = [_image_path(jpg, q, pkl) for q in qimlist]
    database = [_image_path(jpg, d, pkl) for d in imlist]
    return RetrievalSet(name, base, queries, database, entries, boxes)


def list_images(folder: Path, what: str) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (refused when the folder is missing or empty)."""
    if not folder.is_dir():
        raise ConfigError(f"{folder}: missing folder ({what})")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ConfigError(f"{folder}: no image files ({what})")
    return files


def _read_pairs(path: Path) -> list[tuple[str, str]]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it ({e})") from None
    out = []
    for i, r in enumerate(rows):
        q, d = (r.get("query") or "").strip(), (r.get("database") or "").strip()
        if not q or not d:
            raise ConfigError(f"{path}: row {i + 2} lacks a query or database file name (header: query,database)")
        out.append((q, d))
    return out


def load_user_set(root: Path) -> RetrievalSet:
    """A user's own set ``root/queries``, ``root/database``, ``positives.csv`` [, ``junk.csv``]."""
    queries = list_images(root / "queries", "retrieval:DIR needs DIR/queries/")
    database = list_images(root / "database", "retrieval:DIR needs DIR/database/")
    pos_csv, junk_csv = root / "positives.csv", root / "junk.csv"
    if not pos_csv.is_file():
        raise ConfigError(f"{pos_csv}: missing (a CSV with the header query,database: one positive pair a row)")
    qi = {p.name: i for i, p in enumerate(queries)}
    di = {p.name: i for i, p in enumerate(database)}
    gnd: list[dict] = [{"ok": [], "junk": []} for _ in queries]
    for path, key in ((pos_csv, "ok"), (junk_csv, "junk")):
        if key == "junk" and not path.is_file():
            continue
        for q, d in _read_pairs(path):
            if q not in qi:
                raise ConfigError(f"{path}: query {q!r} is not a file of {root / 'queries'}")
            if d not in di:
                raise ConfigError(f"{path}: database image {d!r} is not a file of {root / 'database'}")
            if di[d] not in gnd[qi[q]][key]:
                gnd[qi[q]][key].append(di[d])
    return RetrievalSet("retrieval", root, queries, database, gnd, [None] * len(queries))


@dataclass
class CopydaysSet:
    """Copydays: ``originals`` [n_o] paths, ``queries`` [n_q] paths with ``positive`` [n_q] (index of each
    query's original), ``blocks`` [n_q] (the query's block folder, e.g. "strong")."""

    root: Path
    originals: list[Path]
    queries: list[Path]
    positive: list[int]
    blocks: list[str]


def load_copydays(spec: str, blocks: list[str]) -> CopydaysSet:
    """The originals and the query ``blocks`` (folders below DIR: "strong", "jpegqual/50", "crops/20"...)
    of ``copydays:DIR``; every query must have an original with its first 4 characters."""
    _, root = parse_spec(spec, ("copydays",))
    originals = list_images(root / "original", "copydays:DIR needs DIR/original/NNNN00.jpg")
    by_block: dict[str, int] = {}
    for i, p in enumerate(originals):
        if p.name[:4] in by_block:
            raise ConfigError(f"{p}: a second original of block {p.name[:4]} (also {originals[by_block[p.name[:4]]]})")
        by_block[p.name[:4]] = i
    queries: list[Path] = []
    positive: list[int] = []
    names: list[str] = []
    for b in blocks:
        for p in list_images(root / b, f"query block {b!r} of copydays:DIR"):
            if p.name[:4] not in by_block:
                raise ConfigError(f"{p}: no original {p.name[:4]}00.jpg in {root / 'original'} (a copy's "
                                  "original shares its first 4 characters)")
            queries.append(p)
            positive.append(by_block[p.name[:4]])
            names.append(b)
    return CopydaysSet(root, originals, queries, positive, names)
