"""The latency stage, `t2tedge bench` and the report on a tiny two-model build (T2T-ViT vs MobileNet)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_pipeline import _tiny_checkpoint  # tests/ is on sys.path (pytest rootdir import mode)

from t2tedge.pipeline.build import Builder
from t2tedge.pipeline.recipe import load_recipe
from t2tedge.report import write_report
from t2tedge.report.plots import pareto_front

SIZE = 32
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    tmp = tmp_path_factory.mktemp("report")
    recipe = {
        "name": "tiny",
        "output_dir": str(tmp / "artifacts"),
        "models": [
            {"name": "t2t_vit_7", "weights": str(_tiny_checkpoint(tmp, "t2t_vit_7", SIZE))},
            {"name": "mobilenet_v3_small", "weights": str(_tiny_checkpoint(tmp, "mobilenet_v3_small", SIZE))},
        ],
        "targets": ["onnxruntime", "tensorrt"],
        "precisions": ["fp32", "fp16", "int8"],
        "data": {"limit": 40},
        "export": {"parity_images": 8},
        "calibration": {"size": 16},
        "threads": 1,
        "benchmark": {"warmup": 2, "min_iters": 20, "min_seconds": 0, "threads": [1]},
    }
    path = tmp / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    return tmp / "artifacts", Builder(load_recipe(path)).run()


def test_latency_is_measured_where_the_runtime_runs_and_labelled_elsewhere(build: tuple[Path, list]) -> None:
    _, rows = build
    by = {(r.model, r.target, r.precision): r for r in rows}
    assert len(rows) == 8
    ort = by["t2t_vit_7", "onnxruntime", "int8"].latency["local/b1-t1"]
    assert ort["label"] == "measured" and ort["iterations"] >= 20 and ort["batch"] == 1
    assert ort["latency_ms_min"] <= ort["latency_ms_p50"] <= ort["latency_ms_p90"] <= ort["latency_ms_p99"]
    # the mean is stored rounded to 0.001 ms: at ~0.3 ms that alone moves 1000 / mean by up to 0.17 %
    rounding = 0.0005 / ort["latency_ms_mean"]
    assert ort["throughput_ips"] == pytest.approx(1000.0 / ort["latency_ms_mean"], rel=1e-3 + rounding)
    assert {"avx2", "fma"} & set(ort["host_info"]["isa"]) or ort["host_info"]["machine"] != "x86_64"
    assert ort["host_info"]["versions"]["onnxruntime"]
    # efficiency: counted MACs over p50, against this host's INT8 GEMM peak through onnxruntime
    assert ort["peak"]["key"] == "onnxruntime/int8" and ort["peak"]["gmacs_per_s"] > 0
    expected = ort["gmacs_per_image"] / (ort["latency_ms_p50"] / 1000) / ort["peak"]["gmacs_per_s"] * 100
    assert ort["efficiency_pct"] == pytest.approx(expected, rel=0.01, abs=0.005)  # stored rounded to 0.01
    trt = by["t2t_vit_7", "tensorrt", "int8"].latency["local/b1-t1"]
    assert trt["label"] == "unavailable" and "TensorRT" in trt["reason"] and "latency_ms_p50" not in trt


def test_report_has_a_labelled_row_per_artifact_plots_and_headline(build: tuple[Path, list]) -> None:
    out_dir, rows = build
    files = write_report(out_dir)
    text = files.markdown.read_text()
    for row in rows:
        line = next(
            (ln for ln in text.splitlines() if ln.startswith(f"| {row.model} | {row.precision}")
             and row.target in text.split(ln)[0].rsplit("## ", 1)[-1]),
            None,
        )  # fmt: skip
        assert line is not None, (row.model, row.target, row.precision)
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[3].endswith(("measured", "emulated")) or cells[3].startswith("unavailable")
        assert cells[4].endswith("measured") or cells[4].startswith("unavailable")
    # the headline ratio is T2T-ViT p50 over MobileNet p50 from the manifests
    report = json.loads(files.json.read_text())
    ort = [e for e in report["headline"] if e["target"] == "onnxruntime" and e["precision"] == "int8"][0]
    assert ort["t2t_vit"] == "t2t_vit_7" and ort["mobilenet"] == "mobilenet_v3_small"
    assert ort["latency_ratio"] == pytest.approx(ort["t2t_p50_ms"] / ort["mobilenet_p50_ms"], abs=0.01)
    trt = [e for e in report["headline"] if e["target"] == "tensorrt"][0]
    assert "latency_ratio" not in trt and "TensorRT" in trt["latency_unavailable"] and "top1_delta" in trt
    assert report["models"]["t2t_vit_7"]["paper"]["params_m"] == pytest.approx(4.3)
    assert report["models"]["t2t_vit_7"]["counted"]["params_m"] == pytest.approx(4.3, rel=0.02)
    assert len(files.plots) == 2
    for png in files.plots:
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 20_000
        assert png.name in text  # embedded in the Markdown


def test_bench_cli_reuses_stored_numbers_unless_forced(build: tuple[Path, list], tmp_path: Path) -> None:
    _, rows = build
    artifact = next(r.artifact for r in rows if r.target == "onnxruntime" and r.precision == "fp32")
    before = json.loads((Path(artifact) / "manifest.json").read_text())["latency"]["local/b1-t1"]

    def bench(*extra: str) -> dict:
        cmd = [sys.executable, "-m", "t2tedge.cli", "bench", artifact, "--threads", "1", "--warmup", "1",
               "--min-iters", "20", "--min-seconds", "0", "--json", str(tmp_path / "b.json"), *extra]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        return json.loads((tmp_path / "b.json").read_text())

    # the build used warmup 2: other settings mean a new measurement; the same ones are reused
    first = bench()["records"][0]
    assert not first["reused"] and first["measured_at"] >= before["measured_at"]
    assert bench()["records"][0]["reused"]
    assert not bench("--force")["records"][0]["reused"]


def test_pareto_front_keeps_only_undominated_points() -> None:
    points = [(1.0, 80.0), (2.0, 85.0), (1.5, 79.0), (3.0, 84.0), (4.0, 90.0), (0.5, 70.0)]
    assert pareto_front(points) == [(0.5, 70.0), (1.0, 80.0), (2.0, 85.0), (4.0, 90.0)]


def test_report_shows_another_hosts_numbers_under_that_host(
    build: tuple[Path, list], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from t2tedge.evaluation import host
    from t2tedge.report.collect import collect

    out_dir, rows = build
    measured_on = f"host-{host.host_fingerprint()}"
    monkeypatch.setattr(host, "host_fingerprint", lambda: "0therh0st000")  # the build directory copied elsewhere
    data = collect(out_dir)
    assert "local" not in data.hosts and measured_on in data.hosts
    ort = next(r for r in data.rows if (r.model, r.target, r.precision) == ("t2t_vit_7", "onnxruntime", "int8"))
    assert ort.latency[measured_on]["label"] == "measured" and ort.p50() is None  # never as this host's
    assert ort.accuracy["host_label"] == measured_on
    assert {p["host"] for p in ort.sweep} == {measured_on}
    text = write_report(out_dir, tmp_path).markdown.read_text()
    assert f"measured @{measured_on}" in text and f"p50 ms @{measured_on}" in text
    assert f"fingerprint {measured_on.removeprefix('host-')}" in text  # which CPU that host is, in provenance
