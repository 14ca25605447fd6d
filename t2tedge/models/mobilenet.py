"""MobileNet baselines from torchvision, behind the same ModelSpec as T2T-ViT.

Preprocessing and paper facts are read from torchvision's own weights enums, so nobody re-types them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torchvision
from torch import nn
from torchvision.models import (
    MobileNet_V2_Weights,
    MobileNet_V3_Large_Weights,
    MobileNet_V3_Small_Weights,
    WeightsEnum,
)

from t2tedge.models.spec import ModelSpec, PaperFacts, Preprocess, QuantizationHints, register


def _preprocess_of(weights: WeightsEnum) -> Preprocess:
    kwargs = weights.transforms.keywords
    crop = int(kwargs["crop_size"])
    return Preprocess(input_size=crop, resize_size=int(kwargs.get("resize_size", 256)), interpolation="bilinear")


def _paper_of(weights: WeightsEnum) -> PaperFacts:
    meta = weights.meta
    return PaperFacts(
        params_m=round(meta["num_params"] / 1e6, 2),
        macs_g=float(meta["_ops"]),
        top1=float(meta["_metrics"]["ImageNet-1K"]["acc@1"]),
        source=f"torchvision {weights}",
    )


def _builder(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def build(num_classes: int = 1000, image_size: int = 224, **kwargs: Any) -> nn.Module:
        # CNNs take any input size; image_size only matters for export shapes.
        return factory(weights=None, num_classes=num_classes, **kwargs)

    return build


# the layer groups `t2tedge tune` places as one choice each: the stem convolution and the classifier
HINTS = QuantizationHints(
    groups=(("first layer", ("features.0", "features.0.*")), ("head", ("classifier", "classifier.*")))
)


def _register(name: str, factory: Callable[..., nn.Module], weights: WeightsEnum, classifier_key: str) -> None:
    register(
        ModelSpec(
            name=name,
            family="mobilenet",
            builder=_builder(factory),
            preprocess=_preprocess_of(weights),
            paper=_paper_of(weights),
            classifier_key=classifier_key,
            pretrained_url=weights.url,
            quantization=HINTS,
        )
    )


_register("mobilenet_v2", torchvision.models.mobilenet_v2, MobileNet_V2_Weights.IMAGENET1K_V1, "classifier.1.weight")
_register(
    "mobilenet_v3_large",
    torchvision.models.mobilenet_v3_large,
    MobileNet_V3_Large_Weights.IMAGENET1K_V1,
    "classifier.3.weight",
)
_register(
    "mobilenet_v3_small",
    torchvision.models.mobilenet_v3_small,
    MobileNet_V3_Small_Weights.IMAGENET1K_V1,
    "classifier.3.weight",
)
