"""`t2tedge build --executor ray` on a real 2-node Ray cluster, against the local executor.

The cluster runs on loopback only (a private network namespace, see ray_harness.py). One scenario script
builds a tiny recipe there (ONNX Runtime fp32 and int8, validation in 2 shards), killing one compile
worker mid-task, and tries a recipe that asks for a resource no node offers; the test process builds the
same recipe with the local executor and compares artifacts and numbers.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from ray_harness import emit, loopback_cluster, loopback_skip_reason, run_in_loopback

from t2tedge.models import get_spec, save_checkpoint
from t2tedge.models.spec import Preprocess
from t2tedge.pipeline.build import Builder
from t2tedge.pipeline.recipe import load_recipe

SKIP = loopback_skip_reason()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")


def _recipe(root: Path, checkpoint: Path, store: str, **extra: Any) -> Path:
    recipe = {
        "name": "tiny",
        "output_dir": str(root / store),
        "models": [{"name": "t2t_vit_7", "weights": str(checkpoint)}],
        "targets": ["onnxruntime"],
        "precisions": ["fp32", "int8"],
        "data": {"limit": 64},
        "calibration": {"size": 32, "heldout": 16},
        "export": {"parity_images": 8},
        "benchmark": {"enabled": False},
        "threads": 1,
        "executor": {"shard_images": 32, **extra},
    }
    path = root / f"{store}.yaml"
    path.write_text(json.dumps(recipe))
    return path


def _files(rows: list[Any]) -> dict[str, dict[str, str]]:
    out = {}
    for row in rows:
        manifest = json.loads((Path(row.artifact) / "manifest.json").read_text())
        out[f"{row.target}/{row.precision}/{Path(row.artifact).name}"] = {
            name: fact["sha256"] for name, fact in manifest["files"].items()
        }
    return out


def _numbers(rows: list[Any]) -> dict[str, Any]:
    keep = ("label", "images", "top1", "top5", "vs_fp32_torch")
    return {f"{row.target}/{row.precision}": {k: row.accuracy.get(k) for k in keep} for row in rows}


def _kill_first_compile_worker(found: dict[str, Any], stop: threading.Event) -> None:
    """SIGKILL the first Ray worker seen compiling (its process title is ``ray::<task label>``), and note
    the first word of every task title seen on the way."""
    found["titles"] = set()
    while not stop.is_set():
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if title.startswith("ray::") and " " in title:  # a worker takes its task's name as its title
                found["titles"].add(title.split()[0])
            if title.startswith("ray::compile ") and "pid" not in found:
                os.kill(int(pid), signal.SIGKILL)
                found["pid"] = int(pid)
        time.sleep(0.02)


def _image_folder(root: Path) -> Path:
    """10 class folders ("0".."9") of 4 PNGs from the bundled set, plus one file that does not decode."""
    from t2tedge.data.datasets import open_dataset

    images = open_dataset("fashion_mnist:test").images
    for c in range(10):
        (root / str(c)).mkdir(parents=True)
        for j in range(4):
            Image.fromarray(images[c * 4 + j]).save(root / str(c) / f"{j}.png")
    (root / "3" / "garbage.png").write_bytes(b"not a png at all")
    return root


def ray_build_scenario(root: str, checkpoint: str) -> None:
    """Runs inside the loopback namespace: the Ray build (one worker killed) and the refused recipe."""
    from t2tedge.errors import T2tedgeError
    from t2tedge.pipeline.executors import RayExecutor
    from t2tedge.pipeline.validate import validate_artifact

    base = Path(root)
    seen: dict[str, Any] = {}
    pools = [{"t2tedge/pool": "a"}, {"t2tedge/pool": "b"}]
    with loopback_cluster([{}, {}], pools) as cluster, RayExecutor(address=cluster.address) as executor:
        killed: dict[str, Any] = {}
        stop = threading.Event()
        killer = threading.Thread(target=_kill_first_compile_worker, args=(killed, stop), daemon=True)
        killer.start()
        # every onnxruntime task through Ray's label selector (both nodes match it)
        labelled = {"labels": {"onnxruntime": {"t2tedge/pool": "in(a,b)"}}}
        rows = Builder(load_recipe(_recipe(base, Path(checkpoint), "ray-store", **labelled)), executor).run()
        stop.set()
        seen["killed_worker"] = killed.get("pid")
        seen["titles"] = sorted(killed["titles"])
        seen["files"] = _files(rows)
        seen["numbers"] = _numbers(rows)
        seen["shards"] = [row.accuracy.get("shards") for row in rows]
        seen["reused"] = [row.reused for row in rows]
        # a second build reuses every artifact and validation
        again = Builder(load_recipe(_recipe(base, Path(checkpoint), "ray-store", **labelled)), executor).run()
        seen["rerun_reused"] = [row.reused for row in again]
        seen["tensor_caches"] = sorted(p.name for p in (base / "ray-store" / ".cache" / "tensors").glob("*.npy"))
        # a folder with an undecodable file: validated on the cluster (nothing decoded here), then locally
        artifact = rows[1].artifact
        folder = str(base / "folder")
        on_ray = validate_artifact(artifact, folder, None, 1, executor, shard_images=32)
        caches_after_ray = sorted(p.name for p in (base / "ray-store" / ".cache" / "tensors").glob("*.npy"))
        here = validate_artifact(artifact, folder, None, 1)
        keep = ("images", "skipped", "top1", "top5")
        seen["folder"] = {
            "ray": {k: on_ray.get(k) for k in keep},
            "local": {k: here.get(k) for k in keep},
            "ray_shards": on_ray.get("shards"),
            "decoded_by_driver": caches_after_ray != seen["tensor_caches"],
        }
        refused = _recipe(base, Path(checkpoint), "refused-store", resources={"onnxruntime": {"mac": 1}})
        try:
            Builder(load_recipe(refused), executor).run()
            seen["refused"] = None
        except T2tedgeError as exc:
            seen["refused"] = str(exc)
        seen["refused_store"] = (
            sorted(p.name for p in (base / "refused-store").glob("*")) if (base / "refused-store").exists() else []
        )
        no_mac = {"onnxruntime": {"t2tedge/pool": "mac"}}
        unlabelled = _recipe(base, Path(checkpoint), "unlabelled-store", labels=no_mac)
        try:
            Builder(load_recipe(unlabelled), executor).run()
            seen["unlabelled"] = None
        except T2tedgeError as exc:
            seen["unlabelled"] = str(exc)
        store = base / "unlabelled-store"
        seen["unlabelled_store"] = sorted(p.name for p in store.glob("*")) if store.exists() else []
    leftovers = [str(p) for p in (base / "ray-store").rglob("*") if ".staging-" in p.name or p.name.endswith(".tmp")]
    seen["leftovers"] = leftovers
    emit(seen)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ray-build")
    torch.manual_seed(0)
    model = get_spec("t2t_vit_7").create(num_classes=10, image_size=32)
    checkpoint = root / "t2t_vit_7.pt"
    pre = Preprocess(input_size=32, resize_size=32, interpolation="bilinear")
    save_checkpoint(checkpoint, model, {"model": "t2t_vit_7", "classes": [str(i) for i in range(10)],
                                        "preprocess": pre.to_dict()})  # fmt: skip
    _image_folder(root / "folder")
    local_rows = Builder(load_recipe(_recipe(root, checkpoint, "local-store"))).run()
    validation_key = next(iter(json.loads((Path(local_rows[0].artifact) / "manifest.json").read_text())["validation"]))
    script = f"from test_ray_build import ray_build_scenario; ray_build_scenario({str(root)!r}, {str(checkpoint)!r})"
    ray = run_in_loopback(script, timeout=400)
    local_caches = sorted(p.name for p in (root / "local-store" / ".cache" / "tensors").glob("*.npy"))
    return {"local_files": _files(local_rows), "local_numbers": _numbers(local_rows), "ray": ray,
            "local_caches": local_caches, "validation_key": validation_key}  # fmt: skip


def test_ray_build_gives_the_local_artifacts_byte_for_byte(built: dict[str, Any]) -> None:
    assert set(built["ray"]["files"]) == set(built["local_files"]) and len(built["local_files"]) == 2
    assert built["ray"]["files"] == built["local_files"]
    assert built["ray"]["reused"] == [False, False] and built["ray"]["rerun_reused"] == [True, True]


def test_sharded_validation_gives_the_local_numbers(built: dict[str, Any]) -> None:
    assert built["ray"]["numbers"] == built["local_numbers"]
    assert all(n["images"] == 64 and n["top1"] is not None for n in built["local_numbers"].values())
    assert built["ray"]["shards"] == [{"count": 2, "images": 32, "executor": "ray"}] * 2


def test_a_killed_compile_worker_is_retried_and_leaves_nothing_partial(built: dict[str, Any]) -> None:
    assert built["ray"]["killed_worker"] is not None  # a worker really died mid-compile
    assert built["ray"]["leftovers"] == []


def test_a_resource_no_node_offers_stops_before_any_work(built: dict[str, Any]) -> None:
    refused = built["ray"]["refused"]
    assert refused is not None and "'mac'" in refused and "no node offers" in refused and "\n" not in refused
    assert built["ray"]["refused_store"] == []  # nothing was exported or built


def test_a_node_label_no_node_carries_stops_before_any_work(built: dict[str, Any]) -> None:
    assert built["ray"]["unlabelled"] == (
        "task 'onnxruntime tasks' needs a Ray node labelled t2tedge/pool=mac, which no node is "
        "(nodes carry: t2tedge/pool=a, t2tedge/pool=b)"
    )
    assert built["ray"]["unlabelled_store"] == []


def test_exports_and_the_fp32_reference_run_on_workers_and_the_driver_decodes_no_validation_image(
    built: dict[str, Any],
) -> None:
    assert {"ray::export", "ray::reference", "ray::compile", "ray::validate"} <= set(built["ray"]["titles"])
    validation_cache = f"{built['validation_key']}.u8.npy"
    assert validation_cache in built["local_caches"]  # the local executor decodes the validation set here
    assert validation_cache not in built["ray"]["tensor_caches"]  # on Ray only the workers decoded it
    assert built["ray"]["tensor_caches"]  # (the calibration and parity images are decoded here)


def test_undecodable_files_are_skipped_and_counted_on_workers_as_locally(built: dict[str, Any]) -> None:
    folder = built["ray"]["folder"]
    assert folder["local"]["images"] == 40 and folder["local"]["skipped"] == 1
    assert folder["ray"] == folder["local"]  # the same 40 images, the same numbers
    assert folder["ray_shards"]["count"] == 2  # 41 files in shards of 32
    assert not folder["decoded_by_driver"]
