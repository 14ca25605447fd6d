"""Accuracy validation of any runner: top-1/top-5 and agreement with the FP32 PyTorch reference.

Every number carries a label: `measured` (the real runtime ran it), `emulated` (a stand-in ran the same
graph or math) or `unavailable` (with the reason).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from t2tedge.progress import track

MEASURED, EMULATED, UNAVAILABLE = "measured", "emulated", "unavailable"
# An accuracy whose logits held NaN or Inf: a failure with its reason, never a top-1.
FAILED = "failed"


# rows per step of the metrics: 50k x 1000 logits would otherwise make int64 temporaries of 400 MB
CHUNK_ROWS = 4096


def run_batched(runner: Callable[[np.ndarray], np.ndarray], images: Any, batch_size: int = 32) -> np.ndarray:
    """Logits for all images (an array or a streamed ``PixelSet``), fed in batches with a progress bar,
    written into one preallocated array (its only copy)."""
    out: np.ndarray | None = None
    starts = range(0, len(images), batch_size)
    for start in track(starts, "validating", total=len(starts)):
        logits = np.asarray(runner(images[start : start + batch_size]), dtype=np.float32)
        if out is None:
            out = np.empty((len(images), *logits.shape[1:]), dtype=np.float32)
        out[start : start + len(logits)] = logits
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def _chunks(n: int) -> range:
    return range(0, n, CHUNK_ROWS)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Percent of samples whose label is among the k highest logits."""
    k = min(k, logits.shape[1])
    hits = 0
    for i in _chunks(len(logits)):
        top = np.argpartition(-logits[i : i + CHUNK_ROWS], k - 1, axis=1)[:, :k]
        hits += int((top == labels[i : i + CHUNK_ROWS, None]).any(axis=1).sum())
    return float(100.0 * hits / len(logits)) if len(logits) else float("nan")


def agreement(logits: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How closely logits follow the reference: top-1 agreement, abs error, cosine similarity."""
    same = err_sum = 0.0
    err_max, cos_sum, cos_min = 0.0, 0.0, np.inf
    for i in _chunks(len(logits)):
        a, b = logits[i : i + CHUNK_ROWS], reference[i : i + CHUNK_ROWS]
        diff = np.abs(a - b)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        same += float((a.argmax(1) == b.argmax(1)).sum())
        err_sum += float(diff.sum(dtype=np.float64))
        err_max = max(err_max, float(diff.max()))
        cos_sum += float(cos.sum(dtype=np.float64))
        cos_min = min(cos_min, float(cos.min()))
    n = len(logits)
    return {
        "top1_agreement": float(100.0 * same / n),
        "logit_abs_err_mean": err_sum / logits.size,
        "logit_abs_err_max": err_max,
        "cosine_mean": cos_sum / n,
        "cosine_min": cos_min,
    }


def accuracy_report(
    logits: np.ndarray,
    labels: np.ndarray,
    label: str,
    reference: np.ndarray | None = None,
    note: str = "",
) -> dict[str, Any]:
    """Top-1/top-5 (and agreement with the reference when given), labelled with how it was obtained.

    Non-finite logits make the record a failure (``status: failed`` with the reason) instead: NaN sorts
    unpredictably, so any top-1 computed from them would be a plausible-looking accident.
    """
    bad = sum(int((~np.isfinite(logits[i : i + CHUNK_ROWS])).any(axis=1).sum()) for i in _chunks(len(logits)))
    if bad:
        failure: dict[str, Any] = {
            "label": label,
            "status": FAILED,
            "images": int(len(labels)),
            "nonfinite_images": bad,
            "reason": f"non-finite logits (NaN/Inf) for {bad} of {len(labels)} images",
        }
        if note:
            failure["note"] = note
        return failure
    report: dict[str, Any] = {
        "label": label,
        "images": int(len(labels)),
        "top1": topk_accuracy(logits, labels, 1),
        "top5": topk_accuracy(logits, labels, 5),
    }
    if note:
        report["note"] = note
    if reference is not None:
        report["vs_fp32_torch"] = agreement(logits, reference)
    return report


def failed(record: dict[str, Any]) -> bool:
    """Whether an accuracy record is a failure (non-finite outputs)."""
    return record.get("status") == FAILED


def unavailable(reason: str) -> dict[str, Any]:
    """The record of an accuracy that could not be obtained on this host."""
    return {"label": UNAVAILABLE, "reason": reason}
