"""ImageNet-shaped data path: listing, streaming validation and Ray fan-out on a 50k-file folder.

    python benchmarks/imagenet_scale.py [--classes 1000] [--per-class 50] [--ray-images 50000] [--keep DIR]

1. Writes an ImageNet-layout folder: ``--classes`` class folders (``n00000000``...) with ``--per-class``
   JPEGs each (50k files by default; 64x64 images made from the bundled Fashion-MNIST training images),
   and a disjoint 1000-image calibration folder.
2. Listing: ``ImageFolderDataset`` plus its listing hash, in a fresh process, cold (page cache dropped
   where we are root, listing cache empty) and cached.
3. One artifact (MobileNetV3-Small, random weights, 1000 classes, ONNX Runtime fp32, 224 px) validated on
   the whole folder by ``t2tedge validate`` in a child process (local executor): the first run decodes
   every image into the tensor cache, the second streams from it; images/s and the child's peak RSS.
4. The same validation with ``--executor ray`` on a loopback-only Ray cluster (a fresh network
   namespace; a CPU-less head and 1 or 2 worker nodes of 1 CPU), on ``--ray-images`` images (and the
   local executor on the same images for the comparison): the shards carry the JPEGs and the workers
   decode them; images/s, and that top-1/top-5 equal the local executor's.
Results go to ``benchmarks/results/imagenet_scale.json`` with the host.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the tests' loopback Ray harness

PYTHON = sys.executable
T2TEDGE = [PYTHON, "-m", "t2tedge.cli"]


def write_folder(root: Path, classes: int, per_class: int, offset: int) -> int:
    import numpy as np
    from PIL import Image

    from t2tedge.data.datasets import open_dataset

    images = open_dataset("fashion_mnist:train").images
    count = 0
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            pixels = images[(offset + c * per_class + j) % len(images)]
            if offset:
                pixels = np.ascontiguousarray(pixels.T)  # calibration images differ from validation ones
            buffer = io.BytesIO()
            Image.fromarray(pixels).convert("RGB").resize((64, 64)).save(buffer, "JPEG", quality=85)
            (folder / f"img_{c * per_class + j:08d}.JPEG").write_bytes(buffer.getvalue())
            count += 1
    return count


LISTING = """
import json, sys, time
from t2tedge.data.datasets import ImageFolderDataset
started = time.perf_counter()
dataset = ImageFolderDataset(sys.argv[1])
listed = time.perf_counter()
dataset.listing_hash()
done = time.perf_counter()
print(json.dumps({"files": len(dataset), "cached": dataset.listing_cached,
                  "list_s": listed - started, "hash_s": done - listed, "total_s": done - started}))
"""


def listing(root: Path, env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([PYTHON, "-c", LISTING, str(root)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def child(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``command``; its wall time, peak RSS (wait4) and stdout."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command[:4])}... failed:\n{stderr[-3000:]}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "stdout": stdout}


RAY_VALIDATE = """
import json, sys, time
import psutil
from ray_harness import loopback_cluster
from t2tedge.pipeline.executors import RayExecutor
from t2tedge.pipeline.validate import validate_artifact

def role(process):
    line = " ".join(process.cmdline())
    if process.pid == driver.pid:
        return "driver"
    for name, marks in (("workers", ("ray::",)), ("raylets", ("raylet",)), ("gcs", ("gcs_server",)),
                        ("agents", ("agent", "dashboard", "log_monitor", "monitor.py"))):
        if any(mark in line for mark in marks):
            return name
    return "other"

def cpu_seconds():
    out = {}
    for process in [driver, *driver.children(recursive=True)]:
        try:
            times = process.cpu_times()
            out[process.pid] = (role(process), times.user + times.system)
        except psutil.Error:
            continue
    return out

driver = psutil.Process()
artifact, data, limit, nodes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
started = time.perf_counter()
with loopback_cluster([{}] * nodes) as cluster:
    up = time.perf_counter() - started
    with RayExecutor(address=cluster.address) as executor:
        import ray
        addresses = sorted({n["NodeManagerAddress"] for n in ray.nodes()})
        before = cpu_seconds()
        begin = time.perf_counter()
        result = validate_artifact(artifact, data, limit, 1, executor)
        seconds = time.perf_counter() - begin
        after = cpu_seconds()
cpu = {}
for pid, (name, spent) in after.items():
    cpu[name] = cpu.get(name, 0.0) + spent - before.get(pid, (name, 0.0))[1]
cpu = {name: round(spent, 1) for name, spent in sorted(cpu.items())}
print(json.dumps({"nodes": nodes, "cluster_up_s": up, "seconds": seconds, "node_addresses": addresses,
                  "top1": result["top1"], "top5": result["top5"], "images": result["images"],
                  "shards": result.get("shards"), "cpu_seconds_by_role": cpu,
                  "cores_busy": round(sum(cpu.values()) / seconds, 2)}))
"""

LOCAL_VALIDATE = """
import json, sys, time
from t2tedge.pipeline.validate import validate_artifact
artifact, data, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
begin = time.perf_counter()
result = validate_artifact(artifact, data, limit, None)
print(json.dumps({"seconds": time.perf_counter() - begin, "top1": result["top1"], "top5": result["top5"],
                  "images": result["images"]}))
