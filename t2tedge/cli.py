"""The `t2tedge` command line."""

from __future__ import annotations

import errno
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from t2tedge.devices.cli import device_app
from t2tedge.errors import T2tedgeError
from t2tedge.evaluation.accuracy import failed

app = typer.Typer(
    help="Compile T2T-ViT and MobileNet baselines for edge targets, validate and compare them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Results go to stdout; when it is a file or pipe, keep tables wide enough to read.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)
app.add_typer(device_app, name="device")


@app.command()
def models(
    macs: Annotated[bool, typer.Option(help="count GMACs at the default size (takes a few seconds)")] = True,
) -> None:
    """List the model zoo: counted params and GMACs beside the paper's numbers."""
    from t2tedge.models import list_specs
    from t2tedge.models.counting import count_macs, count_params
    from t2tedge.progress import track

    table = Table(title="t2tedge model zoo (counted at the default input size, 1000 classes)")
    for column in (
        "name",
        "family",
        "input",
        "params (M)",
        "GMACs",
        "paper params (M)",
        "paper GMACs",
        "paper top-1",
    ):
        table.add_column(column, justify="left" if column in ("name", "family") else "right")
    for spec in track(list_specs(), "counting", total=len(list_specs())):
        model = spec.create()
        size = spec.preprocess.input_size
        gmacs = f"{count_macs(model, size) / 1e9:.2f}" if macs else "-"
        paper = spec.paper
        table.add_row(
            spec.name,
            spec.family,
            str(size),
            f"{count_params(model) / 1e6:.2f}",
            gmacs,
            _fmt(paper.params_m),
            _fmt(paper.macs_g),
            _fmt(paper.top1),
        )
    out.print(table)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


@app.command()
def train(
    model: Annotated[str, typer.Argument(help="zoo model name, e.g. t2t_vit_7")],
    dataset: Annotated[str, typer.Option(help="training images: 'fashion_mnist', an image folder or a CSV")] = (
        "fashion_mnist"
    ),
    test_dataset: Annotated[
        str | None, typer.Option(help="held-out set (default: the bundled test split for fashion_mnist)")
    ] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 3,
    image_size: Annotated[int | None, typer.Option(help="input size (default: the model's)")] = None,
    crop_pct: Annotated[float | None, typer.Option(help="eval crop fraction (default: the model's)")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    lr: Annotated[float, typer.Option(help="peak AdamW learning rate")] = 1e-3,
    seed: int = 0,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: all cores)")] = None,
    augment: Annotated[bool, typer.Option(help="random shift + flip while training")] = True,
    checkpoint: Annotated[Path | None, typer.Option(help="start from this checkpoint (fine-tune)")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="checkpoint path (a .json record goes beside)")] = (
        Path("runs/model.pt")
    ),
) -> None:
    """Train or fine-tune a zoo model; saves a checkpoint and a JSON record with held-out accuracy."""
    from t2tedge.data.datasets import open_dataset
    from t2tedge.errors import DatasetError
    from t2tedge.models import get_spec
    from t2tedge.training import TrainConfig
    from t2tedge.training import train as run_training

    spec = get_spec(model)
    if test_dataset is None:
        if not dataset.startswith("fashion_mnist"):
            raise DatasetError("--test-dataset is required unless --dataset is the bundled fashion_mnist")
        dataset, test_dataset = "fashion_mnist:train", "fashion_mnist:test"
    cfg = TrainConfig(
        epochs=epochs,
        image_size=image_size,
        crop_pct=crop_pct,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        threads=threads,
        augment=augment,
    )
    record = run_training(spec, open_dataset(dataset), open_dataset(test_dataset), output, cfg, checkpoint)
    out.print(
        f"{model}: top-1 {record['top1']:.2f}% on {record['test_images']} held-out images after "
        f"{epochs} epochs in {record['train_seconds']:.0f} s ({record['train_images_per_second']:.0f} img/s)"
    )
    out.print(f"checkpoint: {output}  record: {output.with_suffix('.json')}")


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="zoo model name")],
    weights: Annotated[str, typer.Option(help="'demo', 'imagenet', 'random' or a checkpoint path")] = "demo",
    image_size: Annotated[int | None, typer.Option(help="input size (default: the checkpoint's)")] = None,
    dynamic_batch: Annotated[bool, typer.Option(help="export a dynamic batch axis")] = False,
    opset: Annotated[int, typer.Option(min=17)] = 18,
    calibration: Annotated[str, typer.Option(help="real images for the parity check")] = "fashion_mnist:train",
    output_dir: Annotated[Path, typer.Option(help="artifact store")] = Path("artifacts"),
    output: Annotated[Path | None, typer.Option("--output", "-o", help="also copy the ONNX file here")] = None,
) -> None:
    """Export a model to ONNX and check it against PyTorch on real images."""
    from t2tedge.data.datasets import open_dataset
    from t2tedge.pipeline.build import Builder
    from t2tedge.pipeline.recipe import Recipe

    recipe = Recipe.model_validate(
        {
            "models": [{"name": model, "weights": weights, "image_size": image_size}],
            "output_dir": output_dir,
            "export": {"opset": opset, "dynamic_batch": dynamic_batch},
        }
    )
    builder = Builder(recipe)
    ctx = builder.load(recipe.models[0])
    artifact = builder.export(ctx, open_dataset(calibration))
    check = artifact.manifest["parity"]
    out.print(
        f"{artifact.file('model.onnx')}: max |Δlogit| {check['logit_abs_err_max']:.2e}, "
        f"top-1 agreement {check['top1_agreement']:.1f}% on {check['images']} images"
    )
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(artifact.file("model.onnx"), output)
        out.print(f"copied to {output}")


