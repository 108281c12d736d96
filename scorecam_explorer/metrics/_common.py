"""Helpers the metrics share: maps as tensors, class probabilities in batches, correlations."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from scorecam_explorer.baselines import (
    DEFAULT_BATCH_SIZE,
    ModelLike,
    TargetLike,
    check_batch_size,
    class_names_of,
    device_of,
    model_inputs,
    module_of,
    targets_from_logits,
)
from scorecam_explorer.capture import eval_mode
from scorecam_explorer.kernels import pearson  # the one rule (NaN for a constant map), shared with the explorer
from scorecam_explorer.errors import NonFiniteError, ScorecamError
from scorecam_explorer.inputs import InputBatch

MapsLike = Any  # xr.DataArray (image, y, x), np.ndarray or torch.Tensor of shape (N, H, W) or (H, W)


def inputs_with_maps(model: ModelLike, inputs: Any, maps: MapsLike) -> tuple[InputBatch, torch.Tensor]:
    """The inputs as one batch and the maps as float32 (N, H, W) checked against it.

    The batch's image ids are the maps' ``image`` coordinate when they have one.
    """
    ids = None
    if isinstance(maps, xr.DataArray) and "image" in maps.coords:
        ids = [str(v) for v in np.atleast_1d(maps.coords["image"].values)]
    batch = model_inputs(model, inputs, ids)
    return batch, maps_as_tensor(maps, batch)


def maps_as_tensor(maps: MapsLike, batch: InputBatch) -> torch.Tensor:
    """Saliency maps as float32 (N, H, W), checked against the inputs' count and size.

    Raises ScorecamError for a shape that does not match X and NonFiniteError for NaN/inf.
    """
    values = maps.values if isinstance(maps, xr.DataArray) else maps
    tensor = torch.as_tensor(np.asarray(values, dtype=np.float32)) if not isinstance(values, torch.Tensor) else values
    tensor = tensor.detach().float().cpu()
    if tensor.ndim == 2:
        tensor = tensor[None]
    expected = (len(batch), int(batch.tensor.shape[2]), int(batch.tensor.shape[3]))
    if tuple(tensor.shape) != expected:
        raise ScorecamError(
            f"saliency maps of shape {tuple(tensor.shape)} do not match the inputs: expected {expected} "
            "(one map per image at input resolution; compose with resolution='input')"
        )
    if not torch.isfinite(tensor).all():
        raise NonFiniteError("the saliency maps hold NaN or inf values")
    return tensor


def targets_for(model: ModelLike, maps: MapsLike, target: TargetLike, logits: torch.Tensor) -> list[int]:
    """The class of each image: ``target`` if given, else the maps' ``target`` coordinate, else top-1."""
    if target is None and isinstance(maps, xr.DataArray) and "target" in maps.coords:
        target = [int(t) for t in np.atleast_1d(maps.coords["target"].values)]
    return targets_from_logits(target, logits, class_names_of(model))


def batched_probabilities(
    model: ModelLike,
    inputs: Iterator[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, int]:
    """softmax(f(X))_c for a stream of (inputs (B, 3, H, W), classes (B,)) batches.

    Returns the probabilities (concatenated, float32 on the CPU) and the number of images
    forwarded (the forward passes the metric cost).
    """
    module = module_of(model)
    device = device_of(module)
    probabilities, passes = [], 0
    with eval_mode(module), torch.inference_mode():
        for batch, classes in inputs:
            logits = module(batch.to(device)).float()
            if not torch.isfinite(logits).all():
                raise NonFiniteError("the model's output holds NaN or inf values")
            chosen = torch.softmax(logits, dim=1).gather(1, classes.to(device)[:, None].long())[:, 0]
            probabilities.append(chosen.cpu())
            passes += int(batch.shape[0])
    return torch.cat(probabilities), passes


def chunks(tensor: torch.Tensor, classes: list[int], batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, classes) in batches of ``batch_size``."""
    batch_size = check_batch_size(batch_size)
    labels = torch.as_tensor(classes, dtype=torch.long)
    for start in range(0, tensor.shape[0], batch_size):
        yield tensor[start : start + batch_size], labels[start : start + batch_size]


def logits_of(module: nn.Module, inputs: torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """f(X) (N, K) without gradients, batched."""
    from scorecam_explorer.baselines import forward_in_batches

    return forward_in_batches(module, inputs, batch_size)


def rank_data(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties given their average rank (as scipy.stats.rankdata)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # boundaries of runs of equal values
    starts = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    run_id = np.cumsum(starts) - 1
    run_first = np.flatnonzero(starts)
    run_last = np.r_[run_first[1:], values.size] - 1
    average_rank = (run_first + run_last) / 2.0 + 1.0
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = average_rank[run_id]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation: Pearson r of the (average-tie) ranks; NaN when one is constant."""
    return pearson(rank_data(a), rank_data(b))


def protocol_attrs(protocol: dict[str, Any]) -> dict[str, str]:
    """The protocol as one JSON-string attribute (xarray attributes must stay serialisable)."""
    return {"protocol": json.dumps(protocol, sort_keys=True)}
