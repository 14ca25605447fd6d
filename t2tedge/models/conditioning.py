"""Random-weight models that behave like trained ones, for latency benchmarks and quantization tests."""

from __future__ import annotations

import numpy as np
import torch


def well_conditioned(model: torch.nn.Module, images: np.ndarray) -> torch.nn.Module:
    """Give a randomly initialised CNN trained-like activations, so output agreement means something.

    Untouched, a random MobileNet shrinks its activations to ~1e-9 (int8 then outputs zeros); with
    BatchNorm statistics re-estimated on real images it is chaotic instead (any 1 % perturbation
    decorrelates the logits). Damping the residual branches (as zero-init-residual training starts out)
    gives a stable, non-trivial network. Latency is unaffected; models without BatchNorm are returned as is.
    """
    if not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        return model
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(images))
        for module in model.modules():
            if getattr(module, "use_res_connect", False):  # torchvision InvertedResidual (V2: conv, V3: block)
                branch = module.conv if hasattr(module, "conv") else module.block
                norms = [m for m in branch.modules() if isinstance(m, torch.nn.BatchNorm2d)]
                norms[-1].weight.mul_(0.3)  # the branch's last BatchNorm
    return model.eval()
