"""Reader (and result writer) of the DAVIS-2017 layout::

    DIR/JPEGImages/480p/<seq>/00000.jpg ...   frames (RGB JPEG)
    DIR/Annotations/480p/<seq>/00000.png ...  palette (or 8-bit grey) PNGs: one index per object,
                                              0 = background, 255 = void (ignored by the metrics)
    DIR/ImageSets/2017/<split>.txt            one sequence name per line

Results are written in the layout the davis2017 evaluator reads: ``OUT/<seq>/<frame>.png`` (palette PNG,
frame 0 = the given mask, the palette of the sequence's first annotation).

Everything is checked by :func:`load_davis` before any feature is computed; bad input is refused with a
:class:`fovea.errors.ConfigError` naming the file: a listed sequence missing, a sequence without frames or
without a first-frame mask, a mask that is not a palette / index PNG or has no object, an unreadable frame
(DAVIS frames cannot be skipped: the propagation needs every one), a frame or mask of another size.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fovea.errors import ConfigError

#: the ``--data`` prefix of this protocol
KIND = "davis"
#: the resolution folder read under JPEGImages/ and Annotations/
RESOLUTION = "480p"
#: the index of void pixels in DAVIS annotations (not an object; left out of J and F)
VOID = 255
#: PIL modes accepted as index masks
_INDEX_MODES = ("P", "L")


@dataclass(frozen=True)
class Sequence:
    """One DAVIS sequence: sorted frame files, sorted annotation files (the first is the first frame's
    mask), the frame size, the objects of the first mask (ids 1..n_objects, as the evaluator counts them)
    and that mask's palette (768 ints, or None for a grey index PNG)."""

    name: str
    frames: tuple[Path, ...]
    annotations: tuple[Path, ...]
    height: int
    width: int
    n_objects: int
    palette: tuple[int, ...] | None

    def result_name(self, frame: Path) -> str:
        """The result file name of a frame (``00007.jpg`` -> ``00007.png``)."""
        return frame.stem + ".png"


def parse_spec(spec: str) -> Path:
    """``davis:DIR`` (or a bare existing ``DIR``) -> the DAVIS root; another ``kind:`` is refused."""
    if spec.startswith(KIND + ":"):
        return Path(spec[len(KIND) + 1:]).expanduser()
    m = re.match(r"^([A-Za-z][A-Za-z0-9_]*):", spec)
    if m and not Path(spec).exists():
        raise ConfigError(f"--data {spec!r}: the video protocol reads DAVIS ('davis:DIR'), not {m.group(1)!r}")
    return Path(spec).expanduser()


def default_palette() -> tuple[int, ...]:
    """The DAVIS / PASCAL VOC colour map (768 ints): the bits of the index spread over R, G, B from the
    high bit down."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return tuple(pal)


def read_mask(path: Path) -> np.ndarray:
    """An index PNG -> its indices uint8 [H, W]; ConfigError naming ``path`` when unreadable or not a
    palette / 8-bit grey image (an RGB mask has no object indices)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.mode not in _INDEX_MODES:
                raise ConfigError(f"{path}: a DAVIS annotation must be a palette (P) or 8-bit index (L) PNG, "
                                  f"not mode {im.mode}")
            im.load()
            return np.array(im, dtype=np.uint8)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise ConfigError(f"{path}: unreadable annotation ({type(e).__name__}: {e})") from None


def mask_palette(path: Path) -> tuple[int, ...] | None:
    """The palette of a P-mode PNG padded to 768 ints, None for an L-mode PNG."""
    from PIL import Image
    with Image.open(path) as im:
        pal = im.getpalette() if im.mode == "P" else None
    if pal is None:
        return None
    return tuple(list(pal[:768]) + [0] * (768 - len(pal[:768])))


def read_frame(path: Path) -> np.ndarray:
    """A frame -> RGB uint8 [H, W, 3]; ConfigError naming ``path`` when unreadable."""
    from fovea.data.decode import decode_image
    img = decode_image(path)
    if img is None:
        raise ConfigError(f"{path}: unreadable frame (DAVIS frames cannot be skipped: every frame is propagated)")
    return img


def write_mask(path: Path, labels: np.ndarray, palette: tuple[int, ...] | None) -> None:
    """Write indices uint8 [H, W] as a palette PNG (``palette`` or the DAVIS default)."""
    from PIL import Image
    if labels.ndim != 2:
        raise ValueError(f"an index PNG needs a 2-D array, got shape {labels.shape}")
    im = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8))  # mode L: the indices as they are
    im.putpalette(list(palette if palette is not None else default_palette()))  # -> mode P, same indices
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="PNG")


