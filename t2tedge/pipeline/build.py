"""The stage runner: resolve -> export -> (quantize) -> compile -> validate, cached by content hash."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import importlib.metadata
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import t2tedge
from t2tedge.calibration import CalibrationSet, calibration_set, select_indices
from t2tedge.data.cache import PixelSet, cached_pixels, cached_preprocess, save_array, tensor_key
from t2tedge.data.datasets import ImageDataset, open_dataset
from t2tedge.errors import CheckpointError, DatasetError, T2tedgeError, TargetUnavailableError
from t2tedge.evaluation import host as this_host
from t2tedge.evaluation.host import host_info
from t2tedge.models import LoadedModel, demo_checkpoint, get_spec, load_model, pretrained_checkpoint
from t2tedge.models.spec import graph_form
from t2tedge.pipeline.executors import Executor, Task, make_executor
from t2tedge.pipeline.export import GRAPH_REVISION, ONNX_FILE, REFERENCE_BATCH, torch_logits
from t2tedge.pipeline.recipe import ModelEntry, Recipe
from t2tedge.pipeline.store import Artifact, ArtifactStore, content_hash, sha256_file, write_json
from t2tedge.pipeline.tasks import artifact_payload, compile_artifact, export_model, shard_reference, write_files
from t2tedge.pipeline.tuned import TunedPlacements
from t2tedge.pipeline.validate import (
    Selection,
    run_shards,
    run_validation,
    store_validation,
    stored_validation,
    validate_sharded,
)
from t2tedge.progress import log
from t2tedge.targets import BuildInputs, check_precision, get_target

PACKAGE_DIR = Path(t2tedge.__file__).resolve().parent
# What every target's rules rest on: the shared quantization machinery and the target contract. Files a
# target applies beyond its own module are its capabilities' ``rule_files``.
SHARED_RULE_FILES = ("calibration/*.py", "targets/base.py")
# The export form is our code: the model sources decide the exported graph.
MODEL_FILES = ("models/t2t_vit.py", "models/mobilenet.py", "models/spec.py", "pipeline/export.py")


@functools.cache
def _sources_digest(patterns: tuple[str, ...]) -> dict[str, str]:
    files = sorted({f for pattern in patterns for f in PACKAGE_DIR.glob(pattern)})
    return {f.relative_to(PACKAGE_DIR).as_posix(): sha256_file(f) for f in files}


def rules_digest(target_name: str) -> str:
    """sha256 over the source of every rule a target applies: its module, extras and the shared quantizers.

    Part of the compile key, so changing any placement rule, scope, default or shipped script rebuilds.
    """
    target = get_target(target_name)
    module = Path(sys.modules[type(target).__module__].__file__).resolve()
    patterns = (module.relative_to(PACKAGE_DIR).as_posix(), *target.capabilities.rule_files, *SHARED_RULE_FILES)
    return hashlib.sha256(json.dumps(_sources_digest(patterns), sort_keys=True).encode()).hexdigest()


def export_digest() -> str:
    """sha256 over the model and export sources: what decides the exported graph besides the weights."""
    return hashlib.sha256(json.dumps(_sources_digest(MODEL_FILES), sort_keys=True).encode()).hexdigest()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def resolve_weights(entry: ModelEntry) -> Path | None:
    """Turn a recipe's `weights` into a checkpoint file (None = random init)."""
    spec = get_spec(entry.name)
    if entry.weights == "random":
        return None
    if entry.weights == "demo":
        return demo_checkpoint(spec.name)
    if entry.weights == "imagenet":
        return pretrained_checkpoint(spec)
    path = Path(entry.weights).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


@dataclass
class ModelContext:
    """One model loaded once per build: its weights, export and FP32 reference on the validation set."""

    entry: ModelEntry
    loaded: LoadedModel
    checkpoint_sha256: str | None
    nonce: int = field(default_factory=time.time_ns)  # random weights' export key: never reused