@app.command()
def build(
    recipe: Annotated[str, typer.Argument(help="recipe YAML, or the name of a bundled one (demo)")],
    output_dir: Annotated[Path | None, typer.Option(help="artifact store (overrides the recipe)")] = None,
    target: Annotated[list[str] | None, typer.Option(help="target(s) (overrides the recipe)")] = None,
    precision: Annotated[list[str] | None, typer.Option(help="precision(s) (overrides the recipe)")] = None,
    limit: Annotated[int | None, typer.Option(help="validate on N images only")] = None,
    benchmark: Annotated[bool, typer.Option(help="time the artifacts after building (recipe `benchmark:`)")] = True,
    report: Annotated[bool, typer.Option(help="write the report (Markdown, JSON, plots) at the end")] = True,
    var: Annotated[
        list[str] | None, typer.Option(help="NAME=VALUE for ${NAME} in the recipe, e.g. --var IMAGENET_VAL=/data/val")
    ] = None,
    executor: Annotated[
        str | None,
        typer.Option(
            help="where compile and validation tasks run: local, or ray (needs t2tedge[ray]; recipe `executor:`)"
        ),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster address host:port for --executor ray (default: RAY_ADDRESS, or a local Ray)"),
    ] = None,
    tuned: Annotated[
        Path | None,
        typer.Option(help="tuned placements (written by `t2tedge tune`; recipe `tuned:`) to apply"),
    ] = None,
) -> None:
    """Run a recipe: export, compile per target, validate, benchmark, report; reuses artifacts whose hash exists."""
    from t2tedge.errors import RecipeError
    from t2tedge.pipeline.build import Builder
    from t2tedge.pipeline.recipe import load_recipe

    overrides = {"output_dir": output_dir, "targets": target or None, "precisions": precision or None, "tuned": tuned}
    loaded = load_recipe(recipe, overrides, _variables(var))
    if limit is not None:
        loaded = loaded.model_copy(update={"data": loaded.data.model_copy(update={"limit": limit})})
    if not benchmark:
        loaded = loaded.model_copy(update={"benchmark": loaded.benchmark.model_copy(update={"enabled": False})})
    if executor is not None or address is not None:
        if executor not in (None, "local", "ray"):
            raise RecipeError(f"--executor takes local or ray, not {executor!r}")
        kind = executor or ("ray" if address else loaded.executor.kind)
        update = {"kind": kind, "address": address or loaded.executor.address}
        loaded = loaded.model_copy(update={"executor": loaded.executor.model_copy(update=update)})
    rows = Builder(loaded).run()
    table = Table(title=f"{loaded.name}: accuracy on {loaded.data.validation}")
    for column in (
        "model",
        "target",
        "precision",
        "top-1 %",
        "top-5 %",
        "agree vs fp32 %",
        "label",
        "artifact",
    ):
        table.add_column(column)
    for row in rows:
        acc = row.accuracy
        agree = acc.get("vs_fp32_torch", {}).get("top1_agreement")
        table.add_row(
            row.model,
            row.target,
            row.precision,
            f"{acc['top1']:.2f}" if "top1" in acc else "-",
            f"{acc['top5']:.2f}" if "top5" in acc else "-",
            f"{agree:.2f}" if agree is not None else "-",
            ("FAILED " if failed(acc) else "") + acc["label"] + (f": {acc['reason']}" if "reason" in acc else ""),
            row.artifact or "-",
        )
    out.print(table)
    out.print(f"summary: {loaded.output_dir / (loaded.name + '-summary.json')}")
    if report:
        _print_report(loaded.output_dir)
    broken = [row for row in rows if failed(row.accuracy)]
    if broken:
        first = broken[0]
        err.print(
            f"error: {len(broken)} artifact(s) failed validation, e.g. {first.model} {first.target}/{first.precision}: "
            f"{first.accuracy['reason']}"
        )
        raise typer.Exit(1)


