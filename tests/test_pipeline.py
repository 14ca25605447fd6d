"""Export parity, recipes and the build spine on tiny configs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from t2tedge.calibration.onnx_session import OnnxSession
from t2tedge.errors import RecipeError, T2tedgeError
from t2tedge.models import get_spec, save_checkpoint
from t2tedge.models.spec import Preprocess
from t2tedge.pipeline.build import Builder
from t2tedge.pipeline.export import export_onnx, torch_logits
from t2tedge.pipeline.recipe import load_recipe


@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14", "mobilenet_v2"])
def test_onnx_export_matches_pytorch(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = get_spec(name).create(num_classes=10, image_size=32)
    export_onnx(model, 32, tmp_path / "m.onnx")
    images = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    onnx_logits = OnnxSession(tmp_path / "m.onnx")(images)
    assert onnx_logits.shape == (4, 10)
    assert np.abs(onnx_logits - torch_logits(model, images)).max() <= 1e-4


def test_dynamic_batch_export_runs_any_batch(tmp_path: Path) -> None:
    model = get_spec("mobilenet_v3_small").create(num_classes=10, image_size=32)
    export_onnx(model, 32, tmp_path / "m.onnx", dynamic_batch=True)
    runner = OnnxSession(tmp_path / "m.onnx")
    assert runner.fixed_batch is None
    assert runner(np.zeros((3, 3, 32, 32), np.float32)).shape == (3, 10)


def _tiny_checkpoint(tmp_path: Path, name: str = "t2t_vit_7", size: int = 32) -> Path:
    torch.manual_seed(0)
    model = get_spec(name).create(num_classes=10, image_size=size)
    path = tmp_path / f"{name}.pt"
    pre = Preprocess(input_size=size, resize_size=size, interpolation="bilinear")
    save_checkpoint(path, model, {"model": name, "classes": [str(i) for i in range(10)], "preprocess": pre.to_dict()})
    return path


def _recipe(tmp_path: Path, checkpoint: Path, **extra: object) -> Path:
    recipe = {
        "name": "tiny",
        "output_dir": str(tmp_path / "artifacts"),
        "models": [{"name": "t2t_vit_7", "weights": str(checkpoint)}],
        "data": {"limit": 40},
        "export": {"parity_images": 8},
        "benchmark": {"warmup": 1, "min_iters": 5, "min_seconds": 0, "efficiency": False},
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


def test_build_exports_validates_and_reuses(tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(tmp_path, _tiny_checkpoint(tmp_path)))
    rows = Builder(recipe).run()
    assert len(rows) == 1 and not rows[0].reused
    row = rows[0]
    manifest = json.loads((Path(row.artifact) / "manifest.json").read_text())
    assert manifest["target"] == "onnxruntime" and manifest["precision"] == "fp32"
    (accuracy,) = manifest["validation"].values()
    assert accuracy["label"] == "measured" and accuracy["images"] == 40
    assert accuracy["vs_fp32_torch"]["logit_abs_err_max"] < 1e-3
    assert accuracy["vs_fp32_torch"]["top1_agreement"] == 100.0
    export_manifest = json.loads(
        next((tmp_path / "artifacts" / "t2t_vit_7" / "export").glob("onnx-*/manifest.json")).read_text()
    )
    assert export_manifest["parity"]["images"] == 8
    assert export_manifest["parity"]["logit_abs_err_max"] <= 1e-4
    again = Builder(recipe).run()
    assert again[0].reused and again[0].artifact == row.artifact
    assert again[0].accuracy == row.accuracy
    summary = json.loads((tmp_path / "artifacts" / "tiny-summary.json").read_text())
    assert summary["rows"][0]["model"] == "t2t_vit_7"
    # the latency stage ran once and its stored numbers were reused by the second build
    (latency,) = summary["rows"][0]["latency"].values()
    assert latency["label"] == "measured" and latency["iterations"] >= 5 and latency["reused"]
    assert latency["latency_ms_p50"] == row.latency[next(iter(row.latency))]["latency_ms_p50"]
    assert summary["models"]["t2t_vit_7"]["fp32_torch"]["top1"] == accuracy["top1"]


def test_target_sections_are_validated_by_each_targets_config(tmp_path: Path) -> None:
    from t2tedge.targets.openvino import OpenVinoConfig
    from t2tedge.targets.tensorrt import TensorRtConfig

    path = tmp_path / "r.yaml"
    path.write_text("models: [t2t_vit_7]\nquantization: {method: entropy, openvino: {preset: mixed}}\n")
    quantization = load_recipe(path).quantization
    openvino, tensorrt = quantization.for_target("openvino"), quantization.for_target("tensorrt")
    assert isinstance(openvino, OpenVinoConfig) and isinstance(tensorrt, TensorRtConfig)
    assert openvino.preset == "mixed" and openvino.method == tensorrt.method == "entropy"  # shared key
    cases = {
        "quantization: {openvino: {presett: mixed}}": r"quantization: openvino\.presett: Extra inputs",
        "quantization: {tensorrt: {calibration_method: best}}": r"tensorrt\.calibration_method: Input should be",
        "quantization: {tensorrtt: {}}": r"unknown key 'tensorrtt' \(shared keys: .*; targets: .*tensorrt",
        "quantization: {coreml: [iOS17]}": r"coreml must be a mapping",
    }
    for text, message in cases.items():
        path.write_text(f"models: [t2t_vit_7]\n{text}\n")
        with pytest.raises(RecipeError, match=message) as error:
            load_recipe(path)
        assert "\n" not in str(error.value)


def test_recipe_errors_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("models: [t2t_vit_7]\ncalibration: {size: many}\n")
    with pytest.raises(RecipeError, match=r"calibration\.size"):
        load_recipe(path)
    path.write_text("models: [t2t_vit_7]\ntargetz: [onnxruntime]\n")
    with pytest.raises(RecipeError, match="targetz"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_builder_refuses_unknown_names_before_work(tmp_path: Path) -> None:
    ckpt = _tiny_checkpoint(tmp_path)
    with pytest.raises(T2tedgeError, match="unknown target 'tensorrtx'"):
        Builder(load_recipe(_recipe(tmp_path, ckpt, targets=["tensorrtx"])))
    with pytest.raises(T2tedgeError, match="no precision 'int3'"):
        Builder(load_recipe(_recipe(tmp_path, ckpt, precisions=["int3"])))
    assert not (tmp_path / "artifacts").exists()


def test_bundled_demo_recipe_loads() -> None:
    recipe = load_recipe("demo")
    assert [m.name for m in recipe.models] == ["t2t_vit_7", "mobilenet_v2", "mobilenet_v3_small"]
    assert recipe.benchmark.enabled
    assert recipe.targets == ["onnxruntime", "openvino", "tensorrt", "coreml", "executorch"]


def test_performer_epsilon_survives_onnx_export(tmp_path: Path) -> None:
    # The exporter's optimizer once deleted `D + 1e-8` as an add of zero, giving NaN logits. The 1e-8 now
    # enters rescaled; with q scaled up the official normalizer falls far below 1e-8 on some tokens, where
    # the epsilon decides the layer's output: the export must follow PyTorch there too.
    from t2tedge.calibration.onnx_session import OnnxSession

    torch.manual_seed(0)
    model = get_spec("t2t_vit_7").create(num_classes=10, image_size=32, depth=1).eval()
    with torch.no_grad():
        model.tokens_to_token.attention1.kqv.weight[64:128] *= 8.0
        model.head.weight *= 100  # logits of ~60: dropping the epsilon moves them by ~0.09
    export_onnx(model, 32, tmp_path / "m.onnx")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
        without_eps = model.tokens_to_token.attention1
        k, q, _ = without_eps.kqv(without_eps.norm1(model.tokens_to_token.soft_split0(x).transpose(1, 2))).split(64, -1)
        tiny = (q @ without_eps.w.t() - (q * q).sum(-1, keepdim=True) / 2).amax(-1)  # log of phi(q) * sqrt(m), max
    assert (tiny < -30).any()  # the regime where the epsilon dominates
    assert np.abs(OnnxSession(tmp_path / "m.onnx")(x.numpy()) - expected).max() < 1e-2


def test_imagenet_recipe_takes_paths_as_variables(tmp_path: Path) -> None:
    variables = {"T2T_CHECKPOINTS": str(tmp_path), "IMAGENET_VAL": "/data/val", "IMAGENET_TRAIN": "/data/train"}
    recipe = load_recipe("imagenet", variables=variables)
    names = [m.name for m in recipe.models]
    assert names == ["t2t_vit_7", "t2t_vit_12", "t2t_vit_14", "t2t_vit_t_14"] + [
        "mobilenet_v2",
        "mobilenet_v3_large",
        "mobilenet_v3_small",
    ]
    # each T2T-ViT entry names its official checkpoint file, whose name starts with the paper's top-1
    for entry in recipe.models[:4]:
        path = Path(entry.weights)
        assert path.parent == tmp_path and path.name.endswith(".pth.tar")
        assert float(path.name.split("_")[0]) == get_spec(entry.name).paper.top1
    assert recipe.data.validation == "/data/val" and recipe.data.calibration == "/data/train"
    with pytest.raises(RecipeError, match=r"needs \$\{IMAGENET_VAL\}"):
        load_recipe("imagenet", variables={"T2T_CHECKPOINTS": "x", "IMAGENET_TRAIN": "y"})


def test_compile_key_covers_t2tedge_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from t2tedge.pipeline import build

    ckpt = _tiny_checkpoint(tmp_path)
    no_bench = {"warmup": 1, "min_iters": 5, "min_seconds": 0, "efficiency": False, "enabled": False}
    (first,) = Builder(load_recipe(_recipe(tmp_path, ckpt, benchmark=no_bench))).run()
    manifest = json.loads((Path(first.artifact) / "manifest.json").read_text())
    assert manifest["config"]["rules"] == build.rules_digest("onnxruntime")
    export_config = json.loads(next(Path(first.artifact).parent.parent.glob("export/onnx-*/manifest.json")).read_text())
    assert {"onnx", "onnxscript", "t2tedge", "model_source"} <= set(export_config["config"])
    # an unrelated change (the latency settings) reuses the artifact
    (same,) = Builder(load_recipe(_recipe(tmp_path, ckpt, benchmark={**no_bench, "min_iters": 9}))).run()
    assert same.reused and same.artifact == first.artifact
    # a changed rule rebuilds
    monkeypatch.setattr(build, "rules_digest", lambda target: "changed-rule")
    (rebuilt,) = Builder(load_recipe(_recipe(tmp_path, ckpt, benchmark=no_bench))).run()
    assert not rebuilt.reused and rebuilt.artifact != first.artifact


def test_rules_digest_covers_shipped_scripts_and_shared_quantizers(monkeypatch: pytest.MonkeyPatch) -> None:
    from t2tedge.pipeline import build

    before = {name: build.rules_digest(name) for name in ("onnxruntime", "tensorrt")}
    real = build.sha256_file

    def edited(name: str):  # noqa: ANN202
        return lambda path: "edited" if Path(path).name == name else real(path)

    try:
        build._sources_digest.cache_clear()
        monkeypatch.setattr(build, "sha256_file", edited("tensorrt_build_engine.py"))
        assert build.rules_digest("tensorrt") != before["tensorrt"]
        assert build.rules_digest("onnxruntime") == before["onnxruntime"]
        build._sources_digest.cache_clear()
        monkeypatch.setattr(build, "sha256_file", edited("onnx_qdq.py"))
        assert build.rules_digest("onnxruntime") != before["onnxruntime"]
        build._sources_digest.cache_clear()  # the FP16 emulation decides TensorRT's pins, not ONNX Runtime's files
        monkeypatch.setattr(build, "sha256_file", edited("onnx_fp16.py"))
        assert build.rules_digest("tensorrt") != before["tensorrt"]
        assert build.rules_digest("onnxruntime") == before["onnxruntime"]
    finally:
        build._sources_digest.cache_clear()


def test_calibration_validation_overlap_is_an_error_unless_allowed(tmp_path: Path) -> None:
    from t2tedge.errors import DatasetError
    from t2tedge.report import write_report

    ckpt = _tiny_checkpoint(tmp_path)
    same = {"calibration": "fashion_mnist:test", "validation": "fashion_mnist:test", "limit": 40}
    extra = {"precisions": ["int8"], "calibration": {"size": 16, "heldout": 0}, "benchmark": {"enabled": False}}
    with pytest.raises(DatasetError, match=r"^\d+ calibration images also appear in the validation set") as caught:
        Builder(load_recipe(_recipe(tmp_path, ckpt, data=same, **extra))).run()
    assert "\n" not in str(caught.value)
    assert not list((tmp_path / "artifacts" / "t2t_vit_7").glob("onnxruntime/*"))
    (row,) = Builder(load_recipe(_recipe(tmp_path, ckpt, data={**same, "allow_overlap": True}, **extra))).run()
    assert row.accuracy["calibration_overlap"] > 0
    summary = json.loads((tmp_path / "artifacts" / "tiny-summary.json").read_text())
    assert summary["rows"][0]["accuracy"]["calibration_overlap"] == row.accuracy["calibration_overlap"]
    report = write_report(tmp_path / "artifacts").markdown.read_text()
    assert f"calibrated on {row.accuracy['calibration_overlap']} of these images" in report


def test_accuracy_aware_build_never_sees_the_validation_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from t2tedge.data.datasets import open_dataset
    from t2tedge.targets import get_target

    target = get_target("onnxruntime")
    real_build = target.build
    seen = []

    def spy(inputs, precision, config, out_dir):  # noqa: ANN001, ANN202
        seen.append(inputs)
        return real_build(inputs, precision, config, out_dir)

    monkeypatch.setattr(target, "build", spy)
    recipe = _recipe(
        tmp_path,
        _tiny_checkpoint(tmp_path),
        precisions=["int8"],
        calibration={"size": 16, "heldout": 12},
        quantization={"max_accuracy_drop": 50.0},
        benchmark={"enabled": False},
    )
    builder = Builder(load_recipe(recipe))
    (row,) = builder.run()
    (inputs,) = seen
    # the build's inputs have no place for validation images at all
    assert not {f.name for f in dataclasses.fields(inputs)} & {"validation_images", "validation_labels"}
    assert len(inputs.heldout) == len(inputs.heldout_labels) == 12
    # none of the tuning images is a validation image (by content), and their labels are the source's
    validation = builder.recipe.data.limit
    val_set = open_dataset("fashion_mnist:test")
    val_images = {
        img.tobytes()
        for img in builder._validation_set(  # the preprocessed validation tensor
            builder.load(builder.recipe.models[0]), _export_artifact(tmp_path), val_set
        ).images
    }
    assert validation == 40 and not {img.tobytes() for img in inputs.heldout} & val_images
    manifest = json.loads((Path(row.artifact) / "manifest.json").read_text())
    tuned = manifest["calibration"]["accuracy_tuned_on"]
    assert tuned["split"] == "calibration.heldout" and tuned["images"] == 12
    assert tuned["key"].startswith(manifest["calibration"]["heldout"]["key"])
    assert manifest["build"]["accuracy_aware"]["tuned_on"] == "calibration.heldout"
    assert manifest["build"]["accuracy_aware"]["images"] == 12


def _export_artifact(tmp_path: Path):  # noqa: ANN202
    from t2tedge.pipeline.store import Artifact

    return Artifact(next((tmp_path / "artifacts" / "t2t_vit_7" / "export").glob("onnx-*")))


def test_accuracy_aware_build_without_heldout_is_refused(tmp_path: Path) -> None:
    recipe = _recipe(
        tmp_path,
        _tiny_checkpoint(tmp_path),
        precisions=["int8"],
        calibration={"size": 16, "heldout": 0},
        quantization={"max_accuracy_drop": 1.0},
        benchmark={"enabled": False},
    )
    with pytest.raises(T2tedgeError, match=r"max_accuracy_drop needs labelled held-out images"):
        Builder(load_recipe(recipe)).run()


def _bare_artifact(path: Path, classes: list[str], model: str = "t2t_vit_7", target: str = "onnxruntime") -> Path:
    pre = Preprocess(input_size=32, resize_size=32, interpolation="bilinear")
    io = {"family": "t2t_vit", "image_size": 32, "num_classes": 10, "classes": classes, "preprocess": pre.to_dict()}
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"model": model, "target": target, "model_io": io}))
    return path


FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def test_validate_outside_a_store_caches_in_the_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from t2tedge.pipeline.validate import labelled_images

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    copied = _bare_artifact(tmp_path / "home" / "t2t-int8", FASHION)  # e.g. ~/t2t-int8: its grandparent is /
    images, labels, _ = labelled_images(copied, "fashion_mnist:test", limit=4)
    assert images.shape == (4, 3, 32, 32) and len(labels) == 4
    assert list((tmp_path / "xdg" / "t2tedge" / "tensors").iterdir())
    assert not (tmp_path / ".cache").exists()
    # inside a store, the store's cache
    store = tmp_path / "artifacts"
    (store / ".cache").mkdir(parents=True)
    inside = _bare_artifact(store / "t2t_vit_7" / "onnxruntime" / "fp32-12345678", FASHION)
    labelled_images(inside, "fashion_mnist:test", limit=4)
    assert list((store / ".cache" / "tensors").iterdir())


def test_validate_refuses_classes_in_another_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from t2tedge.errors import DatasetError
    from t2tedge.pipeline.validate import labelled_images

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for name in ("bag", "coat"):
        (tmp_path / "data" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / name / "0.png")
    data = str(tmp_path / "data")
    with pytest.raises(DatasetError, match="in another order") as caught:
        labelled_images(_bare_artifact(tmp_path / "a", ["coat", "bag"]), data)
    assert "\n" not in str(caught.value)
    with pytest.raises(DatasetError, match=r"classes differ from the model's \(1 not among them, e.g. 'coat'\)"):
        labelled_images(_bare_artifact(tmp_path / "b", ["bag", "shirt"]), data)
    images, labels, _ = labelled_images(_bare_artifact(tmp_path / "c", ["bag", "coat"]), data)
    assert labels.tolist() == [0, 1]


def test_build_refuses_an_unlabelled_validation_folder(tmp_path: Path) -> None:
    from PIL import Image

    from t2tedge.errors import DatasetError

    (tmp_path / "photos").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / "photos" / f"{i}.png")
    recipe = _recipe(tmp_path, _tiny_checkpoint(tmp_path), data={"validation": str(tmp_path / "photos")})
    with pytest.raises(DatasetError, match=r"photos has no labels; validation needs class subfolders") as caught:
        Builder(load_recipe(recipe)).run()
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "artifacts" / "t2t_vit_7").exists()  # refused before the export