@dataclass
class ValidationSet:
    """Validation images (streamed from the tensor cache; None on a cluster, where workers decode their
    shards) with labels and the model's FP32 PyTorch logits, for the samples that decode."""

    images: PixelSet | None
    labels: np.ndarray
    reference: np.ndarray
    key: str
    selection: Selection  # which samples (those that decode), before decoding
    skipped: int = 0  # selected samples that do not decode

    @property
    def indices(self) -> np.ndarray:
        return self.selection.indices


@dataclass
class Plan:
    """One model x target x precision cell before it is built: what its artifact's key is made of."""

    target: str
    precision: str
    config: Any
    inputs: dict[str, Any]
    key: str
    calib: CalibrationSet | None
    heldout: CalibrationSet | None
    tuning: np.ndarray | None


@dataclass
class BuildRow:
    """One model x target x precision outcome."""

    model: str
    target: str
    precision: str
    artifact: str | None
    reused: bool
    accuracy: dict[str, Any]
    build_seconds: float
    latency: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


class Builder:
    """Runs a recipe against an artifact store."""

    def __init__(self, recipe: Recipe, executor: Executor | None = None) -> None:
        self.recipe = recipe
        self.executor = executor  # None: the recipe's (local unless `executor.kind: ray`), made by run()
        self.store = ArtifactStore(recipe.output_dir)
        self.cache_dir = Path(recipe.output_dir) / ".cache"
        self.overlaps: dict[str, int] = {}
        self.model_facts: dict[str, dict[str, Any]] = {}
        self.tuned = TunedPlacements.load(recipe.tuned)
        # Fail on bad names before any long work starts.
        targets = [get_target(name) for name in recipe.targets]
        for precision in recipe.precisions:
            if not any(precision in t.precisions for t in targets):
                if len(targets) == 1:
                    check_precision(targets[0], precision)
                offered = sorted({p for t in targets for p in t.precisions})
                raise T2tedgeError(
                    f"no target in this recipe offers precision {precision!r}; they offer: {', '.join(offered)}"
                )
        for target in targets:
            availability = target.availability()
            if not availability.can_build:
                raise TargetUnavailableError(f"{target.name} cannot build here: {availability.reason}")
        for entry in recipe.models:
            get_spec(entry.name)

    def run(self) -> list[BuildRow]:
        if self.executor is not None:
            return self._run()
        cfg = self.recipe.executor
        with make_executor(cfg.kind, cfg.address, cfg.retries) as executor:
            self.executor = executor
            try:
                return self._run()
            finally:
                self.executor = None

    @property
    def _distributed(self) -> bool:
        """Whether stages run as tasks of a cluster executor (else in this process)."""
        return self.executor is not None and self.executor.name != "local"

    def _task_resources(self, target_name: str) -> dict[str, float]:
        return {"CPU": 1.0, **self.recipe.executor.resources.get(target_name, {})}

    def _task_labels(self, target_name: str) -> dict[str, str]:
        return dict(self.recipe.executor.labels.get(target_name, {}))

    def _run(self) -> list[BuildRow]:
        rows: list[BuildRow] = []
        # every resource and node label the recipe names must exist on the cluster before any work starts
        self.executor.require(
            [
                Task(len, label=f"{name} tasks", resources=self._task_resources(name), labels=self._task_labels(name))
                for name in self.recipe.targets
            ]
        )
        validation = open_dataset(self.recipe.data.validation)
        if (validation.labels < 0).all():
            raise DatasetError(
                f"{self.recipe.data.validation} has no labels; validation needs class subfolders or a labelled CSV"
            )
        calibration_source = open_dataset(self.recipe.data.calibration)
        if self._distributed:  # every model's export at once, as tasks
            ctxs = [self.load(entry) for entry in self.recipe.models]
            exports = self._export_all(ctxs, calibration_source)
        for position, entry in enumerate(self.recipe.models):
            if not self._distributed:
                ctx = self.load(entry)
                log(f"[bold]{entry.name}[/] ({ctx.loaded.weights}, {ctx.loaded.image_size}px)")
                exported = self.export(ctx, calibration_source)
            else:
                ctx, exported = ctxs[position], exports[position]
                log(f"[bold]{entry.name}[/] ({ctx.loaded.weights}, {ctx.loaded.image_size}px): {exported.path}")
            val = self._validation_set(ctx, exported, validation)
            calib = self._calibration_set(ctx, calibration_source, validation, val)
            self.model_facts[entry.name] = self._model_facts(ctx, val)
            cells = [
                (target_name, precision)
                for target_name in self.recipe.targets
                for precision in self.recipe.precisions
                if precision in get_target(target_name).precisions
            ]
            if not self._distributed:
                rows.extend(self.build_one(ctx, exported, name, precision, val, calib) for name, precision in cells)
            else:
                rows.extend(self._build_distributed(ctx, exported, cells, val, calib))
        if self.recipe.benchmark.enabled:
            self.benchmark(rows)
        self.summary_path = self._write_summary(rows)
        return rows

    def benchmark(self, rows: list[BuildRow]) -> None:
        """Time every built artifact on this host (reusing stored numbers) and attach them to the rows."""
        from t2tedge.pipeline.bench import bench_artifacts

        log("[bold]latency[/]")
        records = bench_artifacts([Path(row.artifact) for row in rows if row.artifact], self.recipe.benchmark)
        by_artifact: dict[str, dict[str, Any]] = {}
        for record in records:
            by_artifact.setdefault(record["artifact"], {})[record["key"]] = record
        for row in rows:
            row.latency = by_artifact.get(row.artifact or "", {})

    def _model_facts(self, ctx: ModelContext, val: ValidationSet) -> dict[str, Any]:
        """What the report says of a model: FP32 PyTorch accuracy here, counted size, the paper's numbers."""
        from t2tedge.evaluation.accuracy import topk_accuracy

        spec = ctx.loaded.spec
        return {
            "family": spec.family,
            "weights": ctx.loaded.weights,
            "image_size": ctx.loaded.image_size,
            "num_classes": ctx.loaded.num_classes,
            "fp32_torch": {
                "label": "measured",
                "images": int(len(val.labels)),
                "top1": topk_accuracy(val.reference, val.labels, 1),
                "top5": topk_accuracy(val.reference, val.labels, 5),
            },
            "counted": self._counted(spec.name),
            "paper": {**spec.paper.__dict__},
        }

    def _counted(self, name: str) -> dict[str, Any]:
        """Params and GMACs at the paper's setting (ImageNet-1k classes, default size), cached on disk."""
        from t2tedge.models.counting import count_macs, count_params

        path = self.cache_dir / "counted.json"
        cached = json.loads(path.read_text()) if path.is_file() else {}
        if name not in cached:
            spec = get_spec(name)
            model = spec.create()
            size = spec.preprocess.input_size
            cached[name] = {
                "image_size": size,
                "num_classes": 1000,
                "params_m": round(count_params(model) / 1e6, 3),
                "macs_g": round(count_macs(model, size) / 1e9, 3),
            }
            write_json(path, cached)
        return cached[name]

    def load(self, entry: ModelEntry) -> ModelContext:
        """The recipe entry's model, loaded with its weights (the context every later stage takes)."""
        spec = get_spec(entry.name)
        checkpoint = resolve_weights(entry)
        loaded = load_model(spec, checkpoint, image_size=entry.image_size)
        return ModelContext(entry, loaded, sha256_file(checkpoint) if checkpoint else None)

    def export(self, ctx: ModelContext, calibration_source: ImageDataset) -> Artifact:
        """Export to ONNX once per (weights, size, export config); check it against PyTorch."""
        inputs = self._export_inputs(ctx)
        with self.store.build(ctx.loaded.spec.name, "export", "onnx", inputs) as job:
            if job.done:
                log(f"  export: reused {job.final}")
                return job.artifact
            cfg = self.recipe.export
            images = self._parity_images(ctx, calibration_source)
            files, record, seconds = export_model(ctx.loaded.model, ctx.loaded.image_size, cfg.opset,
                                                  cfg.dynamic_batch, images)  # fmt: skip
            self._commit_export(job, ctx, inputs, files, record, seconds)
        return job.artifact

    def _export_all(self, ctxs: list[ModelContext], calibration_source: ImageDataset) -> list[Artifact]:
        """``export`` for every model, the missing ones as executor tasks at once."""
        cfg = self.recipe.export
        keyed = [(ctx, self._export_inputs(ctx)) for ctx in ctxs]
        todo = [(ctx, inputs) for ctx, inputs in keyed
                if self.store.find(ctx.loaded.spec.name, "export", "onnx", content_hash(inputs)) is None]  # fmt: skip
        tasks = [
            Task(
                export_model,
                (
                    ctx.loaded.model,
                    ctx.loaded.image_size,
                    cfg.opset,
                    cfg.dynamic_batch,
                    self._parity_images(ctx, calibration_source),
                ),
                label=f"export {ctx.loaded.spec.name}",
                resources={"CPU": 1.0},
            )  # fmt: skip
            for ctx, _ in todo
        ]
        made = dict(zip((id(ctx) for ctx, _ in todo), self.executor.run(tasks, "exporting"), strict=True))
        exported = []
        for ctx, inputs in keyed:
            if id(ctx) not in made:
                exported.append(self.export(ctx, calibration_source))  # reused (or removed since: made here)
                continue
            with self.store.build(ctx.loaded.spec.name, "export", "onnx", inputs) as job:
                if not job.done:
                    self._commit_export(job, ctx, inputs, *made[id(ctx)])
            exported.append(job.artifact)
        return exported

    def _export_inputs(self, ctx: ModelContext) -> dict[str, Any]:
        cfg = self.recipe.export
        loaded = ctx.loaded
        inputs = {
            "stage": "export",
            "model": loaded.spec.name,
            "weights_sha256": ctx.checkpoint_sha256 or f"random-seed-{torch.initial_seed()}",
            "image_size": loaded.image_size,
            "num_classes": loaded.num_classes,
            "opset": cfg.opset,
            "dynamic_batch": cfg.dynamic_batch,
            "torch": torch.__version__,
            "onnx": _version("onnx"),
            "onnxscript": _version("onnxscript"),
            "graph_revision": GRAPH_REVISION,
            "t2tedge": t2tedge.__version__,
            "model_source": export_digest(),
        }
        if ctx.checkpoint_sha256 is None:
            # Random weights differ per process: never reuse them from the cache.
            inputs["nonce"] = ctx.nonce
        return inputs

    def _parity_images(self, ctx: ModelContext, calibration_source: ImageDataset) -> np.ndarray:
        indices = select_indices(calibration_source.labels, self.recipe.export.parity_images, seed=1)
        images, _, _ = cached_preprocess(
            calibration_source, indices, ctx.loaded.preprocess, self.cache_dir / "tensors", "parity images"
        )
        return images

    def _commit_export(
        self,
        job: Any,
        ctx: ModelContext,
        inputs: dict[str, Any],
        files: dict[str, bytes],
        record: dict[str, Any],
        seconds: float,
    ) -> None:
        loaded = ctx.loaded
        write_files(job.dir, files)
        job.manifest.update(
            {
                "config": {**inputs, "preprocess": loaded.preprocess.to_dict(), "classes": loaded.classes},
                "family": loaded.spec.family,
                "weights": loaded.weights,
                "parity": record,
                "seconds": round(seconds, 2),
                "tools": {"torch": torch.__version__, "t2tedge": t2tedge.__version__},
            }
        )
        log(f"  export: {job.final} (max |Δlogit| {record['logit_abs_err_max']:.2e})")

    def _calibration_set(
        self, ctx: ModelContext, source: ImageDataset, validation: ImageDataset, val: ValidationSet
    ) -> CalibrationSet:
        cfg = self.recipe.calibration
        calib = calibration_set(
            source, ctx.loaded.preprocess, cfg.size, cfg.seed, self.cache_dir / "tensors", cfg.allow_fewer
        )
        overlap = calib.overlap(validation, val.indices)
        if overlap and not self.recipe.data.allow_overlap:
            raise DatasetError(
                f"{overlap} calibration images also appear in the validation set "
                "(use disjoint sets, or set data.allow_overlap: true to build with marked numbers)"
            )
        if overlap:
            log(f"  [yellow]warning:[/] {overlap} calibration images also appear in the validation set (allowed)")
        self.overlaps[ctx.loaded.spec.name] = overlap
        return calib

    def _tuning_set(self, heldout: CalibrationSet | None) -> np.ndarray:
        """Which held-out images (up to ``accuracy_subset``, class-balanced) accuracy-aware search scores on."""
        labels = heldout.labels if heldout is not None else np.zeros(0, dtype=np.int64)
        if heldout is None or (labels < 0).any():
            raise T2tedgeError(
                "quantization.max_accuracy_drop needs labelled held-out images: set calibration.heldout > 0 "
                "with a labelled calibration source (never the validation set)"
            )
        return select_indices(labels, self.recipe.quantization.accuracy_subset, seed=0)

    def _validation_set(self, ctx: ModelContext, exported: Artifact, validation: ImageDataset) -> ValidationSet:
        """Preprocessed validation images, labels and FP32 PyTorch logits (cached by content).

        On a cluster nothing is decoded here: the reference is computed in shard tasks that decode their
        samples, and artifacts are validated the same way."""
        limit = self.recipe.data.limit
        indices = (
            select_indices(validation.labels, limit, seed=0) if limit else np.arange(len(validation), dtype=np.int64)
        )
        pre = ctx.loaded.preprocess
        if self._distributed:
            return self._sharded_reference(ctx, exported, validation, indices)
        images, key, _ = cached_pixels(validation, indices, pre, self.cache_dir / "tensors", "validation images")
        indices = indices[images.kept]  # the images that decode
        ref_path = self._reference_path(exported, key)
        if ref_path.is_file():
            reference = np.load(ref_path)
        else:
            torch.set_num_threads(self.recipe.threads or torch.get_num_threads())
            reference = torch_logits(ctx.loaded.model, images)
            save_array(ref_path, reference)
        selection = Selection(validation, indices, validation.labels[indices], pre, key)
        return ValidationSet(images, selection.labels, reference, key, selection, len(images.skipped))

    def _reference_path(self, exported: Artifact, key: str) -> Path:
        return self.cache_dir / "reference" / f"{exported.manifest['hash'][:16]}-{key[:16]}.npy"

    def _sharded_reference(
        self, ctx: ModelContext, exported: Artifact, validation: ImageDataset, indices: np.ndarray
    ) -> ValidationSet:
        """The FP32 reference as executor tasks; cached with the positions of the samples that decoded."""
        pre = ctx.loaded.preprocess
        key = tensor_key(validation, indices, pre)
        selection = Selection(validation, indices, validation.labels[indices], pre, key)
        ref_path = self._reference_path(exported, selection.key)
        kept_path = ref_path.with_suffix(".kept.npy")
        if ref_path.is_file() and kept_path.is_file():
            reference, kept = np.load(ref_path), np.load(kept_path)
        else:
            model = self.executor.share(ctx.loaded.model)
            threads = self.recipe.threads or 1
            # whole batches of the local reference (64), so each sample sees the local run's batches
            shard = -(-self.recipe.executor.shard_images // REFERENCE_BATCH) * REFERENCE_BATCH
            shards = run_shards(
                self.executor,
                selection,
                shard,
                lambda samples: (shard_reference, (model, samples, pre.to_dict(), threads)),
                f"reference {ctx.loaded.spec.name}",
                {"CPU": 1.0},
                f"FP32 reference {ctx.loaded.spec.name}",
            )
            reference, kept = shards.logits, shards.kept
            save_array(kept_path, kept)  # the positions first: a reference on disk always has them
            save_array(ref_path, reference)
        selection = dataclasses.replace(selection, indices=indices[kept], labels=selection.labels[kept])
        return ValidationSet(None, selection.labels, reference, key, selection, len(indices) - len(kept))

    def build_one(
        self,
        ctx: ModelContext,
        exported: Artifact,
        target_name: str,
        precision: str,
        val: ValidationSet,
        calib: CalibrationSet,
    ) -> BuildRow:
        """Build (or reuse) one artifact and validate it on the validation set."""
        target = get_target(target_name)
        availability = target.availability()
        name = ctx.loaded.spec.name
        if not availability.can_build:
            raise TargetUnavailableError(f"{target_name} cannot build here: {availability.reason}")
        plan = self.plan(ctx, exported, target_name, precision, calib)
        needs_calibration = plan.calib is not None
        started = time.perf_counter()
        artifact, reused = self.compile(ctx, exported, plan, calib)
        build_seconds = round(time.perf_counter() - started, 2)
        accuracy = stored_validation(artifact, val.key[:16])  # only this host's: precision defaults differ
        if accuracy is None:
            accuracy = run_validation(target, artifact, val.images, val.labels, val.reference, self.recipe.threads)
            self._record_validation(artifact, accuracy, name, needs_calibration, val)
        self._log_row(target_name, precision, reused, artifact, accuracy)
        return BuildRow(name, target_name, precision, str(artifact.path), reused, accuracy, build_seconds)

    def compile(
        self, ctx: ModelContext, exported: Artifact, plan: Plan, calib: CalibrationSet
    ) -> tuple[Artifact, bool]:
        """Build (or reuse) the artifact of one planned cell here; returns it and whether it was reused."""
        target = get_target(plan.target)
        with self.store.build(ctx.loaded.spec.name, plan.target, plan.precision, plan.inputs) as job:
            reused = job.done
            if not job.done:
                build_inputs = self._build_inputs(ctx, exported, plan.calib, plan.heldout, plan.tuning)
                facts = target.build(build_inputs, plan.precision, plan.config, job.dir)
                job.manifest.update(
                    self._manifest_facts(ctx, target, plan.inputs, facts, calib, plan.heldout, plan.tuning)
                )
        return job.artifact, reused

    def _build_distributed(
        self,
        ctx: ModelContext,
        exported: Artifact,
        cells: list[tuple[str, str]],
        val: ValidationSet,
        calib: CalibrationSet,
    ) -> list[BuildRow]:
        """``build_one`` for every cell of a model, as executor tasks: the missing artifacts compile on
        workers and come back as files the store commits here; then each is validated in shards."""
        name = ctx.loaded.spec.name
        plans = [self.plan(ctx, exported, target_name, precision, calib) for target_name, precision in cells]
        todo = [plan for plan in plans if self.store.find(name, plan.target, plan.precision, plan.key) is None]
        export_files = self.executor.share(artifact_payload(exported.path)) if todo else None
        tasks = [
            Task(
                compile_artifact,
                (
                    plan.target,
                    self._build_inputs(ctx, exported, plan.calib, plan.heldout, plan.tuning),
                    plan.precision,
                    plan.config,
                    export_files,
                ),
                label=f"compile {name}/{plan.target}/{plan.precision}",
                resources=self._task_resources(plan.target),
                labels=self._task_labels(plan.target),
            )  # fmt: skip
            for plan in todo
        ]
        built = dict(zip((id(plan) for plan in todo), self.executor.run(tasks, f"compiling {name}"), strict=True))
        rows = []
        for plan in plans:
            target = get_target(plan.target)
            seconds = 0.0
            with self.store.build(name, plan.target, plan.precision, plan.inputs) as job:
                reused = job.done
                if not job.done:
                    if id(plan) not in built:  # it existed when planned and was removed since: build it here
                        inputs = self._build_inputs(ctx, exported, plan.calib, plan.heldout, plan.tuning)
                        built[id(plan)] = compile_artifact(plan.target, inputs, plan.precision, plan.config)
                    facts, files, seconds = built[id(plan)]
                    write_files(job.dir, files)
                    job.manifest.update(
                        self._manifest_facts(ctx, target, plan.inputs, facts, calib, plan.heldout, plan.tuning)
                    )
            artifact = job.artifact
            accuracy = stored_validation(artifact, val.key[:16])
            if accuracy is None:
                accuracy = validate_sharded(
                    self.executor,
                    target,
                    artifact,
                    val.selection,
                    val.reference,
                    self.recipe.threads,
                    self.recipe.executor.shard_images,
                    self._task_resources(plan.target),
                    self._task_labels(plan.target),
                )
                self._record_validation(artifact, accuracy, name, target.needs_calibration(plan.precision), val)
            self._log_row(plan.target, plan.precision, reused, artifact, accuracy)
            rows.append(
                BuildRow(name, plan.target, plan.precision, str(artifact.path), reused, accuracy, round(seconds, 2))
            )
        return rows

    def plan(
        self,
        ctx: ModelContext,
        exported: Artifact,
        target_name: str,
        precision: str,
        calib: CalibrationSet,
        config: Any = None,
    ) -> Plan:
        """What decides one cell's artifact: its key, config and the calibration splits it reads.

        ``config``: the target's Config to build with; default: the recipe's, with the tuned placement
        of this model and target over it (``tuned:``, written by ``t2tedge tune``)."""
        target = get_target(target_name)
        needs_calibration = target.needs_calibration(precision)
        heldout = calib.heldout(self.recipe.calibration.heldout) if needs_calibration else None
        quant = self.recipe.quantization
        if config is None:
            config = self.tuned.config(ctx.loaded.spec.name, target_name, quant.for_target(target_name))
            if precision == "int8":
                self.tuned.note_int8(ctx.loaded.spec.name, target_name)
        tuning = self._tuning_set(heldout) if needs_calibration and config.max_accuracy_drop is not None else None
        inputs = self._compile_key(ctx, exported, target, precision, config, calib, heldout, tuning)
        return Plan(
            target_name, precision, config, inputs, content_hash(inputs), calib if needs_calibration else None,
            heldout, tuning,
        )  # fmt: skip

    def _record_validation(
        self, artifact: Artifact, accuracy: dict[str, Any], model: str, calibrated: bool, val: ValidationSet
    ) -> None:
        accuracy["dataset"] = self.recipe.data.validation
        accuracy["skipped"] = val.skipped
        overlap = self.overlaps.get(model, 0)
        if calibrated and overlap:
            # calibrated on images it is then scored on: marked in the manifest, summary and report
            accuracy["calibration_overlap"] = overlap
        store_validation(artifact, val.key[:16], accuracy)

    @staticmethod
    def _log_row(target_name: str, precision: str, reused: bool, artifact: Artifact, accuracy: dict[str, Any]) -> None:
        verb = "reused" if reused else "built"
        top1 = f"top-1 {accuracy['top1']:.2f}% ({accuracy['label']})" if "top1" in accuracy else accuracy["label"]
        log(f"  {target_name}/{precision}: {verb} {artifact.path}; {top1}")

    def _compile_key(
        self,
        ctx: ModelContext,
        exported: Artifact,
        target: Any,
        precision: str,
        config: Any,
        calib: CalibrationSet,
        heldout: CalibrationSet | None,
        tuning: np.ndarray | None,
    ) -> dict[str, Any]:
        """Everything that decides the artifact's files: its store key (and the manifest's ``config``)."""
        inputs: dict[str, Any] = {
            "stage": "compile",
            "export": exported.manifest["hash"],
            "target": target.name,
            "precision": precision,
            "tools": target.tool_versions(),
            "t2tedge": t2tedge.__version__,
            "rules": rules_digest(target.name),
            # the target's settings matter for every precision (e.g. OpenVINO's precision hint)
            "quantization": config.model_dump(mode="json"),
            "preprocess": ctx.loaded.preprocess.to_dict(),
            "model_hints": dataclasses.asdict(ctx.loaded.spec.quantization),  # they decide what stays float
        }
        if target.needs_calibration(precision):  # the calibration set only where the precision is calibrated
            inputs["calibration"] = calib.key
            inputs["heldout"] = heldout.key if heldout else None
        if tuning is not None and heldout is not None:
            inputs["accuracy_control"] = {"split": "calibration.heldout", "key": heldout.key, "images": len(tuning)}
        return inputs

    def _build_inputs(
        self,
        ctx: ModelContext,
        exported: Artifact,
        calib: CalibrationSet | None,
        heldout: CalibrationSet | None,
        tuning: np.ndarray | None,
    ) -> BuildInputs:
        """What the target's build reads; calibration and held-out images only where it calibrates."""
        inputs = BuildInputs(
            onnx_path=exported.file(ONNX_FILE),
            image_size=ctx.loaded.image_size,
            num_classes=ctx.loaded.num_classes,
            torch_model=ctx.loaded.model,
            export_form=graph_form(ctx.loaded.model),
            hints=ctx.loaded.spec.quantization,
            preprocess=ctx.loaded.preprocess.to_dict(),
        )
        if calib is None:
            return inputs
        inputs.calibration = calib.images
        if heldout is not None:
            labels = heldout.labels
            # accuracy-aware search scores on (a class-balanced subset of) the held-out split; the
            # validation set is seen only by the final measurement
            chosen = tuning if tuning is not None else slice(None)
            inputs.heldout, inputs.heldout_labels = heldout.images[chosen], labels[chosen]
        return inputs

    def _manifest_facts(
        self,
        ctx: ModelContext,
        target: Any,
        inputs: dict[str, Any],
        facts: dict[str, Any],
        calib: CalibrationSet,
        heldout: CalibrationSet | None,
        tuning: np.ndarray | None,
    ) -> dict[str, Any]:
        """The manifest sections of a fresh build besides what the store writes itself."""
        manifest: dict[str, Any] = {
            "config": inputs,
            "build": facts,
            "model_io": {
                "family": ctx.loaded.spec.family,
                "image_size": ctx.loaded.image_size,
                "num_classes": ctx.loaded.num_classes,
                "classes": ctx.loaded.classes,
                "preprocess": ctx.loaded.preprocess.to_dict(),
            },
            "tools": target.tool_versions(),
            "host": host_info(),
        }
        if "calibration" in inputs:
            manifest["calibration"] = {
                **calib.describe(),
                "source": self.recipe.data.calibration,
                "heldout": heldout.describe() if heldout else None,
            }
            if tuning is not None:
                manifest["calibration"]["accuracy_tuned_on"] = inputs["accuracy_control"]
        return manifest

    def _write_summary(self, rows: list[BuildRow]) -> Path:
        path = Path(self.recipe.output_dir) / f"{self.recipe.name}-summary.json"
        write_json(
            path,
            {
                "recipe": json.loads(self.recipe.model_dump_json()),
                "host": host_info(),
                "host_fingerprint": this_host.host_fingerprint(),
                "t2tedge": t2tedge.__version__,
                "calibration_validation_overlap": self.overlaps,
                "models": self.model_facts,
                "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "rows": [row.to_dict() for row in rows],
            },
        )
        return path
