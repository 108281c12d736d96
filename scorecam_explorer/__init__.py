"""scorecam_explorer: explore Score-CAM explanations of convolutional networks.

Score-CAM (Wang et al., CVPR-W 2020) weighs channel k of a layer by the model's score on the
input masked by that channel's upsampled, min-max normalised activation H_k and combines
``map = ReLU(sum_k w_k A_k)``. The masked forward passes do not depend on the class or on how
scores become weights, so :func:`compute_cache` runs them once and keeps everything in an
``xarray.DataTree``; :func:`scorecam` and the explorer recompose maps from it with no model.

Importing the package imports neither torch nor the widgets: names are loaded on first use,
so a saved cache can be explored where torch is not installed.
"""

from __future__ import annotations

import importlib
from typing import Any

from scorecam_explorer._version import __version__

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # models and pictures
    "DEFAULT_MODEL": "scorecam_explorer.models",
    "LoadedModel": "scorecam_explorer.models",
    "load_model": "scorecam_explorer.models",
    "from_module": "scorecam_explorer.models",
    "LayerLayout": "scorecam_explorer.layouts",
    "TokenLayout": "scorecam_explorer.layouts",
    "available_models": "scorecam_explorer.models",
    "Preprocessing": "scorecam_explorer.preprocessing",
    "load_image": "scorecam_explorer.images",
    "sample_names": "scorecam_explorer.images",
    "predict": "scorecam_explorer.prediction",
    # the engine and its cache
    "compute_cache": "scorecam_explorer.engine",
    "release_copies": "scorecam_explorer.rewriting",
    "save_cache": "scorecam_explorer.cache",
    "load_cache": "scorecam_explorer.cache",
    "check_cache_matches": "scorecam_explorer.cache",
    "MaskSampler": "scorecam_explorer.sampling",
    "ScoreCamSampler": "scorecam_explorer.sampling",
    "SSCamSampler": "scorecam_explorer.sampling",
    "ISCamSampler": "scorecam_explorer.sampling",
    # maps from the cache
    "scorecam": "scorecam_explorer.compose",
    "channel_contributions": "scorecam_explorer.compose",
    "channel_weights": "scorecam_explorer.compose",
    "top_channels_by_weight": "scorecam_explorer.compose",
    "top_channels_by_variance": "scorecam_explorer.compose",
    "PRESETS": "scorecam_explorer.presets",
    # the methods' registry, baselines and evaluation
    "Method": "scorecam_explorer.methods",
    "get_method": "scorecam_explorer.methods",
    "method_keys": "scorecam_explorer.methods",
    "gradcam": "scorecam_explorer.baselines",
    "gradcam_pp": "scorecam_explorer.baselines",
    "evaluate": "scorecam_explorer.evaluation",
    "average_drop_increase": "scorecam_explorer.metrics",
    "deletion": "scorecam_explorer.metrics",
    "insertion": "scorecam_explorer.metrics",
    "deletion_insertion": "scorecam_explorer.metrics",
    "energy_pointing_game": "scorecam_explorer.metrics",
    "topk_fidelity": "scorecam_explorer.metrics",
    "sanity_check": "scorecam_explorer.metrics",
    # many images on a Dask cluster
    "compute_dataset": "scorecam_explorer.distributed",
    "open_dataset": "scorecam_explorer.distributed",
    "select_image": "scorecam_explorer.distributed",
    "channel_examples": "scorecam_explorer.atlas",
    "channel_profile": "scorecam_explorer.atlas",
    "class_channels": "scorecam_explorer.atlas",
    "atlas_tables": "scorecam_explorer.atlas",
    "channel_statistics": "scorecam_explorer.dataset_analysis",
    "dataset_channel_weights": "scorecam_explorer.dataset_analysis",
    "dataset_top_channels": "scorecam_explorer.dataset_analysis",
    "dataset_channel_maps": "scorecam_explorer.dataset_analysis",
    # the explorer
    "Explorer": "scorecam_explorer.explorer",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        compute = _registered_compute(name)
        if compute is None:
            raise AttributeError(f"module 'scorecam_explorer' has no attribute {name!r}")
        return compute  # not kept: the registry may change
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def _registered_compute(name: str) -> Any:
    """The compute function of the registered method whose key or alias is ``name``, if any.

    Every method of :mod:`scorecam_explorer.methods` is thus ``scorecam_explorer.<name>``
    under each of its names that is a Python identifier (``gradcam_pp``, a new ``absgrad``).
    """
    if name.startswith("_") or not name.isidentifier():
        return None
    from scorecam_explorer.errors import UnknownMethodError
    from scorecam_explorer.methods import get_method

    try:
        method = get_method(name)
    except UnknownMethodError:
        return None
    return method.compute if name in method.names else None


def __dir__() -> list[str]:
    return sorted(__all__)
