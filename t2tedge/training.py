"""Train or fine-tune any zoo model on an image dataset (CPU-friendly; meant for small datasets).

This is how the bundled demo models are made: `t2tedge train t2t_vit_7 --dataset fashion_mnist`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

import t2tedge
from t2tedge.data.datasets import ImageDataset
from t2tedge.data.transforms import build_eval_transform, to_rgb
from t2tedge.evaluation.accuracy import topk_accuracy
from t2tedge.models import ModelSpec, load_model, save_checkpoint
from t2tedge.models.spec import Preprocess
from t2tedge.pipeline.store import write_json
from t2tedge.progress import console, log


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    image_size: int | None = None
    crop_pct: float | None = None
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.3
    label_smoothing: float = 0.1
    seed: int = 0
    threads: int | None = None
    augment: bool = True


class _Images(Dataset):
    def __init__(self, dataset: ImageDataset, transform: Any) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset.load(index)
        return self.transform(image), label


def train_transform(pre: Preprocess, augment: bool = True) -> Any:
    """Light augmentation that suits small images (shift by padding + crop, horizontal flip), or none.

    Short from-scratch schedules converge faster without it; longer ones generalise better with it.
    """
    if not augment:
        return build_eval_transform(pre)
    return v2.Compose(
        [
            v2.Lambda(to_rgb),
            v2.PILToTensor(),
            v2.Resize(pre.resize_size, interpolation=v2.InterpolationMode(pre.interpolation), antialias=True),
            v2.RandomCrop(pre.input_size, padding=max(1, pre.input_size // 16), padding_mode="edge"),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(pre.mean), list(pre.std)),
        ]
    )


def evaluate_torch(model: nn.Module, dataset: ImageDataset, pre: Preprocess, batch_size: int = 256) -> float:
    """Top-1 (%) of a PyTorch model on a labelled dataset through its eval transform."""
    loader = DataLoader(_Images(dataset, build_eval_transform(pre)), batch_size=batch_size)
    logits, labels = [], []
    model.eval()
    with torch.inference_mode():
        for images, target in loader:
            logits.append(model(images).numpy())
            labels.append(target.numpy())
    return topk_accuracy(np.concatenate(logits), np.concatenate(labels), 1)


def train(
    spec: ModelSpec,
    train_set: ImageDataset,
    test_set: ImageDataset,
    out: Path,
    cfg: TrainConfig,
    init_checkpoint: Path | None = None,
) -> dict[str, Any]:
    """Train, evaluate on the held-out split, save the checkpoint and a JSON record beside it."""
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    num_classes = len(train_set.classes)
    if init_checkpoint is None:
        size = cfg.image_size or spec.preprocess.input_size
        model = spec.create(num_classes=num_classes, image_size=size)
        pre = spec.preprocess.at_size(size) if size != spec.preprocess.input_size else spec.preprocess
    else:
        loaded = load_model(spec, init_checkpoint, image_size=cfg.image_size)
        model, pre = loaded.model, loaded.preprocess
        if loaded.num_classes != num_classes:
            # Fine-tuning onto other classes: keep every weight whose shape fits, fresh classifier.
            fresh = spec.create(num_classes=num_classes, image_size=loaded.image_size)
            fitting = {k: v for k, v in model.state_dict().items() if fresh.state_dict()[k].shape == v.shape}
            fresh.load_state_dict(fitting, strict=False)
            model = fresh
    if cfg.crop_pct is not None:
        pre = replace(pre, resize_size=math.floor(pre.input_size / cfg.crop_pct))

    loader = DataLoader(
        _Images(train_set, train_transform(pre, cfg.augment)),
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    steps = cfg.epochs * len(loader)
    warmup = max(1, int(cfg.warmup_epochs * len(loader)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))),
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    started = time.perf_counter()
    seen = 0
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task(f"training {spec.name}", total=steps, loss=float("nan"))
        for epoch in range(cfg.epochs):
            model.train()
            epoch_loss, epoch_started = 0.0, time.perf_counter()
            for images, labels in loader:
                loss = loss_fn(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                seen += len(images)
                epoch_loss += loss.item()
                progress.update(task, advance=1, loss=loss.item(), description=f"{spec.name} epoch {epoch + 1}")
            rate = len(loader) * cfg.batch_size / (time.perf_counter() - epoch_started)
            mean_loss = epoch_loss / len(loader)
            log(f"{spec.name} epoch {epoch + 1}/{cfg.epochs}: mean loss {mean_loss:.3f}, {rate:.0f} img/s")
    train_seconds = time.perf_counter() - started
    top1 = evaluate_torch(model, test_set, pre)

    meta = {
        "model": spec.name,
        "classes": list(train_set.classes),
        "num_classes": num_classes,
        "image_size": pre.input_size,
        "preprocess": pre.to_dict(),
        "top1": round(top1, 2),
    }
    record = {
        **meta,
        "dataset": getattr(train_set, "name", type(train_set).__name__),
        "train_images": len(train_set),
        "test_images": len(test_set),
        "epochs": cfg.epochs,
        "config": cfg.__dict__,
        "train_seconds": round(train_seconds, 1),
        "train_images_per_second": round(seen / train_seconds, 1),
        "init_checkpoint": str(init_checkpoint) if init_checkpoint else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "t2tedge": t2tedge.__version__,
    }
    save_checkpoint(out, model.eval(), meta)
    write_json(out.with_suffix(".json"), record)
    return record