def list_sequences(root: Path, split: str) -> list[str]:
    """The sequence names of ``ImageSets/2017/<split>.txt`` (blank lines ignored, order kept)."""
    if not root.is_dir():
        raise ConfigError(f"{root}: no such DAVIS folder")
    f = root / "ImageSets" / "2017" / f"{split}.txt"
    if not f.is_file():
        raise ConfigError(f"{f}: the split file of --split {split} is missing")
    names = [ln.strip() for ln in f.read_text().splitlines() if ln.strip()]
    if not names:
        raise ConfigError(f"{f}: lists no sequence")
    return names


def _header(path: Path, kind: str) -> tuple[str, tuple[int, int]]:
    """(PIL mode, (H, W)) of an image file from its header; ConfigError naming it when unreadable."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return str(im.mode), (int(im.size[1]), int(im.size[0]))
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{path}: unreadable {kind} ({type(e).__name__}: {e})") from None


def load_sequence(root: Path, name: str, check_frames: bool = True) -> Sequence:
    """Check and list one sequence (see the module doc); ``check_frames`` decodes every frame (the
    refusal of an unreadable frame before any work)."""
    fdir = root / "JPEGImages" / RESOLUTION / name
    adir = root / "Annotations" / RESOLUTION / name
    if not fdir.is_dir():
        raise ConfigError(f"{fdir}: sequence {name!r} of the split file is missing")
    frames = tuple(sorted(fdir.glob("*.jpg")))
    if not frames:
        raise ConfigError(f"{fdir}: sequence {name!r} has no .jpg frame")
    first = adir / (frames[0].stem + ".png")
    if not first.is_file():
        raise ConfigError(f"{first}: the first-frame mask of sequence {name!r} is missing")
    annotations = tuple(sorted(adir.glob("*.png")))
    if annotations[0] != first:
        raise ConfigError(f"{annotations[0]}: an annotation before the first frame {frames[0].name} of {name!r}")
    m0 = read_mask(first)
    h, w = m0.shape
    m0 = np.where(m0 == VOID, 0, m0)
    n_objects = int(m0.max())
    if n_objects == 0:
        raise ConfigError(f"{first}: the first-frame mask of {name!r} has no object (all background / void)")
    stems = {f.stem for f in frames}
    for a in annotations:
        if a.stem not in stems:
            raise ConfigError(f"{a}: annotation without a frame {a.stem}.jpg in {fdir}")
        if a != first:
            ma = read_mask(a)
            if ma.shape != (h, w):
                raise ConfigError(f"{a}: mask size {ma.shape[1]}x{ma.shape[0]} differs from {first} ({w}x{h})")
    for f in frames:
        fh, fw = read_frame(f).shape[:2] if check_frames else _header(f, "frame")[1]
        if (fh, fw) != (h, w):
            raise ConfigError(f"{f}: frame size {fw}x{fh} differs from its first mask {first} ({w}x{h})")
    return Sequence(name, frames, annotations, h, w, n_objects, mask_palette(first))


def load_davis(root: Path, split: str = "val", check_frames: bool = True) -> list[Sequence]:
    """Every sequence of ``split``, checked (see :func:`load_sequence`)."""
    return [load_sequence(root, n, check_frames) for n in list_sequences(root, split)]


def check_results(pred_dir: Path, seqs: list[Sequence]) -> None:
    """Refuse (naming the file) a missing or non-index result PNG for an annotated frame, or one of
    another size, before any scoring."""
    for s in seqs:
        for a in s.annotations:
            p = pred_dir / s.name / a.name
            if not p.is_file():
                raise ConfigError(f"{p}: no result for annotated frame {a.name} of {s.name!r}")
            mode, hw = _header(p, "result")
            if mode not in _INDEX_MODES:
                raise ConfigError(f"{p}: a result must be a palette (P) or 8-bit index (L) PNG, not mode {mode}")
            if hw != (s.height, s.width):
                raise ConfigError(f"{p}: result size {hw[1]}x{hw[0]} differs from the annotation ({s.width}x{s.height})")


def read_labels(paths: list[Path] | tuple[Path, ...]) -> np.ndarray:
    """Index PNGs -> uint8 [T, H, W]."""
    return np.stack([read_mask(p) for p in paths])
