r"""Score-CAM (Wang et al., CVPR-W 2020): channels weighted by the model's score on masked inputs.

Channel k's activation is upsampled to the input size and min-max normalised to a mask
:math:`H_k \in [0, 1]`; the weight of channel k is the class score on the input masked by it,

.. math::

    w_k^c = \mathrm{softmax}_k\big( f(X \circ H_k)_c - f(X_b)_c \big),
    \qquad L^c = \mathrm{ReLU}\Big(\sum_k w_k^c A_k\Big),

where the baseline :math:`X_b` and the way scores become weights are the preset's
(:mod:`scorecam_explorer.presets`). The masked passes do not depend on the class, so they
run once into a cache (:func:`scorecam_explorer.engine.compute_cache`) and maps are
recomposed from it (:func:`scorecam_explorer.compose.scorecam`); evaluation and the sanity
check use that cache directly, since it also serves the top-k channel fidelity.
"""

from __future__ import annotations

from typing import Any

from scorecam_explorer.methods.registry import Method, register

DEFAULT_BATCH_SIZE = 16


def scorecam_cache(
    model: Any,
    inputs: Any,
    layer: str,
    *,
    preset: str = "paper",
    convention: str | None = None,
    batch_size: int | None = None,
    image_ids: Any = None,
    tune_allocator: bool = True,
    **options: Any,
) -> Any:
    """The cache Score-CAM's maps of ``layer`` come from: ``compute_cache`` with the mask
    ``convention`` (default: the ``preset``'s), no progress bar, on the CPU when the model's
    parameters are there (else the engine's choice of device). ``batch_size`` None lets the
    engine measure it; ``options`` go to ``compute_cache`` as they are (``preprocessing``,
    ``class_names``, ...)."""
    from scorecam_explorer.baselines import device_of, module_of
    from scorecam_explorer.engine import compute_cache
    from scorecam_explorer.presets import get_preset

    return compute_cache(
        model,
        inputs,
        layer,
        convention=convention or get_preset(preset).mask_convention,
        progress=False,
        batch_size=batch_size,
        device="cpu" if device_of(module_of(model)).type == "cpu" else "auto",
        image_ids=image_ids,
        tune_allocator=tune_allocator,
        **options,
    )


def scorecam_maps(
    model: Any,
    inputs: Any,
    layer: str | None = None,
    target: Any = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    preset: str = "paper",
    convention: str | None = None,
    tune_allocator: bool = True,
) -> Any:
    """Score-CAM maps (image, y, x) in [0, 1] from a model: a cache of ``layer``, then ``preset``.

    Arguments as for :func:`scorecam_explorer.baselines.gradcam`; ``convention`` is the mask
    convention (default: the preset's). The map's ``forward_passes`` attribute holds the
    model calls the engine recorded.
    """
    import torch

    from scorecam_explorer.baselines import (
        check_batch_size,
        class_names_of,
        model_inputs,
        module_of,
        resolve_layer,
        targets_from_logits,
    )
    from scorecam_explorer.compose import scorecam

    batch_size = check_batch_size(batch_size)
    batch = model_inputs(model, inputs)
    layer_name = resolve_layer(model, layer, tuple(batch.tensor.shape[2:]))
    cache = scorecam_cache(
        model if hasattr(model, "layout_for") else module_of(model),  # a LoadedModel keeps its layers' layouts
        batch.tensor,
        layer_name,
        preset=preset,
        convention=convention,
        batch_size=batch_size,
        image_ids=batch.image_ids,
        tune_allocator=tune_allocator,
        preprocessing=getattr(model, "preprocessing", None),
        class_names=class_names_of(model),
    )
    logits = torch.from_numpy(cache["logits"].values)
    targets = targets_from_logits(target, logits, class_names_of(model))
    maps = scorecam(cache, layer_name, targets, preset=preset)
    maps.attrs.update({"method": "scorecam", "layer": layer_name, "forward_passes": int(cache.attrs["forward_passes"])})
    return maps


METHOD = register(
    Method(
        key="scorecam",
        label="Score-CAM",
        compute=scorecam_maps,
        needs=frozenset({"masked_passes"}),
        aliases=("score-cam", "score_cam"),
        description="Score-CAM: channels weighted by the class score of the input masked by each channel.",
    ),
    replace=True,
)
