"""Counted (not quoted) model facts: parameters and MACs."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """All parameters, frozen ones included (T2T-ViT's sinusoid table and performer features),
    which is how the paper counts them."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, image_size: int, batch: int = 1) -> int:
    """Multiply-accumulates of one forward pass, counted by torch's FLOP counter (MACs = FLOPs / 2)."""
    x = torch.zeros(batch, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(x)
    return counter.get_total_flops() // 2
