"""Robustness on a class subset (--test-classes): parsing, label mapping and the restricted argmax of k-NN
and the linear probe, on hand cases."""
from __future__ import annotations

import pytest
import torch

from fovea.errors import ConfigError
from fovea.eval.knn import knn_accuracy
from fovea.eval.linear import grid_accuracy
from fovea.eval.subset import load_test_classes, restricted_argmax, to_train_labels


def test_load_forms(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("# ImageNet-R subset\n3, 7\n1\n")
    b = tmp_path / "b.json"
    b.write_text("[3, 7, 1]")
    assert load_test_classes(a) == [3, 7, 1] == load_test_classes(b)


@pytest.mark.parametrize("text,msg", [("", "non-empty"), ("1 x", "integers"), ("1 -2", "negative"),
                                      ("1 2 1", "repeated"), ('["a"]', "integer")])
def test_load_refusals_name_the_file(tmp_path, text, msg):
    f = tmp_path / "classes.txt"
    f.write_text(text)
    with pytest.raises(ConfigError, match=msg) as e:
        load_test_classes(f)
    assert "classes.txt" in str(e.value)
    with pytest.raises(ConfigError, match="missing.txt"):
        load_test_classes(tmp_path / "missing.txt")


def test_label_modes():
    classes = [5, 2, 9]
    assert to_train_labels(torch.tensor([0, 2, 1, -1]), classes).tolist() == [5, 9, 2, -1]
    assert to_train_labels(torch.tensor([9, 5]), classes, "train").tolist() == [9, 5]
    with pytest.raises(ConfigError, match="outside"):
        to_train_labels(torch.tensor([3]), classes)
    with pytest.raises(ConfigError, match="not among"):
        to_train_labels(torch.tensor([4]), classes, "train")


def test_restricted_argmax_hand_case():
    s = torch.tensor([[5.0, 1.0, 3.0], [0.0, 9.0, 2.0], [1.0, 2.0, 3.0]])
    assert s.argmax(1).tolist() == [0, 1, 2]
    # among classes 0 and 2 only: row 0 -> 0 (5 > 3), row 1 -> 2 (2 > 0), row 2 -> 2
    assert restricted_argmax(s, [0, 2]).tolist() == [0, 2, 2]
    assert restricted_argmax(s, None).tolist() == [0, 1, 2]


def test_knn_restricted_votes():
    # train: class 0 at e0, class 1 at e1, class 2 at e2; the test point sits nearest class 1 but is class 2
    tr = torch.eye(3)
    ytr = torch.tensor([0, 1, 2])
    te = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.2]])
    # test labels index the subset [0, 2]: label 1 -> class 2, label 0 -> class 0
    yte = torch.tensor([1, 0])
    full = knn_accuracy(tr, ytr, te, to_train_labels(yte, [0, 2]), [3])
    assert full[3] == 50.0  # row 0 votes class 1 (wrong), row 1 class 0 (right)
    sub = knn_accuracy(tr, ytr, te, yte, [3], test_classes=[0, 2])
    assert sub[3] == 100.0  # class 1 cannot be predicted: row 0 -> class 2 (its second-best vote)


def test_linear_grid_restricted():
    # one head (L = 1) with identity weights on 3 classes; logits = features
    w = torch.eye(3)[None]
    b = torch.zeros(1, 3)
    feats = {"f": torch.tensor([[1.0, 3.0, 2.0], [4.0, 5.0, 0.0]])}
    labels = torch.tensor([2, 0])
    assert grid_accuracy({"f": (w, b)}, feats, labels)["f"].tolist() == [0.0]
    assert grid_accuracy({"f": (w, b)}, feats, labels, [0, 2])["f"].tolist() == [100.0]
