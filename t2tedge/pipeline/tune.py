"""``t2tedge tune``: INT8 placement chosen by latency measured on the target runtime and agreement with
FP32 measured on held-out data, with the Pareto front of every point measured.

For each model and INT8 target the search is:

1. **One choice at a time** over the recipe's settings: keep one of the model's layer groups float
   (``ModelSpec.quantization.groups``, as the target's ``float_modules``), or set one of the target's
   knobs (``Capabilities.tune_knobs``: calibration method, OpenVINO's precision hint for the float part,
   SmoothQuant, ...). That measures each choice's cost in agreement and its gain in latency.
2. **Greedy combination**: starting from the recipe's point (or the most faithful point when it
   breaks the rule), the single choices that kept the rule are applied fastest first; each combination
   is built and measured, and kept when it keeps the rule and is faster.

Every candidate is a real artifact in the store (built from the cached export and calibration set, so
its key holds both and the candidate's settings), scored on a held-out split of the calibration source
(never the validation set) against FP32 PyTorch, and timed with ``bench``'s interleaved rounds on the
target runtime, here or on an SSH device (``--device``). Scores and latencies are stored in the
artifacts' manifests under this host's fingerprint, so a rerun measures nothing it has measured.

The chosen point is the fastest that keeps the rule (``tune.max_agreement_drop`` points of top-1
agreement with FP32, default 4, or ``tune.max_top1_drop``); it is written, as the keys that differ from
the recipe, into a tuned-placements file that ``t2tedge build --tuned FILE`` applies.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from t2tedge.calibration import CalibrationSet, calibration_set
from t2tedge.data.cache import save_array
from t2tedge.data.datasets import open_dataset
from t2tedge.errors import T2tedgeError
from t2tedge.evaluation import host as this_host
from t2tedge.evaluation.accuracy import MEASURED
from t2tedge.evaluation.host import host_info
from t2tedge.pipeline.build import Builder, ModelContext
from t2tedge.pipeline.export import torch_logits
from t2tedge.pipeline.recipe import Recipe
from t2tedge.pipeline.store import Artifact
from t2tedge.pipeline.validate import run_validation, store_validation, stored_validation
from t2tedge.progress import log
from t2tedge.targets import get_target

RECIPE_POINT = "recipe"
# Where candidates' timings live in their manifests: apart from `latency`, which `bench`/`build` write with
# their own settings (sharing it, a build of the chosen point replaced its tune timing: a rerun re-timed it).
TIMING_SECTION = "tune_latency"


@dataclass
class Candidate:
    """One placement: a name and the keys it sets over the recipe's section for the target."""

    name: str
    override: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        return json.dumps(self.override, sort_keys=True)


@dataclass
class Point:
    """A measured candidate."""

    candidate: Candidate
    artifact: str | None = None
    built: bool = False
    agreement: float | None = None  # top-1 agreement with FP32 PyTorch on the held-out split, percent
    top1: float | None = None
    latency_ms: float | None = None  # p50, batch 1
    fp32_latency_ms: float | None = None  # the target's FP32 build, p50 in the same interleaved round
    fp32_round: str | None = None  # which round that was (points timed together share it)
    error: str | None = None
    front: bool = False

    @property
    def speedup_vs_fp32(self) -> float | None:
        """FP32's p50 over this point's, both from the same interleaved round."""
        if not self.latency_ms or not self.fp32_latency_ms:
            return None
        return round(self.fp32_latency_ms / self.latency_ms, 3)

    @property
    def measured(self) -> bool:
        return self.error is None and self.agreement is not None and self.latency_ms is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.candidate.name,
            "override": self.candidate.override,
            "artifact": self.artifact,
            "built": self.built,
            "heldout_top1_agreement": self.agreement,
            "heldout_top1": self.top1,
            "latency_ms_p50": self.latency_ms,
            "fp32_latency_ms_p50_same_round": self.fp32_latency_ms,
            "speedup_vs_fp32": self.speedup_vs_fp32,
            "on_front": self.front,
            **({"error": self.error} if self.error else {}),
        }


