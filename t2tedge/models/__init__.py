"""Model registry: T2T-ViT variants and MobileNet baselines behind one ModelSpec."""

from __future__ import annotations

from pathlib import Path

from t2tedge.errors import CheckpointError
from t2tedge.models import mobilenet, t2t_vit  # noqa: F401  (registration side effects)
from t2tedge.models.checkpoint import LoadedModel, load_model, read_checkpoint, save_checkpoint
from t2tedge.models.spec import ModelSpec, PaperFacts, Preprocess, get_spec, graph_form, list_specs

DEMO_WEIGHTS_DIR = Path(__file__).parent / "demo_weights"


def demo_checkpoint(name: str) -> Path:
    """The bundled Fashion-MNIST demo checkpoint of a model (trained by `t2tedge train`)."""
    path = DEMO_WEIGHTS_DIR / f"{name}-fashion_mnist.pt"
    if not path.is_file():
        have = sorted(p.name.split("-")[0] for p in DEMO_WEIGHTS_DIR.glob("*-fashion_mnist.pt"))
        raise CheckpointError(f"no bundled demo weights for {name!r}; bundled: {', '.join(have) or 'none'}")
    return path


def pretrained_checkpoint(spec: ModelSpec) -> Path:
    """The published ImageNet weights of a spec, from the torch hub cache (downloaded when online)."""
    import torch.hub

    if spec.pretrained_url is None:
        raise CheckpointError(f"{spec.name} has no published weights URL; pass a checkpoint file")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(spec.pretrained_url).name
    if not cached.is_file():
        try:
            torch.hub.download_url_to_file(spec.pretrained_url, str(cached), progress=False)
        except Exception as exc:  # noqa: BLE001  (network errors come in many types)
            raise CheckpointError(
                f"{spec.name} weights are not in the torch hub cache ({cached}) and could not be downloaded "
                f"({type(exc).__name__}); download {spec.pretrained_url} there or pass the file"
            ) from None
    return cached


__all__ = [
    "graph_form",
    "DEMO_WEIGHTS_DIR",
    "LoadedModel",
    "ModelSpec",
    "PaperFacts",
    "Preprocess",
    "demo_checkpoint",
    "get_spec",
    "list_specs",
    "load_model",
    "pretrained_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
]