def _variables(var: list[str] | None) -> dict[str, str]:
    from t2tedge.errors import RecipeError

    variables = {}
    for item in var or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise RecipeError(f"--var takes NAME=VALUE, got {item!r}")
        variables[name] = value
    return variables


@app.command()
def tune(
    recipe: Annotated[str, typer.Argument(help="recipe YAML (its `tune:` section), or the name of a bundled one")],
    target: Annotated[list[str] | None, typer.Option(help="INT8 target(s) to tune (default: `tune.targets`)")] = None,
    device: Annotated[
        str | None, typer.Option(help="time the candidates on this SSH device (see `t2tedge device`); default here")
    ] = None,
    output_dir: Annotated[Path | None, typer.Option(help="artifact store (overrides the recipe)")] = None,
    var: Annotated[list[str] | None, typer.Option(help="NAME=VALUE for ${NAME} in the recipe")] = None,
) -> None:
    """Choose INT8 placement per model and target by measured latency and held-out agreement with FP32.

    Writes each Pareto front (JSON and a plot) and the chosen placements under OUTPUT_DIR/tune/; apply
    them with `t2tedge build RECIPE --tuned OUTPUT_DIR/tune/NAME-tuned.yaml`. A rerun reuses every
    candidate built, scored and timed on this host.
    """
    from t2tedge.pipeline.recipe import load_recipe
    from t2tedge.pipeline.tune import Tuner

    loaded = load_recipe(recipe, {"output_dir": output_dir}, _variables(var))
    result = Tuner(loaded, target or None, device).run()
    table = Table(title=f"{loaded.name}: tuned INT8 placement (held-out agreement with FP32, latency p50)")
    for column in ("model", "target", "chosen", "agreement %", "ms p50", "x fp32", "front", "points"):
        table.add_column(column)
    for front in result["fronts"]:
        chosen = front["chosen"]
        table.add_row(
            front["model"],
            front["target"],
            chosen["name"] if chosen else "none keeps the rule",
            f"{chosen['heldout_top1_agreement']:.1f}" if chosen else "-",
            f"{chosen['latency_ms_p50']:.2f}" if chosen else "-",
            f"{chosen['speedup_vs_fp32']:.2f}" if chosen and chosen["speedup_vs_fp32"] else "-",  # its own round
            str(len(front["front"])),
            str(len(front["points"])),
        )
    out.print(table)
    out.print(f"tuned placements: {result['tuned']}")


@app.command()
def validate(
    artifact: Annotated[Path, typer.Argument(help="a compiled artifact directory (holds manifest.json)")],
    data: Annotated[
        str, typer.Option(help="labelled images: folder with class subfolders, CSV, or fashion_mnist:test")
    ],
    limit: Annotated[int | None, typer.Option(help="validate on N images only (class-balanced)")] = None,
    threads: Annotated[int | None, typer.Option(help="runtime threads")] = None,
    device: Annotated[
        str | None, typer.Option(help="run it on this registered SSH device (t2tedge device add)")
    ] = None,
    executor: Annotated[str, typer.Option(help="local, or ray: shards of images as tasks on a Ray cluster")] = "local",
    address: Annotated[str | None, typer.Option(help="Ray cluster address host:port for --executor ray")] = None,
) -> None:
    """Re-validate an existing artifact on another dataset; the result lands in its manifest."""
    from t2tedge.pipeline.executors import make_executor
    from t2tedge.pipeline.validate import validate_artifact

    if device:
        from t2tedge.devices.remote import validate_artifact_remote

        result = validate_artifact_remote(artifact, data, device, limit, threads)
    else:
        with make_executor(executor, address) as runner:
            result = validate_artifact(artifact, data, limit, threads, runner)
    if "top1" in result:
        out.print(f"{artifact}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  on {result['images']} images "
                  f"({result['label']}{' on ' + device if device else ''})")  # fmt: skip
    elif failed(result):
        err.print(f"error: {artifact}: validation failed ({result['label']}): {result['reason']}")
        raise typer.Exit(1)
    else:
        out.print(f"{artifact}: accuracy {result['label']}: {result['reason']}")