@dataclass
class Job:
    """One model × target being tuned: what every candidate is built from, scored and timed with."""

    ctx: ModelContext
    exported: Artifact
    calib: CalibrationSet
    heldout: CalibrationSet
    reference: np.ndarray  # FP32 PyTorch logits on the held-out images
    target: str
    base: Any  # the recipe's Config for the target: what candidates override
    fp32: dict[str, Any]  # the target's FP32 artifact, timed beside every batch of candidates


def merge(base: dict[str, Any], move: dict[str, Any]) -> dict[str, Any]:
    """``move`` over ``base``; ``float_modules`` lists are joined (keeping two groups float keeps both)."""
    out = {**base, **move}
    if "float_modules" in base and "float_modules" in move:
        out["float_modules"] = list(dict.fromkeys([*base["float_modules"], *move["float_modules"]]))
    return out


def candidates(target_name: str, groups: tuple[tuple[str, tuple[str, ...]], ...], base: Any, recipe: Recipe) -> list:
    """The recipe's point, then one choice at a time: each layer group kept float, each knob value."""
    cfg = recipe.tune
    target = get_target(target_name)
    out = [Candidate(RECIPE_POINT)]
    fields = type(base).model_fields
    if cfg.groups and "float_modules" in fields:
        for name, globs in groups:
            out.append(Candidate(f"float {name}", {"float_modules": [*base.float_modules, *globs]}))
    if cfg.knobs:
        for key, values in target.capabilities.tune_knobs:
            if key not in fields:
                continue
            for value in values:
                if value != getattr(base, key):
                    out.append(Candidate(f"{key}={json.dumps(value)}", {key: value}))
    return out[: cfg.max_candidates]


def pareto(points: list[Point]) -> list[Point]:
    """The measured points no other point beats on both latency (lower) and agreement (higher)."""
    measured = [p for p in points if p.measured]
    front = [
        p
        for p in measured
        if not any(
            (q.latency_ms <= p.latency_ms and q.agreement >= p.agreement)
            and (q.latency_ms < p.latency_ms or q.agreement > p.agreement)
            for q in measured
        )
    ]
    return sorted(front, key=lambda p: p.latency_ms)


