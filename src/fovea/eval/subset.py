"""Robustness evaluation on a test set whose classes are a subset of the training classes (ImageNet-A and
ImageNet-R: 200 of the 1000 classes; Franca and DINOv2 tables): the classifier's scores are restricted to the
subset's classes before the argmax.

``--test-classes FILE`` lists the subset as training-class indices: integers separated by commas, spaces or
new lines (``#`` starts a comment), or a JSON list. The test set's labels either index that list (``subset``,
the default: label i of the test set is training class ``FILE[i]``, as a folder of the 200 class folders sorted
like the list gives) or are training-class indices already (``train``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from fovea.errors import ConfigError

LABEL_MODES = ("subset", "train")


def load_test_classes(path: str | Path) -> list[int]:
    """The training-class indices listed in ``path`` (see the module docstring); refuses an unreadable,
    empty, non-integer, negative or repeated list, naming the file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"--test-classes {p}: cannot read it ({e.strerror or e})") from None
    try:
        if text.lstrip().startswith("["):
            vals = json.loads(text)
        else:
            vals = [int(t) for t in re.split(r"[\s,]+", re.sub(r"#[^\n]*", "", text)) if t]
    except ValueError:
        raise ConfigError(f"--test-classes {p}: expected training-class indices (integers, or a JSON list)") from None
    if not vals or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        raise ConfigError(f"--test-classes {p}: expected a non-empty list of integer training-class indices")
    if min(vals) < 0:
        raise ConfigError(f"--test-classes {p}: negative class index {min(vals)}")
    if len(set(vals)) != len(vals):
        dup = sorted({v for v in vals if vals.count(v) > 1})
        raise ConfigError(f"--test-classes {p}: repeated class indices {dup[:5]}")
    return [int(v) for v in vals]


def to_train_labels(labels: Tensor, classes: list[int], mode: str = "subset") -> Tensor:
    """Test labels [M] as training-class indices: ``subset`` maps label i to ``classes[i]``; ``train``
    keeps them (each must be in ``classes``). Labels < 0 (unlabelled) stay as they are."""
    if mode not in LABEL_MODES:
        raise ConfigError(f"--test-labels {mode!r}: choose from {', '.join(LABEL_MODES)}")
    lab = labels.long()
    valid = lab >= 0
    if mode == "subset":
        if valid.any() and int(lab[valid].max()) >= len(classes):
            raise ConfigError(f"test label {int(lab[valid].max())} is outside the {len(classes)} classes of "
                              "--test-classes (--test-labels subset: label i is the i-th listed class)")
        table = torch.tensor(classes, dtype=torch.long)
        return torch.where(valid, table[lab.clamp_min(0)], lab)
    allowed = torch.zeros(max(classes) + 1 + int(lab.max().clamp_min(0)) + 1, dtype=torch.bool)
    allowed[torch.tensor(classes)] = True
    bad = valid & ~allowed[lab.clamp_min(0)]
    if bad.any():
        raise ConfigError(f"test label {int(lab[bad][0])} is not among --test-classes (--test-labels train)")
    return lab


def check_classes(classes: list[int], num_classes: int) -> None:
    """Refuse subset classes the classifier does not have (indices >= ``num_classes``)."""
    if max(classes) >= num_classes:
        raise ConfigError(f"--test-classes lists class {max(classes)}, but the training set has only "
                          f"{num_classes} classes")


def restricted_argmax(scores: Tensor, classes: list[int] | Tensor | None) -> Tensor:
    """argmax over the last dim of ``scores`` [..., C] among ``classes`` only (all when None), as
    training-class indices [...]."""
    if classes is None:
        return scores.argmax(-1)
    idx = torch.as_tensor(classes, dtype=torch.long, device=scores.device)
    return idx[scores.index_select(-1, idx).argmax(-1)]