@app.command()
def demo(
    output_dir: Annotated[Path, typer.Option(help="artifact store")] = Path("artifacts"),
) -> None:
    """The bundled demo: T2T-ViT-7 vs MobileNetV2/V3-Small on Fashion-MNIST, every target, built to report."""
    build("demo", output_dir=output_dir, target=None, precision=None, limit=None, benchmark=True, report=True, var=None)


@app.command()
def bench(
    artifacts: Annotated[list[Path], typer.Argument(help="artifact directories (each holds manifest.json)")],
    batch: Annotated[list[int] | None, typer.Option(help="batch size(s) to sweep (default 1)")] = None,
    threads: Annotated[list[int] | None, typer.Option(help="thread count(s) to sweep (default: all cores)")] = None,
    warmup: Annotated[int, typer.Option(min=0)] = 10,
    min_iters: Annotated[int, typer.Option(min=1, help="at least this many timed iterations each")] = 200,
    min_seconds: Annotated[float, typer.Option(min=0, help="and at least this many seconds each")] = 10.0,
    force: Annotated[bool, typer.Option(help="measure again even where the manifest has this point")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="also write the records here")] = None,
    device: Annotated[str | None, typer.Option(help="time on this SSH device (see `t2tedge device`)")] = None,
    timeout: Annotated[float, typer.Option(help="seconds per artifact on a device before the run is killed")] = (
        1800.0
    ),
) -> None:
    """Time built artifacts on this host (interleaved) or on a device; results land in their manifests."""
    from t2tedge.pipeline.bench import bench_artifacts
    from t2tedge.pipeline.recipe import BenchmarkConfig
    from t2tedge.pipeline.store import write_json

    cfg = BenchmarkConfig(
        warmup=warmup,
        min_iters=min_iters,
        min_seconds=min_seconds,
        batch_sizes=batch or [1],
        threads=threads or [None],
    )
    records = bench_artifacts(artifacts, cfg, force=force, device=device, timeout_s=timeout)
    table = Table(title=f"latency on {device or 'this host'}")
    for column in ("model", "target", "precision", "batch", "threads", "p50 ms", "p90 ms", "p99 ms", "img/s",
                   "efficiency", "label", "artifact"):  # fmt: skip
        table.add_column(column, overflow="fold")
    for r in records:
        measured = r["label"] == "measured"
        eff = r.get("efficiency_pct")
        table.add_row(
            r["model"], r["target"], r["precision"], str(r["batch"]), str(r["threads_requested"]),
            *([f"{r['latency_ms_p50']:.3f}", f"{r['latency_ms_p90']:.3f}", f"{r['latency_ms_p99']:.3f}",
               f"{r['throughput_ips']:.0f}"] if measured else ["-"] * 4),
            f"{eff:.1f}%" if eff is not None else "-",
            r["label"] + ("" if measured else f": {r['reason']}") + (" (stored)" if r["reused"] else ""),
            r["artifact"],
        )  # fmt: skip
    out.print(table)
    if json_path is not None:
        from t2tedge.evaluation.host import host_info

        write_json(json_path, {"host": host_info(), "settings": cfg.model_dump(), "records": records})
        out.print(f"wrote {json_path}")


@app.command()
def report(
    build_dir: Annotated[Path, typer.Argument(help="a build's output directory (holds *-summary.json)")] = Path(
        "artifacts"
    ),
    output: Annotated[Path | None, typer.Option("--output", "-o", help="default: BUILD_DIR/report")] = None,
) -> None:
    """Write the comparison report: Markdown + JSON + PNG plots, T2T-ViT vs MobileNet per target."""
    _print_report(build_dir, output)


