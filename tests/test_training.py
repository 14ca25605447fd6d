"""`t2tedge train` on a tiny subset, and the bundled demo models' accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from t2tedge.calibration import select_indices
from t2tedge.data.datasets import open_dataset, select
from t2tedge.models import DEMO_WEIGHTS_DIR, demo_checkpoint, get_spec, load_model
from t2tedge.training import TrainConfig, evaluate_torch, train


def test_train_writes_checkpoint_and_record_that_reload(tmp_path: Path) -> None:
    full = open_dataset("fashion_mnist:train")
    train_set = select(full, select_indices(full.labels, 200, seed=0))
    test = open_dataset("fashion_mnist:test")
    test_set = select(test, select_indices(test.labels, 100, seed=0))
    out = tmp_path / "m.pt"
    cfg = TrainConfig(epochs=2, image_size=32, crop_pct=1.0, batch_size=32, lr=2e-3)
    record = train(get_spec("mobilenet_v3_small"), train_set, test_set, out, cfg)
    assert json.loads(out.with_suffix(".json").read_text())["top1"] == record["top1"]
    assert record["epochs"] == 2 and record["train_images"] == 200 and record["test_images"] == 100
    loaded = load_model(get_spec("mobilenet_v3_small"), out)
    assert loaded.num_classes == 10 and loaded.image_size == 32 and loaded.preprocess.crop_pct == 1.0
    assert loaded.classes == full.classes
    # The saved weights are the trained ones: re-evaluating reproduces the recorded accuracy.
    assert evaluate_torch(loaded.model, test_set, loaded.preprocess) == pytest.approx(record["top1"], abs=0.01)


@pytest.mark.parametrize("name", sorted(p.name.split("-")[0] for p in DEMO_WEIGHTS_DIR.glob("*-fashion_mnist.pt")))
def test_demo_model_reaches_85_percent_on_bundled_test_split(name: str) -> None:
    loaded = load_model(get_spec(name), demo_checkpoint(name))
    top1 = evaluate_torch(loaded.model, open_dataset("fashion_mnist:test"), loaded.preprocess)
    assert top1 >= 85.0


def test_demo_models_are_bundled() -> None:
    names = {p.name.split("-")[0] for p in DEMO_WEIGHTS_DIR.glob("*-fashion_mnist.pt")}
    assert {"t2t_vit_7", "mobilenet_v2"} <= names
