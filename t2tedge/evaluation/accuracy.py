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


def run_batched(runner: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Logits for all images, fed in batches with a progress bar."""
    starts = range(0, len(images), batch_size)
    outs = [runner(images[i : i + batch_size]) for i in track(starts, "validating", total=len(starts))]
    return np.concatenate(outs).astype(np.float32)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Percent of samples whose label is among the k highest logits."""
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float(100.0 * (top == labels[:, None]).any(axis=1).mean())


def agreement(logits: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How closely logits follow the reference: top-1 agreement, abs error, cosine similarity."""
    diff = np.abs(logits - reference)
    cos = (logits * reference).sum(1) / (np.linalg.norm(logits, axis=1) * np.linalg.norm(reference, axis=1) + 1e-12)
    return {
        "top1_agreement": float(100.0 * (logits.argmax(1) == reference.argmax(1)).mean()),
        "logit_abs_err_mean": float(diff.mean()),
        "logit_abs_err_max": float(diff.max()),
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
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
    bad = int((~np.isfinite(logits)).any(axis=1).sum())
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
