"""Calibration sets and their held-out split."""

from __future__ import annotations

import numpy as np

from t2tedge.calibration import calibration_set
from t2tedge.data.datasets import open_dataset
from t2tedge.models.spec import Preprocess

PRE = Preprocess(input_size=32, resize_size=32, interpolation="bilinear")


def test_heldout_split_is_disjoint_class_balanced_and_deterministic() -> None:
    source = open_dataset("fashion_mnist:train")
    calib = calibration_set(source, PRE, size=100, seed=0)
    heldout = calib.heldout(50)
    assert heldout is not None and len(heldout.indices) == 50
    assert not set(heldout.indices.tolist()) & set(calib.indices.tolist())
    assert np.bincount(source.labels[heldout.indices], minlength=10).tolist() == [5] * 10
    again = calibration_set(source, PRE, size=100, seed=0).heldout(50)
    assert again is not None and np.array_equal(again.indices, heldout.indices) and again.key == heldout.key
    assert heldout.key != calib.key and heldout.what == "held-out"
    assert calib.heldout(0) is None
