"""Checkpoint loading: official layout, strictness, and refusing what is unsafe or wrong."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

from t2tedge.errors import CheckpointError
from t2tedge.models import get_spec, load_model, save_checkpoint


def _official(tmp_path: Path, key: str = "state_dict_ema") -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = get_spec("t2t_vit_7").create(num_classes=10, image_size=32)
    path = tmp_path / "official.pth.tar"
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({key: state, "epoch": 300, "arch": "t2t_vit_7"}, path)
    return path, model


@pytest.mark.parametrize("key", ["state_dict_ema", "state_dict"])
def test_official_layout_loads_strictly_and_reproduces(tmp_path: Path, key: str) -> None:
    path, model = _official(tmp_path, key)
    loaded = load_model(get_spec("t2t_vit_7"), path, image_size=32)
    assert loaded.num_classes == 10  # read from head.weight, no flag needed
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), model(x), atol=1e-6)


def test_bare_state_dict_with_official_names_loads(tmp_path: Path) -> None:
    model = get_spec("t2t_vit_t_14").create(num_classes=5, image_size=32)
    path = tmp_path / "bare.pth"
    torch.save(model.state_dict(), path)
    assert load_model(get_spec("t2t_vit_t_14"), path, image_size=32).num_classes == 5


def test_our_checkpoint_carries_its_preprocessing(tmp_path: Path) -> None:
    model = get_spec("mobilenet_v3_small").create(num_classes=3)
    pre = {"input_size": 48, "resize_size": 48, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}
    save_checkpoint(
        tmp_path / "m.pt", model, {"model": "mobilenet_v3_small", "classes": ["a", "b", "c"], "preprocess": pre}
    )
    loaded = load_model(get_spec("mobilenet_v3_small"), tmp_path / "m.pt")
    assert (loaded.image_size, loaded.classes, loaded.preprocess.mean) == (48, ["a", "b", "c"], (0.5, 0.5, 0.5))
    with pytest.raises(CheckpointError, match="trained as 'mobilenet_v3_small'"):
        load_model(get_spec("mobilenet_v2"), tmp_path / "m.pt")


def test_missing_truncated_and_foreign_files(tmp_path: Path) -> None:
    spec = get_spec("t2t_vit_7")
    with pytest.raises(CheckpointError, match="not found"):
        load_model(spec, tmp_path / "nope.pth")
    path, _ = _official(tmp_path)
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_model(spec, truncated)
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_model(spec, text)


def test_other_architecture_names_the_mismatch(tmp_path: Path) -> None:
    path, _ = _official(tmp_path)  # a t2t_vit_7 checkpoint
    with pytest.raises(CheckpointError, match=r"does not fit t2t_vit_12: .*missing \(e\.g\. blocks\.7\."):
        load_model(get_spec("t2t_vit_12"), path, image_size=32)
    with pytest.raises(CheckpointError, match=r"shape mismatches"):
        load_model(get_spec("t2t_vit_14"), path, image_size=32)
    with pytest.raises(CheckpointError, match="no 'classifier.1.weight'"):
        load_model(get_spec("mobilenet_v2"), path)


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pickle code ran",))


def test_checkpoint_needing_pickled_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": collections.OrderedDict(), "payload": _Payload()}, path)
    with pytest.raises(CheckpointError, match="needs pickled Python code"):
        load_model(get_spec("t2t_vit_7"), path)
    assert "pickle code ran" not in capsys.readouterr().out