def _print_report(build_dir: Path, output: Path | None = None) -> None:
    from t2tedge.report import write_report

    files = write_report(build_dir, output)
    table = Table(title="headline: T2T-ViT vs MobileNet (latency ratio > 1: T2T-ViT slower)")
    for column in ("target", "precision", "pair", "p50 ms T2T / MobileNet", "latency ratio", "top-1 Δ pts"):
        table.add_column(column)
    for e in files.headline:
        ratio = f"{e['latency_ratio']:.2f}x" if "latency_ratio" in e else f"unavailable: {e['latency_unavailable']}"
        p50 = f"{e['t2t_p50_ms']:.3f} / {e['mobilenet_p50_ms']:.3f}" if "latency_ratio" in e else "-"
        delta = f"{e['top1_delta']:+.2f} ({e['accuracy_label']})" if "top1_delta" in e else "-"
        table.add_row(e["target"], e["precision"], f"{e['t2t_vit']} vs {e['mobilenet']}", p50, ratio, delta)
    out.print(table)
    out.print(f"report: {files.markdown}  (JSON {files.json.name}, {len(files.plots)} plots)")


@app.command("tensorrt-lint")
def tensorrt_lint(
    model: Annotated[Path, typer.Argument(help="ONNX file, e.g. a tensorrt artifact's model.onnx")],
    ranges: Annotated[
        Path | None,
        typer.Option(
            help='JSON of per-tensor max |value| on calibration images, {"tensors": {name: {"max_abs": x}}, '
            '"fp32_tensors": list of names}: also check FP16 overflow (default: the fp16_ranges.json a '
            "tensorrt artifact holds beside its model.onnx)"
        ),
    ] = None,
) -> None:
    """Check an ONNX graph against TensorRT's operator support, Q/DQ and fusion rules; exit 1 on any error."""
    from t2tedge.targets.tensorrt_lint import has_errors, lint, load_ranges

    beside = model.parent / "fp16_ranges.json"
    if ranges is None and beside.is_file():
        ranges = beside
        out.print(f"FP16 ranges from {beside}")
    tensor_ranges, fp32_tensors = load_ranges(ranges) if ranges is not None else (None, set())
    findings = lint(model, tensor_ranges, fp32_tensors)
    table = Table(title=f"TensorRT lint: {model}")
    for column in ("severity", "node", "op", "rule", "message"):
        table.add_column(column, overflow="fold")
    colors = {"error": "red", "warning": "yellow", "info": "cyan"}
    for f in findings:
        table.add_row(f"[{colors[f.severity]}]{f.severity}[/]", f.node, f.op, f.rule, f.message)
    if findings:
        out.print(table)
    errors = sum(f.severity == "error" for f in findings)
    out.print(f"{model}: {errors} errors, {len(findings) - errors} warnings/notes")
    if has_errors(findings):
        raise typer.Exit(1)


@app.command("tensorrt-engine")
def tensorrt_engine(
    artifact: Annotated[Path, typer.Argument(help="a tensorrt artifact directory (holds manifest.json)")],
) -> None:
    """Build the TensorRT engine of an artifact on this host (needs tensorrt and a CUDA GPU)."""
    from t2tedge.targets.tensorrt import build_engine

    out.print(f"engine: {build_engine(artifact)}")


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def main() -> None:
    """Console entry point: user errors and a full disk become one line on stderr and exit code 2.

    Any other exception is a bug: one line naming it and exit code 1 (``T2TEDGE_DEBUG=1``: the traceback).
    """
    import os

    from rich.markup import escape

    stderr = Console(stderr=True)
    try:
        app()
    except T2tedgeError as exc:
        stderr.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        stderr.print("interrupted; finished artifacts are kept, unfinished ones were discarded")
        sys.exit(130)
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            # A full disk (or quota, or file-size limit) is the user's to fix, not a crash: one line, like errors.
            # shutil's copies name the source in `filename` and the file being written in `filename2`.
            written = exc.filename2 or exc.filename
            where = f" {escape(str(written))}" if written else ""
            stderr.print(
                f"[bold red]error:[/] cannot write{where}: {exc.strerror}; unfinished artifacts were discarded, "
                "free some space and rerun",
                highlight=False,
                soft_wrap=True,
            )
            sys.exit(2)
        if os.environ.get("T2TEDGE_DEBUG"):
            raise
        # A bug, not the user's doing: one line that says how to get the traceback for a report.
        message = " ".join(str(exc).split())
        stderr.print(
            f"[bold red]error:[/] internal error: {type(exc).__name__}: {escape(message)} "
            "(rerun with T2TEDGE_DEBUG=1 for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