class Tuner:
    """Runs ``t2tedge tune`` for a recipe: every model × INT8 target, here or timed on an SSH device."""

    def __init__(self, recipe: Recipe, targets: list[str] | None = None, device: str | None = None) -> None:
        self.recipe = recipe
        self.cfg = recipe.tune
        self.device = device
        self.builder = Builder(recipe.model_copy(update={"tuned": None}))  # tunes from the recipe's own point
        names = targets or self.cfg.targets or list(recipe.targets)
        self.targets = [n for n in names if "int8" in get_target(n).precisions]
        if not self.targets:
            offered = [n for n in names if get_target(n)]
            raise T2tedgeError(f"no INT8 target to tune among {', '.join(offered)}")
        for name in self.targets:
            availability = get_target(name).availability()
            if not availability.can_run:
                raise T2tedgeError(f"{name} cannot run here, so its candidates cannot be timed: {availability.reason}")
        self.out_dir = Path(recipe.output_dir) / "tune"
        # the recipe's timing settings (settling, rounds, ...), shortened to tune's own budget
        self.bench_cfg = recipe.benchmark.model_copy(
            update={
                "enabled": True,
                "min_iters": min(recipe.benchmark.min_iters, 50),
                "min_seconds": self.cfg.seconds,
                "batch_sizes": [1],
                "threads": [recipe.benchmark.threads[0]],
                "efficiency": False,
            }
        )
        self.stats = {"built": 0, "scored": 0, "timed": 0, "reused": 0}
        self.reference_top1 = float("nan")  # FP32 PyTorch top-1 on the held-out split of the model being tuned

    # ---- the run ---------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Tune every model × target; write each front (JSON, plot) and the tuned-placements file."""
        source = open_dataset(self.recipe.data.calibration)
        results = []
        for entry in self.recipe.models:
            ctx = self.builder.load(entry)
            log(f"[bold]{entry.name}[/] ({ctx.loaded.weights}, {ctx.loaded.image_size}px): tuning")
            exported = self.builder.export(ctx, source)
            cal = self.recipe.calibration
            calib = calibration_set(
                source, ctx.loaded.preprocess, cal.size, cal.seed, self.builder.cache_dir / "tensors", cal.allow_fewer
            )
            heldout = self._heldout(calib)
            reference = self._reference(ctx, exported, heldout)
            for target_name in self.targets:
                results.append(self._tune(ctx, exported, calib, heldout, reference, target_name))
        tuned = self._write_tuned(results)
        summary = {
            "recipe": self.recipe.name,
            "results": [r["path"] for r in results],
            "tuned": str(tuned),
            "stats": self.stats,
        }
        log(f"tuned placements: {tuned}")
        log(f"  apply with: t2tedge build RECIPE --tuned {tuned}")
        log(
            f"  measured {self.stats['built']} builds, {self.stats['scored']} scores, {self.stats['timed']} timings; "
            f"reused {self.stats['reused']}"
        )
        return {**summary, "fronts": results}

    def _heldout(self, calib: CalibrationSet) -> CalibrationSet:
        heldout = calib.heldout(self.cfg.heldout)
        if heldout is None or (heldout.labels < 0).any():
            raise T2tedgeError(
                "tune scores on held-out images of a labelled calibration source (never the validation set): "
                f"{self.recipe.data.calibration} has no labelled images left after the calibration set"
            )
        return heldout

    def _reference(self, ctx: ModelContext, exported: Artifact, heldout: CalibrationSet) -> np.ndarray:
        path = self.builder.cache_dir / "reference" / f"{exported.manifest['hash'][:16]}-{heldout.key[:16]}.npy"
        if path.is_file():
            return np.load(path)
        reference = torch_logits(ctx.loaded.model, heldout.images)
        save_array(path, reference)
        return reference

    def _tune(
        self,
        ctx: ModelContext,
        exported: Artifact,
        calib: CalibrationSet,
        heldout: CalibrationSet,
        reference: np.ndarray,
        target_name: str,
    ) -> dict[str, Any]:
        from t2tedge.evaluation.accuracy import topk_accuracy

        base = self.recipe.quantization.for_target(target_name)
        self.reference_top1 = topk_accuracy(reference, heldout.labels, 1)
        fp32 = self._fp32(ctx, exported, calib, target_name)
        job = Job(ctx, exported, calib, heldout, reference, target_name, base, fp32)
        points = self._measure(job, candidates(target_name, ctx.loaded.spec.quantization.groups, base, self.recipe))
        start = next((p for p in points if p.candidate.name == RECIPE_POINT), None)
        if start is None or not start.measured or not self._keeps_rule(start):
            faithful = [p for p in points if p.measured]
            start = max(faithful, key=lambda p: p.agreement) if faithful else None
        if start is not None:
            points += self._combine(job, points, start)
        front = pareto(points)
        for point in front:
            point.front = True
        chosen = min((p for p in points if p.measured and self._keeps_rule(p)), key=lambda p: p.latency_ms,
                     default=None)  # fmt: skip
        return self._write_front(job, points, chosen)

    def _combine(self, job: Job, singles: list[Point], start: Point) -> list[Point]:
        """Apply the single choices that kept the rule, fastest first, while each keeps the rule and speeds up."""
        measured = {p.candidate.key(): p for p in singles}
        moves = sorted(
            (p for p in singles if p.measured and self._keeps_rule(p) and p.latency_ms < start.latency_ms
             and p is not start),
            key=lambda p: p.latency_ms,
        )  # fmt: skip
        current, made = start, []
        budget = max(0, self.cfg.max_candidates - len(singles))
        for move in moves:
            override = merge(current.candidate.override, move.candidate.override)
            point = measured.get(json.dumps(override, sort_keys=True))
            if point is None:  # a new combination: build and measure it
                if len(made) >= budget:
                    break
                name = move.candidate.name if current.candidate.name == RECIPE_POINT else None
                candidate = Candidate(name or f"{current.candidate.name} + {move.candidate.name}", override)
                (point,) = self._measure(job, [candidate])
                measured[candidate.key()] = point
                made.append(point)
            if point.measured and self._keeps_rule(point) and point.latency_ms < current.latency_ms:
                current = point
        return made

    def _keeps_rule(self, point: Point) -> bool:
        if self.cfg.max_top1_drop is not None:
            return point.top1 is not None and self.reference_top1 - point.top1 <= self.cfg.max_top1_drop
        drop = self.cfg.max_agreement_drop
        return point.agreement is not None and 100.0 - point.agreement <= (drop if drop is not None else 100.0)

    # ---- measuring ---------------------------------------------------------------------------------------

    def _fp32(self, ctx: ModelContext, exported: Artifact, calib: CalibrationSet, target_name: str) -> dict[str, Any]:
        """The target's FP32 artifact: timed in the same rounds as the candidates, for their speed-up."""
        plan = self.builder.plan(ctx, exported, target_name, "fp32", calib)
        artifact, reused = self.builder.compile(ctx, exported, plan, calib)
        self.stats["built" if not reused else "reused"] += 1
        return {"artifact": str(artifact.path)}

    def _measure(self, job: Job, batch: list[Candidate]) -> list[Point]:
        """Build, score and time ``batch`` (timed together with the FP32 artifact, interleaved)."""
        target = get_target(job.target)
        key = f"heldout-{job.heldout.key[:16]}"
        points = []
        for candidate in batch:
            point = Point(candidate)
            points.append(point)
            try:
                config = type(job.base).model_validate({**job.base.model_dump(), **candidate.override})
                plan = self.builder.plan(job.ctx, job.exported, job.target, "int8", job.calib, config)
                log(f"  {job.target}: {candidate.name}")
                artifact, reused = self.builder.compile(job.ctx, job.exported, plan, job.calib)
            except T2tedgeError as exc:
                point.error = str(exc).splitlines()[0]
                log(f"  {job.target}: {candidate.name}: [yellow]not built[/] ({point.error})")
                continue
            point.artifact, point.built = str(artifact.path), not reused
            self.stats["built" if not reused else "reused"] += 1
            score = stored_validation(artifact, key)
            if score is None:
                heldout = job.heldout
                score = run_validation(
                    target, artifact, heldout.images, heldout.labels, job.reference, self.recipe.threads
                )
                score["dataset"] = f"{self.recipe.data.calibration} (held-out split {heldout.key[:16]})"
                store_validation(artifact, key, score)
                self.stats["scored"] += 1
            else:
                self.stats["reused"] += 1
            if score.get("label") not in (MEASURED, "emulated") or "vs_fp32_torch" not in score:
                point.error = score.get("reason") or f"held-out score {score.get('label')}"
                continue
            point.agreement = score["vs_fp32_torch"]["top1_agreement"]
            point.top1 = score["top1"]
        self._time([p for p in points if p.artifact], job.fp32)
        return points

    def _time(self, points: list[Point], fp32: dict[str, Any]) -> None:
        """Time the points not timed before in one interleaved round with the FP32 build (re-timed in every
        round, so each point's speed-up is against FP32 measured beside it); the others are reused."""
        from t2tedge.pipeline.bench import bench_artifacts, is_stored

        def timed(paths: list[Path], force: bool) -> dict[str, dict[str, Any]]:
            records = bench_artifacts(paths, self.bench_cfg, force, self.device, section=TIMING_SECTION)
            for record in records:
                self.stats["reused" if record.get("reused") else "timed"] += 1
            return {r["artifact"]: r for r in records}

        reused = {id(p) for p in points if is_stored(Path(p.artifact), self.bench_cfg, self.device, TIMING_SECTION)}
        stored = [p for p in points if id(p) in reused]
        fresh = [p for p in points if id(p) not in reused]
        by_path = timed([Path(p.artifact) for p in stored], False) if stored else {}
        fp32_ms, round_id = None, None
        if fresh:
            this_round = timed([Path(p.artifact) for p in fresh] + [Path(fp32["artifact"])], True)
            record = this_round.pop(fp32["artifact"], {})
            by_path.update(this_round)
            if record.get("label") == MEASURED:
                fp32_ms = record["latency_ms_p50"]
                round_id = uuid.uuid4().hex[:12]
        for point in points:
            record = by_path.get(point.artifact, {})
            if record.get("label") != MEASURED:
                if point.error is None:
                    point.error = record.get("reason") or "not timed"
                continue
            point.latency_ms = record["latency_ms_p50"]
            if id(point) in reused:  # the FP32 latency of its own round, stored beside its timing
                point.fp32_latency_ms = record.get("fp32_latency_ms_p50")
                point.fp32_round = record.get("fp32_round")
            elif fp32_ms is not None:
                point.fp32_latency_ms, point.fp32_round = fp32_ms, round_id
                artifact = Artifact(Path(point.artifact))
                own = artifact.manifest[TIMING_SECTION][record["key"]]
                fp32_of_round = {"fp32_latency_ms_p50": fp32_ms, "fp32_round": round_id}
                artifact.update_manifest(**{TIMING_SECTION: {record["key"]: {**own, **fp32_of_round}}})

    # ---- output ------------------------------------------------------------------------------------------

    def _write_front(self, job: Job, points: list[Point], chosen: Point | None) -> dict[str, Any]:
        ctx, target_name, fp32 = job.ctx, job.target, job.fp32
        name = ctx.loaded.spec.name
        # FP32's p50 in each round a point was timed in, from the points themselves: a rerun that times
        # nothing reports the same rounds as the run that timed them
        rounds = {p.fp32_round or p.fp32_latency_ms: p.fp32_latency_ms for p in points if p.fp32_latency_ms}
        fp32_ms = list(rounds.values())
        speedup = chosen.speedup_vs_fp32 if chosen else None
        rule = (
            {"max_top1_drop": self.cfg.max_top1_drop}
            if self.cfg.max_top1_drop is not None
            else {"max_agreement_drop": self.cfg.max_agreement_drop}
        )
        result = {
            "model": name,
            "target": target_name,
            "image_size": ctx.loaded.image_size,
            "export": job.exported.manifest["hash"],
            "heldout_images": int(self.cfg.heldout),
            "heldout_fp32_torch_top1": self.reference_top1,
            "rule": rule,
            "objective": self.cfg.objective,
            "recipe_settings": job.base.model_dump(mode="json"),
            "fp32": {
                "artifact": fp32["artifact"],
                "latency_ms_p50": fp32_ms,
                "note": "one entry per timing round the candidates were in (each round interleaves them with FP32)",
            },
            "points": [p.to_dict() for p in points],
            "front": [p.candidate.name for p in pareto(points)],
            "chosen": chosen.to_dict() if chosen else None,
            # INT8 that does not beat FP32 beside it on this host: said, not hidden behind a "tuned" label
            "int8_beats_fp32": None if speedup is None else speedup > 1.0,
            "chosen_why": (
                "the fastest point that keeps the rule"
                if chosen
                else "no measured point keeps the rule: the recipe's settings stay"
            ),
            "timing": {**self.bench_cfg.model_dump(), "device": self.device or "local"},
            "host": host_info(),
            "host_fingerprint": this_host.host_fingerprint(),
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{name}-{target_name}.json"
        _write_text(path, json.dumps(result, indent=2, default=str) + "\n")
        result["path"] = str(path)
        plot = plot_front(result, self.out_dir / f"{name}-{target_name}.png")
        if chosen:
            speed = f"; {speedup:.2f}x FP32 (timed beside it)" if speedup else ""
            log(
                f"  {target_name}: chose [bold]{chosen.candidate.name}[/]: {chosen.latency_ms:.2f} ms p50, "
                f"{chosen.agreement:.1f} % agreement on {self.cfg.heldout} held-out images{speed}; front: {plot}"
            )
            if speedup is not None and speedup <= 1.0:
                log(
                    f"  [yellow]warning:[/] {target_name}: no INT8 placement that keeps the rule is faster than "
                    f"FP32 on this host ({', '.join(host_info()['isa']) or 'no ISA flags read'}): "
                    f"{name} runs faster as FP32 here"
                )
        else:
            log(f"  {target_name}: [yellow]no point keeps the rule[/] {rule}; front: {plot}")
        return result

    def _write_tuned(self, results: list[dict[str, Any]]) -> Path:
        models: dict[str, dict[str, Any]] = {}
        slower: dict[str, list[str]] = {}
        for result in results:
            chosen = result["chosen"]
            if chosen and chosen["override"]:
                models.setdefault(result["model"], {})[result["target"]] = chosen["override"]
            if result["int8_beats_fp32"] is False:
                slower.setdefault(result["model"], []).append(result["target"])
        path = self.out_dir / f"{self.recipe.name}-tuned.yaml"
        header = (
            f"# written by `t2tedge tune` for recipe {self.recipe.name!r}: the chosen INT8 placements, as the\n"
            "# keys that differ from the recipe's quantization sections; apply with `t2tedge build --tuned FILE`\n"
        )
        body = {
            "host": host_info().get("processor"),
            "host_fingerprint": this_host.host_fingerprint(),
            "rule": results[0]["rule"] if results else None,
            "models": models,
            # model -> targets where the chosen INT8 build was not faster than FP32 timed beside it
            "fp32_faster": slower,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _write_text(path, header + yaml.safe_dump(body, sort_keys=False))
        return path


def plot_front(result: dict[str, Any], path: Path) -> Path | None:
    """Latency vs agreement of every point, the front joined, the chosen point marked; None without points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [
        p for p in result["points"] if p["latency_ms_p50"] is not None and p["heldout_top1_agreement"] is not None
    ]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    ax.scatter([p["latency_ms_p50"] for p in points], [p["heldout_top1_agreement"] for p in points], color="tab:blue",
               zorder=3, label="candidate")  # fmt: skip
    front = sorted((p for p in points if p["on_front"]), key=lambda p: p["latency_ms_p50"])
    ax.plot([p["latency_ms_p50"] for p in front], [p["heldout_top1_agreement"] for p in front], "--", color="gray",
            zorder=2, label="Pareto front")  # fmt: skip
    for p in points:
        ax.annotate(p["name"], (p["latency_ms_p50"], p["heldout_top1_agreement"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")  # fmt: skip
    if result["chosen"]:
        c = result["chosen"]
        ax.scatter([c["latency_ms_p50"]], [c["heldout_top1_agreement"]], marker="*", s=220, color="tab:red", zorder=4,
                   label="chosen")  # fmt: skip
    drop = result["rule"].get("max_agreement_drop")
    if drop is not None:
        ax.axhline(100.0 - drop, color="tab:red", linewidth=0.8, linestyle=":", label=f"rule: ≥ {100 - drop:g} %")
    host = result["host"].get("processor", "this host")
    ax.set_title(f"{result['model']} on {result['target']} int8 ({result['image_size']} px), {host}", fontsize=9)
    ax.set_xlabel("latency p50, batch 1 (ms, measured)")
    ax.set_ylabel(f"top-1 agreement with FP32, {result['heldout_images']} held-out images (%)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _write_text(path: Path, text: str) -> None:
    """Write atomically: a reader (or an interrupted run) never sees half a file."""
    import os

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