"""


def ray_validate(artifact: Path, data: Path, limit: int, nodes: int, env: dict[str, str]) -> dict[str, Any]:
    ray_tmp = tempfile.mkdtemp(prefix="ray")
    ray_env = {k: v for k, v in env.items() if not k.startswith("RAY_")}
    ray_env.update(PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=ray_tmp)
    command = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" -c "$1" "$2" "$3" "$4" "$5"']
    command += [PYTHON, RAY_VALIDATE, str(artifact), str(data), str(limit), str(nodes)]
    run = child(command, ray_env)
    return {**json.loads(run["stdout"].strip().splitlines()[-1]), "driver_peak_rss_mb": run["peak_rss_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--ray-images", type=int, default=50000, help="images validated on Ray (and locally too)")
    parser.add_argument("--keep", type=Path, help="write the folders here and keep them (default: a temp dir)")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "imagenet_scale.json")
    args = parser.parse_args()

    from t2tedge.evaluation.host import host_fingerprint, host_info

    started = time.perf_counter()
    work = Path(args.keep or tempfile.mkdtemp(prefix="imagenet-scale-"))
    val, calib = work / "val", work / "calib"
    t0 = time.perf_counter()
    files = write_folder(val, args.classes, args.per_class, 0)
    write_folder(calib, 1000, 1, 7)
    generate_s = time.perf_counter() - t0
    time.sleep(2.5)  # folders changed within 2 s of a scan are never cached (the racy-mtime rule)
    env = {**os.environ, "T2TEDGE_LISTING_CACHE": str(work / "listing-cache"), "XDG_CACHE_HOME": str(work / "xdg")}

    dropped = drop_page_cache()
    cold = listing(val, env)
    cached = listing(val, env)

    recipe = work / "recipe.yaml"
    recipe.write_text(
        json.dumps(
            {
                "name": "scale",
                "output_dir": str(work / "artifacts"),
                "models": [{"name": "mobilenet_v3_small", "weights": "random"}],
                "targets": ["onnxruntime"],
                "precisions": ["fp32"],
                "data": {"validation": str(val), "calibration": str(calib), "limit": 64},
                "benchmark": {"enabled": False},
            }
        )
    )
    child([*T2TEDGE, "build", str(recipe), "--no-report"], env)
    artifact = next((work / "artifacts" / "mobilenet_v3_small" / "onnxruntime").glob("fp32-*"))

    first = child([*T2TEDGE, "validate", str(artifact), "--data", str(val)], env)
    second = child([*T2TEDGE, "validate", str(artifact), "--data", str(val)], env)
    manifest = json.loads((artifact / "manifest.json").read_text())
    record = next(v for v in manifest["validation"].values() if v.get("images") == files)

    limit = min(args.ray_images, files)
    local_part = child([PYTHON, "-c", LOCAL_VALIDATE, str(artifact), str(val), str(limit)], env)
    local = {**json.loads(local_part["stdout"].strip().splitlines()[-1]), "peak_rss_mb": local_part["peak_rss_mb"]}
    ray = {f"{n}_nodes": ray_validate(artifact, val, limit, n, env) for n in (1, 2)}
    for run in (local, *ray.values()):
        run["images_per_s"] = run["images"] / run["seconds"]
    speedup = ray["1_nodes"]["seconds"] / ray["2_nodes"]["seconds"]
    equal = all((r["top1"], r["top5"]) == (local["top1"], local["top5"]) for r in ray.values())

    result = {
        "benchmark": "imagenet_scale",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "folder": {
            "classes": args.classes,
            "per_class": args.per_class,
            "files": files,
            "images": "64x64 JPEG (quality 85) from Fashion-MNIST training images",
            "generate_s": round(generate_s, 1),
        },  # fmt: skip
        "listing": {"page_cache_dropped": dropped, "cold": cold, "cached": cached},
        "validation_local": {
            "artifact": "mobilenet_v3_small (random weights, 1000 classes), onnxruntime fp32, 224 px, all cores",
            "images": files,
            "first_run_decode_and_infer": {
                **{k: v for k, v in first.items() if k != "stdout"},
                "images_per_s": files / first["seconds"],
            },
            "second_run_from_tensor_cache": {
                **{k: v for k, v in second.items() if k != "stdout"},
                "images_per_s": files / second["seconds"],
            },
            "top1": record["top1"],
            "note": "wall time of the whole t2tedge validate process (start-up included); peak RSS by wait4",
        },  # fmt: skip
        "validation_ray": {
            "images": limit,
            "threads_per_task": 1,
            "local_executor_same_images": local,
            **ray,
            "speedup_2_vs_1_nodes": round(speedup, 3),
            "results_equal_local": equal,
            "note": (
                "shards carry the JPEG bytes and the workers decode them (nothing is decoded on the driver); "
                "time from listing the selection to the merged result"
            ),
        },
        "targets": {
            "listing_cold_max_s": 5.0,
            "listing_cached_max_s": 1.0,
            "peak_rss_max_mb": 1536,
            "ray_speedup_min": 1.6,
            "listing_met": cold["total_s"] <= 5.0 and cached["total_s"] <= 1.0,
            "rss_met": max(first["peak_rss_mb"], second["peak_rss_mb"]) <= 1536,
            "ray_met": speedup >= 1.6 and equal,
        },
        "host": {**host_info(), "fingerprint": host_fingerprint(), "loadavg_end": os.getloadavg()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result["targets"]))
    print(f"wrote {args.output}")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
