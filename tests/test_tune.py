"""`t2tedge tune`: candidates built, scored on held-out data and timed; the front, the choice, the reuse."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
import yaml

from t2tedge.errors import RecipeError, T2tedgeError
from t2tedge.models import get_spec, save_checkpoint
from t2tedge.models.spec import Preprocess
from t2tedge.pipeline.build import Builder
from t2tedge.pipeline.recipe import load_recipe
from t2tedge.pipeline.tune import Candidate, Point, Tuner, merge, pareto

RULE_DROP = 40.0  # agreement points: a random tiny model's INT8 placements really differ in agreement


def _checkpoint(root: Path) -> Path:
    torch.manual_seed(0)
    model = get_spec("t2t_vit_7").create(num_classes=10, image_size=32)
    path = root / "t2t_vit_7.pt"
    pre = Preprocess(input_size=32, resize_size=32, interpolation="bilinear")
    save_checkpoint(
        path, model, {"model": "t2t_vit_7", "classes": [str(i) for i in range(10)], "preprocess": pre.to_dict()}
    )
    return path


def _recipe(root: Path, checkpoint: Path, **extra: Any) -> Path:
    recipe = {
        "name": "tiny",
        "output_dir": str(root / "artifacts"),
        "models": [{"name": "t2t_vit_7", "weights": str(checkpoint)}],
        "targets": ["onnxruntime"],
        "precisions": ["int8"],
        "data": {"validation": "no-such-validation-set", "limit": 40},
        "calibration": {"size": 16, "heldout": 8},
        "export": {"parity_images": 8},
        "benchmark": {"warmup": 1, "min_iters": 5, "min_seconds": 0, "round_iters": 5, "efficiency": False},
        "tune": {"heldout": 40, "seconds": 0.05, "max_agreement_drop": RULE_DROP, "max_candidates": 12},
        **extra,
    }
    path = root / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    return path


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tune")
    recipe = load_recipe(_recipe(root, _checkpoint(root)))
    first = Tuner(recipe).run()
    again = Tuner(recipe).run()
    (front,) = first["fronts"]
    return {"root": root, "recipe": recipe, "first": first, "again": again, "front": front}


def _dominated(p: dict[str, Any], points: list[dict[str, Any]]) -> bool:
    lat, agr = p["latency_ms_p50"], p["heldout_top1_agreement"]
    return any(
        q["latency_ms_p50"] <= lat and q["heldout_top1_agreement"] >= agr
        and (q["latency_ms_p50"] < lat or q["heldout_top1_agreement"] > agr)
        for q in points
    )  # fmt: skip


def test_every_candidate_is_built_scored_on_heldout_data_and_timed(tuned: dict[str, Any]) -> None:
    front = tuned["front"]
    names = [p["name"] for p in front["points"]]
    assert names[0] == "recipe" and "float mlp" in names and "float head" in names
    assert any(n.startswith("per_channel=") for n in names)  # the target's own knobs
    singles = names[:10]  # the recipe's point, 5 layer groups, 4 knob values: then the greedy combinations
    assert all(" + " not in n for n in singles) and all(" + " in n for n in names[10:]), names
    for combo in front["points"][10:]:  # each joins choices that were measured alone before (timing decides
        # whether any is made here: see the combination test below for the rule itself)
        assert all(part in singles for part in combo["name"].split(" + "))
    measured = [p for p in front["points"] if "error" not in p]
    assert len(measured) == len(front["points"]) >= 6
    for point in measured:
        assert 0 <= point["heldout_top1_agreement"] <= 100 and point["latency_ms_p50"] > 0
        manifest = json.loads((Path(point["artifact"]) / "manifest.json").read_text())
        (score,) = (v for k, v in manifest["validation"].items() if k.startswith("heldout-"))
        assert score["images"] == 40 and score["label"] == "measured"
        assert "tune_latency" in manifest  # timed on this host, stored with the artifact
    assert front["heldout_images"] == 40 and front["fp32"]["latency_ms_p50"]
    # each point against FP32 timed in its own round; the verdict on INT8 is the chosen point's
    rounds = front["fp32"]["latency_ms_p50"]  # one entry per round (two rounds may time FP32 alike)
    assert all(p["fp32_latency_ms_p50_same_round"] in rounds for p in measured)
    # FP32 re-timed beside each batch of new candidates, not once: the singles' round, then one per
    # combination built (whether any combination is made depends on timing, so their count decides)
    assert len(rounds) == 1 + sum(1 for p in front["points"][10:] if p["artifact"])
    chosen = front["chosen"]
    assert front["int8_beats_fp32"] == (chosen["speedup_vs_fp32"] > 1.0)
    slower = yaml.safe_load(Path(tuned["first"]["tuned"]).read_text())["fp32_faster"]
    assert slower == ({} if front["int8_beats_fp32"] else {"t2t_vit_7": ["onnxruntime"]})
    # the candidates are different artifacts: their settings are in their keys
    assert len({p["artifact"] for p in measured}) == len(measured)


def test_the_front_is_the_non_dominated_points_and_the_choice_keeps_the_rule(tuned: dict[str, Any]) -> None:
    front = tuned["front"]
    points = [p for p in front["points"] if "error" not in p]
    on_front = {p["name"] for p in points if not _dominated(p, points)}
    assert on_front == set(front["front"]) == {p["name"] for p in points if p["on_front"]}
    keeping = [p for p in points if 100 - p["heldout_top1_agreement"] <= RULE_DROP]
    assert keeping, "the rule is loose enough that some point keeps it"
    fastest = min(keeping, key=lambda p: p["latency_ms_p50"])
    assert front["chosen"]["name"] == fastest["name"]
    assert front["chosen"]["on_front"]
    assert Path(front["path"]).with_suffix(".png").is_file()


def test_tuning_never_opens_the_validation_set(tuned: dict[str, Any]) -> None:
    # the recipe's validation set does not exist: a tuner that opened it would have failed
    assert tuned["recipe"].data.validation == "no-such-validation-set"
    assert "held-out" in next(
        v["dataset"]
        for p in tuned["front"]["points"]
        for k, v in json.loads((Path(p["artifact"]) / "manifest.json").read_text())["validation"].items()
        if k.startswith("heldout-")
    )


def test_a_rerun_measures_nothing_again(tuned: dict[str, Any]) -> None:
    first, again = tuned["first"]["stats"], tuned["again"]["stats"]
    assert first["built"] > 0 and first["scored"] > 0 and first["timed"] > 0
    assert again["built"] == again["scored"] == again["timed"] == 0 and again["reused"] > 0
    rerun = tuned["again"]["fronts"][0]
    assert rerun["chosen"]["name"] == tuned["front"]["chosen"]["name"]
    # the rerun reports the timings it reused, FP32's rounds and each point's own-round speed-up included
    assert rerun["fp32"]["latency_ms_p50"] == tuned["front"]["fp32"]["latency_ms_p50"]
    speedups = [(p["name"], p["speedup_vs_fp32"]) for p in tuned["front"]["points"]]
    assert [(p["name"], p["speedup_vs_fp32"]) for p in rerun["points"]] == speedups


def test_a_float_group_keeps_its_nodes_out_of_int8(tuned: dict[str, Any]) -> None:
    by_name = {p["name"]: p for p in tuned["front"]["points"]}

    def quantized_products(point: dict[str, Any]) -> int:  # MatMuls, and Linear layers written as Gemms
        graph = onnx.load(str(Path(point["artifact"]) / "model.onnx")).graph
        dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        return sum(1 for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[0] in dequantized)

    manifest = json.loads((Path(by_name["float mlp"]["artifact"]) / "manifest.json").read_text())
    kept = manifest["build"]["float_modules"]["nodes"]
    assert kept and manifest["config"]["quantization"]["float_modules"] == ["blocks.*.mlp", "blocks.*.mlp.*"]
    assert quantized_products(by_name["float mlp"]) == quantized_products(by_name["recipe"]) - len(kept)


def test_build_applies_the_tuned_placements(tuned: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    root, recipe = tuned["root"], tuned["recipe"]
    placements = root / "placements.yaml"
    placements.write_text(json.dumps({"models": {"t2t_vit_7": {"onnxruntime": {"float_modules": ["head"]}}},
                                      "fp32_faster": {"t2t_vit_7": ["onnxruntime"]}}))  # fmt: skip
    data = {"validation": "fashion_mnist:test", "limit": 40}
    built = Builder(recipe.model_copy(update={"tuned": placements, "data": recipe.data.model_copy(update=data)}))
    capsys.readouterr()
    (row,) = built.run()
    warned = [line for line in capsys.readouterr().err.splitlines() if "faster than FP32" in line]
    assert len(warned) == 1 and "t2t_vit_7 on onnxruntime" in warned[0], warned  # said once, built as asked
    head = next(p for p in tuned["front"]["points"] if p["name"] == "float head")
    assert row.reused and row.artifact == head["artifact"]  # the tuned candidate's artifact, reused by its key
    # build's benchmark (the recipe's settings) and tune's timing (its own) are kept apart in the manifest
    sections = json.loads((Path(row.artifact) / "manifest.json").read_text())
    (bench,), (tune,) = sections["latency"].values(), sections["tune_latency"].values()
    assert bench["settings"] != tune["settings"] and tune["settings"]["min_seconds"] == recipe.tune.seconds
    # the file tune wrote holds the chosen point's keys
    written = yaml.safe_load(Path(tuned["first"]["tuned"]).read_text())
    chosen = tuned["front"]["chosen"]
    assert written["models"] == ({"t2t_vit_7": {"onnxruntime": chosen["override"]}} if chosen["override"] else {})
    assert written["host_fingerprint"] == tuned["front"]["host_fingerprint"]
    # the report shows each front and marks the chosen point
    from t2tedge.report import write_report

    report = write_report(root / "artifacts")
    text = report.markdown.read_text()
    assert "## INT8 placement tuning" in text and "### t2t_vit_7 on onnxruntime" in text
    assert f"**{chosen['name']}**" in text and "chosen" in text
    # its speed-up is against the FP32 timed in its own round
    (row_line,) = (line for line in text.splitlines() if line.startswith(f"| **{chosen['name']}**"))
    assert f"{chosen['speedup_vs_fp32']:.2f}x" in row_line
    assert (report.markdown.parent / "tuning_t2t_vit_7-onnxruntime.png").is_file()


def test_bad_tuned_files_are_one_line(tuned: dict[str, Any], tmp_path: Path) -> None:
    recipe = tuned["recipe"]
    with pytest.raises(RecipeError, match="tuned placements not found"):
        Builder(recipe.model_copy(update={"tuned": tmp_path / "missing.yaml"}))
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"models": {"t2t_vit_7": {"onnxruntime": {"per_channel": "sometimes"}}}}))
    data = recipe.data.model_copy(update={"validation": "fashion_mnist:test"})
    builder = Builder(recipe.model_copy(update={"tuned": bad, "data": data}))
    with pytest.raises(RecipeError, match=r"t2t_vit_7\.onnxruntime\.per_channel"):
        builder.run()
    shape = tmp_path / "shape.yaml"
    shape.write_text("models: [a, b]\n")
    with pytest.raises(RecipeError, match="expected `models:"):
        Builder(recipe.model_copy(update={"tuned": shape}))


def test_a_target_without_int8_or_unknown_is_one_line(tuned: dict[str, Any]) -> None:
    with pytest.raises(T2tedgeError, match="no INT8 target to tune among coreml"):
        Tuner(tuned["recipe"], targets=["coreml"])  # Core ML's 8-bit forms are int8-weights and w8a8
    with pytest.raises(T2tedgeError, match="unknown target"):
        Tuner(tuned["recipe"], targets=["nope"])


def test_merge_joins_float_groups_and_pareto_drops_dominated_points() -> None:
    assert merge({"float_modules": ["a"], "x": 1}, {"float_modules": ["b", "a"], "x": 2}) == {
        "float_modules": ["a", "b"],
        "x": 2,
    }
    points = [
        Point(Candidate("slow-good"), agreement=99.0, latency_ms=10.0),
        Point(Candidate("fast-bad"), agreement=80.0, latency_ms=5.0),
        Point(Candidate("dominated"), agreement=79.0, latency_ms=6.0),
        Point(Candidate("tie"), agreement=99.0, latency_ms=10.0),
        Point(Candidate("failed"), error="no"),
    ]
    assert [p.candidate.name for p in pareto(points)] == ["fast-bad", "slow-good", "tie"]


def _cli(*args: str) -> Any:
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "t2tedge.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip


def test_the_cli_reruns_from_the_stored_measurements_and_bad_input_is_one_line(tuned: dict[str, Any]) -> None:
    recipe = str(tuned["root"] / "recipe.yaml")
    result = _cli("tune", recipe)
    assert result.returncode == 0, result.stderr
    assert "tuned INT8 placement" in result.stdout and f"tuned placements: {tuned['first']['tuned']}" in result.stdout
    # every candidate's build, score and timing reused, also the point the build above benchmarked again
    assert "measured 0 builds, 0 scores, 0 timings;" in result.stderr
    refused = _cli("tune", recipe, "--target", "coreml")
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: no INT8 target"), refused.stderr


def test_combinations_join_faster_choices_that_keep_the_rule(tuned: dict[str, Any]) -> None:
    tuner = Tuner(tuned["recipe"])
    made: list[str] = []

    def measure(job: Any, batch: list[Candidate]) -> list[Point]:  # a combination is 1 ms faster than its parts
        (candidate,) = batch
        made.append(candidate.name)
        return [Point(candidate, agreement=99.0, latency_ms=6.0)]

    tuner._measure = measure  # type: ignore[method-assign]
    start = Point(Candidate("recipe"), agreement=100.0, latency_ms=10.0)
    a = Point(Candidate("a", {"per_channel": False}), agreement=99.0, latency_ms=8.0)
    b = Point(Candidate("b", {"float_modules": ["head"]}), agreement=99.0, latency_ms=9.0)
    broke = Point(Candidate("c", {"method": "percentile"}), agreement=100.0 - RULE_DROP - 1, latency_ms=1.0)
    slower = Point(Candidate("d", {"op_types": ["Conv"]}), agreement=100.0, latency_ms=11.0)
    combos = tuner._combine(None, [start, a, b, broke, slower], start)  # type: ignore[arg-type]
    # a first (fastest), then b over it; c breaks the rule and d is not faster: neither is tried
    assert made == ["a + b"] and [p.candidate.override for p in combos] == [
        {"per_channel": False, "float_modules": ["head"]}
    ]
