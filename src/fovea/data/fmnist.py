"""Fashion-MNIST from its IDX files: local copies (Debian, a user folder) or a verified download."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import urllib.request

import numpy as np

from fovea.data.base import ImageSource
from fovea.data.decode import FMNIST_CHECKSUMS, FileSum, read_idx, verify_fmnist_file


FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FMNIST_DEFAULT_DIRS = ("/usr/share/datasets/fashion-mnist", "~/.cache/fovea/fashion-mnist")
_FMNIST_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _idx_file(directory: str, stem: str) -> str | None:
    """Path of ``stem`` or ``stem.gz`` in ``directory`` (un-gzipped preferred), else None."""
    for name in (stem, stem + ".gz"):
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    return None


def find_fmnist_dir(path: str = "", split: str = "train") -> str:
    """Directory holding the Fashion-MNIST IDX files of ``split``.

    ``path`` given: it must contain them. ``path == ""``: tries ``$FOVEA_FMNIST_DIR``, then
    ``/usr/share/datasets/fashion-mnist``, then ``~/.cache/fovea/fashion-mnist``.
    Raises ``FileNotFoundError`` explaining how to get the data.
    """
    if split not in _FMNIST_STEMS:
        raise ValueError(f"fmnist split must be 'train' or 'test', got {split!r}")
    wanted = " and ".join(f"{s}[.gz]" for s in _FMNIST_STEMS[split])
    if path:
        d = os.path.expanduser(path)
        if not os.path.isdir(d):
            raise FileNotFoundError(f"Fashion-MNIST directory {path!r} does not exist")
        if not all(_idx_file(d, s) for s in _FMNIST_STEMS[split]):
            raise FileNotFoundError(f"Fashion-MNIST directory {path!r} lacks {wanted}")
        return d
    env = os.environ.get("FOVEA_FMNIST_DIR", "")
    candidates = ([env] if env else []) + [os.path.expanduser(p) for p in FMNIST_DEFAULT_DIRS]
    for d in candidates:
        if os.path.isdir(d) and all(_idx_file(d, s) for s in _FMNIST_STEMS[split]):
            return d
    raise FileNotFoundError(
        f"Fashion-MNIST ({wanted}) not found; looked in: {', '.join(candidates)} "
        "(first is $FOVEA_FMNIST_DIR if set). Get it with one of: "
        "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu, installs to "
        "/usr/share/datasets/fashion-mnist); `fovea data download fmnist` (downloads to "
        "~/.cache/fovea/fashion-mnist); or pass path=... (source.path) pointing to a directory "
        "with the four IDX files."
    )


class FashionMNISTSource(ImageSource):
    """Fashion-MNIST split held in memory: images uint8 ``[N, 28, 28]``, labels ``[N]``."""

    def __init__(self, path: str = "", split: str = "train") -> None:
        d = find_fmnist_dir(path, split)
        img_stem, lab_stem = _FMNIST_STEMS[split]
        img_path, lab_path = _idx_file(d, img_stem), _idx_file(d, lab_stem)
        assert img_path and lab_path
        self.images = read_idx(img_path, expect_magic=2051)  # [N, 28, 28] uint8
        labels = read_idx(lab_path, expect_magic=2049)  # [N] uint8
        if labels.shape[0] != self.images.shape[0]:
            raise ValueError(f"{img_path} has {self.images.shape[0]} images but {lab_path} "
                             f"has {labels.shape[0]} labels")
        if labels.size and labels.max() >= len(FMNIST_CLASSES):
            raise ValueError(f"{lab_path}: label {int(labels.max())} out of range 0..9")
        self.labels = labels.astype(np.int64)
        self.class_names = list(FMNIST_CLASSES)
        self.name = f"fmnist:{split} ({d})"

    def load(self, i: int) -> np.ndarray | None:
        """Gray 28x28 repeated to RGB: uint8 ``[28, 28, 3]``."""
        g = self.images[self._check_index(i)]
        return np.repeat(g[:, :, None], 3, axis=2)


def download_fmnist(dest: str = "~/.cache/fovea/fashion-mnist", base_url: str = FMNIST_URL,
                    checksums: dict[str, FileSum] | None = None, timeout: float = 60.0) -> str:
    """Download the four Fashion-MNIST .gz files into ``dest`` and verify them; returns ``dest``.

    Files already present and valid are kept. Each file is written to a temporary file and
    moved into place with ``os.replace`` only after its checksum matched; on a mismatch the
    temporary file is deleted and ``ValueError`` is raised. ``base_url`` may be ``file://``.
    """
    dest = os.path.expanduser(dest)
    os.makedirs(dest, exist_ok=True)
    base = base_url if base_url.endswith("/") else base_url + "/"
    for name, expected in (checksums or FMNIST_CHECKSUMS).items():
        final = os.path.join(dest, name)
        if os.path.isfile(final) and verify_fmnist_file(final, expected) is None:
            continue
        url = base + name
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as r:
                shutil.copyfileobj(r, out, 1 << 20)
            problem = verify_fmnist_file(tmp, expected)
            if problem is not None:
                raise ValueError(f"checksum mismatch for {url}: {problem}; file discarded")
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    return dest
