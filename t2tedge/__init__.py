"""t2tedge: compile T2T-ViT and MobileNet baselines for edge targets and compare them honestly.

``import t2tedge`` registers the T2T-ViT variants with timm (``timm.create_model("t2t_vit_14")``) without
importing torch itself: if timm is already imported they are registered now, otherwise the moment timm is.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

__version__ = "0.1.0"


def _register_with_timm() -> None:
    import t2tedge.models.t2t_vit  # noqa: F401  (registers the entrypoints with timm)


class _AfterTimmImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``timm`` the usual way and, once it has loaded, registers the T2T-ViT entrypoints with it."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201  (the finder protocol)
        if name != "timm":
            return None
        sys.meta_path.remove(self)  # one use; also keeps the real lookup below from finding us again
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):  # noqa: ANN001, ANN201
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001
        # timm keeps its own loader (resources, reloads); we only run after it
        module.__loader__ = module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _register_with_timm()


if "timm" in sys.modules:
    _register_with_timm()
elif not any(isinstance(finder, _AfterTimmImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _AfterTimmImport())
