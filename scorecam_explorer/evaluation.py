"""Evaluate Score-CAM and the gradient baselines with the paper's metrics over a set of images.

:func:`evaluate` computes, for every method of the registry (:mod:`scorecam_explorer.methods`:
``scorecam``, ``gradcam``, ``gradcam++`` and any method registered since) and image, the map
of the image's class (top-1 unless given) at one layer, and then

* Average Drop % / Increase in Confidence % (:mod:`scorecam_explorer.metrics.confidence`),
* Deletion / Insertion AUC (:mod:`scorecam_explorer.metrics.causal`),
* the energy-based pointing game when bounding boxes are given
  (:mod:`scorecam_explorer.metrics.localisation`),
* Score-CAM's top-k channel fidelity (:mod:`scorecam_explorer.metrics.fidelity`),
* optionally the cascading randomisation sanity check (:mod:`scorecam_explorer.metrics.sanity`).

The result holds every per-image value, the means (the table of Wang et al. 2020), the cost
(seconds, forward passes) and the protocol (model, weights, layer, preprocessing, fractions,
steps, blur, substrates) without which the numbers cannot be compared.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from scorecam_explorer.errors import BoxError, ImageLoadError, ScorecamError, UnknownMethodError
from scorecam_explorer.methods import LabelView, get_method, method_keys

METHOD_LABELS: Mapping[str, str] = LabelView()
"""A live view of the registry (:mod:`scorecam_explorer.methods`): method key -> label."""
SCHEMA = "scorecam_explorer.evaluation/1"

# (key in the summary, column title, which way is better)
COLUMNS = (
    ("average_drop", "Avg Drop %", "lower"),
    ("average_increase", "Avg Increase %", "higher"),
    ("deletion", "Deletion AUC", "lower"),
    ("insertion", "Insertion AUC", "higher"),
    ("energy_pointing", "Energy pointing", "higher"),
)


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # the registered method keys, read when asked (methods may be added)
        return method_keys()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_methods(methods: str | Sequence[str] | None) -> list[str]:
    """Method keys for names (a list or one comma-separated string; keys or aliases, any case),
    checked against the registry, without repeats; None: every registered method."""
    if methods is None:
        return list(method_keys())
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else [str(m).strip() for m in methods]
    names = [m for m in names if m]
    if not names:
        raise UnknownMethodError(f"no method given; choose from {', '.join(method_keys())}")
    checked: list[str] = []
    for name in names:
        canonical = get_method(name).key
        if canonical not in checked:
            checked.append(canonical)
    return checked


def check_settings(
    *,
    methods: str | Sequence[str] | None = None,
    keep_fraction: float = 0.5,
    space: str = "input",
    step_fraction: float = 0.01,
    blur_kernel: int = 11,
    blur_sigma: float = 5.0,
    preset: str = "paper",
    convention: str | None = None,
    sanity_depth: int = 1,
    batch_size: int = 16,
    family: str | None = None,
    samples: int | None = None,
    std: float | None = None,
    seed: int | None = None,
    sanity: bool = False,
) -> list[str]:
    """Check the settings of :func:`evaluate` without touching a model or an image.

    Uses the metrics' own checks: 0 < keep_fraction <= 1, ``space`` one of ``SPACES``,
    0 < step_fraction <= 1, an odd blur kernel length >= 1 and sigma > 0, sanity_depth >= 1,
    a positive batch size, and (when a method that needs masked passes, Score-CAM, is
    evaluated) a known preset and mask convention, the Score-CAM family member (``family``,
    ``samples``, ``std``, ``seed``, as for ``compute_cache``) and that the preset applies to
    it (``official`` needs one sample per channel), and no sanity check with SS-CAM or
    IS-CAM (it runs Score-CAM itself). Returns the checked method keys
    (:func:`check_methods`; ``methods=None``: every registered method); raises
    ScorecamError (UnknownMethodError for a method) for the first bad setting.
    """
    from scorecam_explorer.baselines import check_batch_size
    from scorecam_explorer.metrics.causal import check_blur, check_step_fraction
    from scorecam_explorer.metrics.confidence import check_keep_fraction, check_space
    from scorecam_explorer.metrics.sanity import check_depth

    chosen = check_methods(methods)
    check_keep_fraction(keep_fraction)
    check_space(space)
    check_step_fraction(step_fraction)
    check_blur(blur_kernel, blur_sigma)
    check_depth(sanity_depth, "sanity_depth")
    check_batch_size(batch_size)
    if any(needs_masked_passes(method) for method in chosen):
        from scorecam_explorer.conventions import get_convention
        from scorecam_explorer.presets import get_preset

        get_convention(convention if convention is not None else get_preset(preset).mask_convention)
        family_fields(preset, family, samples, std, seed, sanity=sanity)
    elif family is not None or samples is not None or std is not None or seed is not None:
        family_fields(preset, family, samples, std, seed, sanity=sanity)  # checked all the same
    return chosen


def family_fields(
    preset: str,
    family: str | None,
    samples: int | None,
    std: float | None,
    seed: int | None,
    *,
    sanity: bool = False,
) -> dict[str, Any]:
    """The recorded fields of the mask sampler Score-CAM's cache is computed with (Score-CAM's
    for ``family=None``), after checking that ``preset`` applies to it; ScorecamError otherwise."""
    from scorecam_explorer.presets import check_preset_applies, get_preset
    from scorecam_explorer.sampling import resolve_sampler

    fields = resolve_sampler(None, family=family, samples=samples, std=std, seed=seed).describe()
    check_preset_applies(get_preset(preset), fields)
    if sanity and fields.get("name") != "scorecam":
        raise ScorecamError(
            "the sanity check runs Score-CAM itself (one masked input per channel), not "
            f"{fields.get('name')}; evaluate the family member without sanity=True (CLI: --sanity), "
            "or run the sanity check with family='score-cam'."
        )
    return fields


def method_label(method: str) -> str:
    """The method's label (its key when it is no longer registered)."""
    try:
        return get_method(method).label
    except UnknownMethodError:
        return method


def needs_masked_passes(method: str) -> bool:
    """Whether the method's maps come from a Score-CAM cache (masked forward passes)."""
    return "masked_passes" in get_method(method).needs


# ---- images ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSet:
    """The pictures that loaded (PIL images) with their ids and file names, and those skipped."""

    ids: list[str]
    pictures: list[Any]
    file_names: dict[str, str]
    skipped: list[str]


def collect_images(images: str | os.PathLike[str] | Sequence[Any], max_images: int | None = None) -> ImageSet:
    """Load ``images``: a folder, ``"samples"`` (the bundled photos) or a list of sources.

    Unreadable files are skipped with one warning that lists them all. Raises ImageLoadError
    when the folder does not exist, holds no image files, or none of them can be read.
    """
    from scorecam_explorer.images import find_images, image_id, load_image, sample_names, sample_path
    from scorecam_explorer.inputs import unique_ids

    if max_images is not None and (isinstance(max_images, bool) or int(max_images) < 1):
        raise ScorecamError(f"max_images must be a positive integer, got {max_images!r}")
    if isinstance(images, (str, os.PathLike)) and str(images) == "samples":
        sources: list[Any] = [f"sample:{name}" for name in sample_names()]
    elif isinstance(images, (str, os.PathLike)) and not str(images).startswith("sample:"):
        folder = Path(images)
        if not folder.is_dir():
            raise ImageLoadError(f"image folder not found: {folder} (give a folder of pictures or 'samples')")
        sources = list(find_images(folder))
        if not sources:
            raise ImageLoadError(
                f"no image files in {folder} (looked for .jpg, .jpeg, .png, .bmp, .gif, .tif, .tiff, .webp)"
            )
    else:
        sources = [images] if isinstance(images, (str, os.PathLike)) else list(images)
        if not sources:
            raise ImageLoadError("no images given")
    if max_images is not None:
        sources = sources[: int(max_images)]
    raw_ids, pictures, file_names, skipped = [], [], [], []
    for index, source in enumerate(sources):
        try:
            picture = load_image(source)
        except ImageLoadError as error:
            skipped.append(str(error))
            continue
        raw_ids.append(image_id(source, index))
        pictures.append(picture)
        if isinstance(source, str) and source.startswith("sample:"):
            file_names.append(sample_path(source[len("sample:"):]).name)
        else:
            file_names.append(Path(source).name if isinstance(source, (str, Path)) else raw_ids[-1])
    ids = unique_ids(raw_ids)
    names = dict(zip(ids, file_names))
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s): " + "; ".join(skipped), stacklevel=2)
    if not pictures:
        raise ImageLoadError("none of the images could be read: " + "; ".join(skipped))
    return ImageSet(ids, pictures, names, skipped)


def boxes_for(images: ImageSet, boxes: Mapping[str, Any] | None) -> dict[str, Any]:
    """The boxes of the evaluated images, matched by image id or file name.

    Raises BoxError when boxes are given but none matches an image; keys that match no
    evaluated image are reported in a warning.
    """
    if not boxes:
        return {}
    if not isinstance(boxes, Mapping):
        raise BoxError("boxes must map an image file name to [x0, y0, x1, y1] (or a list of such boxes)")
    chosen: dict[str, Any] = {}
    used: set[str] = set()
    for identifier in images.ids:
        for key in (identifier, images.file_names.get(identifier, "")):
            if key in boxes:
                chosen[identifier] = boxes[key]
                used.add(key)
                break
    unused = [str(key) for key in boxes if key not in used]
    if not chosen:
        raise BoxError(
            f"none of the boxes' names ({', '.join(unused[:5])}{'...' if len(unused) > 5 else ''}) is an evaluated "
            f"image ({', '.join(images.file_names.get(i, i) for i in images.ids[:5])}...)"
        )
    if unused:
        warnings.warn(f"boxes for {len(unused)} image(s) not evaluated: {', '.join(unused)}", stacklevel=2)
    return chosen


def load_boxes(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a boxes file: JSON ``{image file name: [x0, y0, x1, y1] or [[...], ...]}`` in input pixels."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BoxError(f"boxes file not found: {path}") from None
    except (OSError, ValueError) as error:
        raise BoxError(f"could not read boxes file {path}: {error}") from None
    if not isinstance(data, dict):
        raise BoxError(f"{path}: expected a JSON object {{image file name: [x0, y0, x1, y1]}}")
    return data


# ---- the result --------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    """A JSON-safe float (None for NaN / inf / missing)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class EvaluationResult:
    """Everything :func:`evaluate` measured; see :meth:`table` and :meth:`to_json`."""

    per_image: xr.Dataset
    protocol: dict[str, Any]
    cost: dict[str, dict[str, Any]]
    fidelity: xr.DataArray | None = None
    sanity: dict[str, xr.Dataset] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    maps: dict[str, xr.DataArray] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return [str(m) for m in self.per_image.coords["method"].values]

    @property
    def has_boxes(self) -> bool:
        return bool(np.isfinite(self.per_image["energy_pointing"].values).any())

    def summary(self) -> dict[str, dict[str, float | None]]:
        """method -> metric -> mean over the images (the paper's table)."""
        data = self.per_image
        result: dict[str, dict[str, float | None]] = {}
        for method in self.methods:
            row = data.sel({"method": method})
            energy = row["energy_pointing"].values
            result[method] = {
                "average_drop": _number(row["drop"].mean()),
                "average_increase": _number(row["increase"].mean()),
                "deletion": _number(row["deletion_auc"].mean()),
                "insertion": _number(row["insertion_auc"].mean()),
                "energy_pointing": _number(np.nanmean(energy)) if np.isfinite(energy).any() else None,
            }
        return result

    def table(self) -> str:
        """The methods x metrics table with the number of images and the protocol, as text."""
        summary = self.summary()
        columns = [c for c in COLUMNS if c[0] != "energy_pointing" or self.has_boxes]
        header = ["Method"] + [title for _, title, _ in columns]
        rows = [[method_label(m)] + [_format(summary[m][key], key) for key, _, _ in columns] for m in self.methods]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            f"{self.protocol['model']} at layer {self.protocol['layer']}, {self.per_image.sizes['image']} image(s), "
            f"class: {self.protocol['target']}",
            "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))),
        ]
        lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        lower = [title for _, title, better in columns if better == "lower"]
        higher = [title for _, title, better in columns if better == "higher"]
        lines.append(f"(lower is better: {', '.join(lower)}; higher is better: {', '.join(higher)})")
        lines.append("")
        lines.extend(self._protocol_lines())
        return "\n".join(lines)

    def _protocol_lines(self) -> list[str]:
        p = self.protocol
        lines = [
            f"Average Drop / Increase: explanation input = image x saliency map, keeping the top "
            f"{p['keep_fraction']:.0%} of the map's pixels, multiplied in the {p['space']} space; "
            f"score = softmax probability.",
            f"Deletion / Insertion: {p['step_fraction']:.2%} of the pixels per step ({p['step_pixels']} px, "
            f"{p['steps']} steps); deletion fills with {p['deletion_substrate']}; insertion starts from "
            f"{p['insertion_substrate']}.",
        ]
        if self.has_boxes:
            lines.append(f"Energy pointing game: {p['boxes']} image(s) with boxes.")
        else:
            lines.append("Energy pointing game: left out (no bounding boxes given; pass --boxes boxes.json).")
        if p.get("preset") is not None:
            family = f"; {p['family']}" if p.get("family") and p.get("family") != "Score-CAM" else ""
            lines.append(f"Score-CAM preset: {p['preset']} (mask convention {p['mask_convention']}{family}).")
        if self.fidelity is not None:
            means = json.loads(self.fidelity.attrs["mean_by_k"])
            shown = ", ".join(f"k={k}: {_format(v, 'r')}" for k, v in means.items())
            lines.append(f"Score-CAM top-k channel fidelity (mean Pearson r with the full map): {shown}.")
        for method, result in self.sanity.items():
            rho = result["spearman"].mean("image").values
            steps = list(result.coords["randomised"].values)
            shown = ", ".join(f"{name}: {_format(value, 'r')}" for name, value in zip(steps[1:], rho[1:]))
            lines.append(f"Sanity check ({method_label(method)}, mean Spearman rho, cascading from the top): {shown}.")
        lines.append(
            f"Preprocessing: {json.dumps(p['preprocessing'])}; weights: {p['weights']} "
            f"(fingerprint {p['weights_fingerprint']})."
        )
        passes = ", ".join(
            f"{method_label(m)} {c['forward_passes']['maps'] + c['forward_passes']['metrics']}" for m, c in self.cost.items()
        )
        lines.append(f"Forward passes (maps + metrics): {passes}.")
        if self.skipped:
            lines.append(f"Skipped unreadable images: {'; '.join(self.skipped)}.")
        return lines

    def to_json(self) -> dict[str, Any]:
        """Every per-image value, the summary, the cost and the protocol, JSON-serialisable."""
        data = self.per_image
        images = [str(i) for i in data.coords["image"].values]
        per_image: dict[str, dict[str, Any]] = {}
        for method in self.methods:
            row = data.sel({"method": method})
            per_image[method] = {
                image: {
                    "probability": _number(row["probability"].values[i]),
                    "explanation_probability": _number(row["explanation_probability"].values[i]),
                    "drop": _number(row["drop"].values[i]),
                    "increase": _number(row["increase"].values[i]),
                    "deletion_auc": _number(row["deletion_auc"].values[i]),
                    "insertion_auc": _number(row["insertion_auc"].values[i]),
                    "energy_pointing": _number(row["energy_pointing"].values[i]),
                    "deletion_curve": [_number(v) for v in row["deletion_curve"].values[i]],
                    "insertion_curve": [_number(v) for v in row["insertion_curve"].values[i]],
                }
                for i, image in enumerate(images)
            }
        result: dict[str, Any] = {
            "schema": SCHEMA,
            "protocol": self.protocol,
            "images": images,
            "targets": {
                image: {"index": int(t), "name": str(n)}
                for image, t, n in zip(images, data.coords["target"].values, data.coords["target_name"].values)
            },
            "skipped": self.skipped,
            "summary": self.summary(),
            "curve_fractions": [float(f) for f in data.coords["fraction"].values],
            "per_image": per_image,
            "cost": self.cost,
        }
        if self.fidelity is not None:
            result["topk_fidelity"] = {
                "k": [int(k) for k in self.fidelity.coords["k"].values],
                "mean": {k: _number(v) for k, v in json.loads(self.fidelity.attrs["mean_by_k"]).items()},
                "per_image": {
                    str(image): [_number(v) for v in self.fidelity.values[i]]
                    for i, image in enumerate(self.fidelity.coords["image"].values)
                },
            }
        if self.sanity:
            result["sanity"] = {
                method: {
                    "randomised": [str(g) for g in ds.coords["randomised"].values],
                    "mean_spearman": [_number(v) for v in np.nanmean(ds["spearman"].values, axis=0)],
                    "per_image": {
                        str(image): [_number(v) for v in ds["spearman"].values[i]]
                        for i, image in enumerate(ds.coords["image"].values)
                    },
                    "protocol": json.loads(ds.attrs["protocol"]),
                }
                for method, ds in self.sanity.items()
            }
        return result

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_json` to ``path`` atomically (a temporary file, then a rename)."""
        return write_json_atomically(self.to_json(), path)


def _format(value: float | None, key: str) -> str:
    if value is None:
        return "n/a"
    if key in ("average_drop", "average_increase"):
        return f"{value:.2f}"
    return f"{value:.4f}" if key != "r" else f"{value:.3f}"


def write_json_atomically(data: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``data`` as JSON to ``path`` in one step (:func:`scorecam_explorer.files.write_atomically`:
    a temporary file in the same folder, flushed to disk, then a rename; a new file gets the
    usual mode, a replaced one keeps its mode). NaN or inf is refused before anything is written."""
    from scorecam_explorer.files import write_atomically

    text = json.dumps(data, indent=1, allow_nan=False) + "\n"
    return write_atomically(path, lambda file: file.write(text.encode()))


# ---- evaluate ----------------------------------------------------------------------------


def evaluate(
    model: Any,
    images: str | os.PathLike[str] | Sequence[Any] | ImageSet,
    *,
    layer: str | None = None,
    methods: str | Sequence[str] | None = None,
    boxes: Mapping[str, Any] | None = None,
    target: Any = None,
    max_images: int | None = None,
    keep_fraction: float = 0.5,
    space: str = "input",
    step_fraction: float = 0.01,
    blur_kernel: int = 11,
    blur_sigma: float = 5.0,
    preset: str = "paper",
    convention: str | None = None,
    topk: bool = True,
    sanity: bool = False,
    sanity_depth: int = 1,
    batch_size: int = 16,
    keep_maps: bool = False,
    log: Callable[[str], None] | None = None,
    tune_allocator: bool = True,
    family: str | None = None,
    samples: int | None = None,
    std: float | None = None,
    seed: int | None = None,
) -> EvaluationResult:
    """Run ``methods`` x the paper's metrics over ``images`` (see the module doc).

    ``model``: a LoadedModel or an ``nn.Module`` (ImageNet preprocessing assumed);
    ``methods``: keys or aliases of registered methods (:mod:`scorecam_explorer.methods`;
    default: every registered one); ``images``: a folder, ``"samples"``, a list of pictures,
    or an :class:`ImageSet`; ``boxes``: image file name
    (or id) -> [x0, y0, x1, y1] in input pixels, for the energy pointing game; ``target``:
    None (each image's top-1 class), a class index or name, or one per image. Score-CAM maps
    come from ``compute_cache`` (mask ``convention``, default: the ``preset``'s) composed
    with ``preset``; ``topk`` adds Score-CAM's top-k fidelity, ``sanity`` the cascading
    randomisation check at ``sanity_depth`` (costly for Score-CAM: a cache per step).
    ``keep_maps`` keeps every method's maps in ``result.maps``; ``log`` receives one line
    per stage (progress). ``tune_allocator`` is passed to ``compute_cache`` when Score-CAM
    runs (its map or its sanity check); the gradient methods and the metrics never change
    the process's allocator (``docs/process-effects.md``). ``family``, ``samples``, ``std``
    and ``seed`` choose the Score-CAM family member of Score-CAM's cache (``"ss-cam"``,
    ``"is-cam"``; as for ``compute_cache``): its maps and top-k fidelity then come from that
    cache, and a preset that does not apply to it (``official`` with S > 1) is refused
    before any forward pass; the protocol records it (``family``, ``mask_sampler``).

    Every setting is checked (:func:`check_settings`) before the images load and the model
    runs, and a given ``target`` before the first forward pass.
    """
    import torch

    from scorecam_explorer.baselines import model_inputs, resolve_layer, targets_from_logits
    from scorecam_explorer.capture import forward_call_counter
    from scorecam_explorer.metrics import (
        average_drop_increase,
        deletion,
        energy_pointing_game,
        insertion,
        sanity_check,
        topk_fidelity,
    )
    from scorecam_explorer.metrics._common import logits_of
    from scorecam_explorer.metrics.localisation import as_box_list, box_mask
    from scorecam_explorer.models import as_loaded_model

    chosen_methods = check_settings(
        methods=methods,
        keep_fraction=keep_fraction,
        space=space,
        step_fraction=step_fraction,
        blur_kernel=blur_kernel,
        blur_sigma=blur_sigma,
        preset=preset,
        convention=convention,
        sanity_depth=sanity_depth,
        batch_size=batch_size,
        family=family,
        samples=samples,
        std=std,
        seed=seed,
        sanity=sanity,
    )
    from scorecam_explorer.sampling import family_label

    sampler = family_fields(preset, family, samples, std, seed, sanity=sanity)
    family_options = {"family": family, "samples": samples, "std": std, "seed": seed} if family is not None else {}
    say = log or (lambda message: None)
    image_set = images if isinstance(images, ImageSet) else collect_images(images, max_images)
    chosen_boxes = boxes_for(image_set, boxes)
    loaded = as_loaded_model(model)
    batch = model_inputs(loaded, image_set.pictures, image_set.ids)
    if target is not None:  # a bad class fails now: checking a given class needs no forward pass
        targets_from_logits(target, torch.zeros(len(batch), len(loaded.class_names)), loaded.class_names)
    layer_name = resolve_layer(loaded, layer, tuple(batch.tensor.shape[2:]))
    for image_boxes in chosen_boxes.values():  # a bad box fails now, not after the maps
        for box in as_box_list(image_boxes):
            box_mask(box, int(batch.tensor.shape[2]), int(batch.tensor.shape[3]))
    logits = logits_of(loaded.module, batch.tensor, batch_size)
    targets = targets_from_logits(target, logits, loaded.class_names)
    say(f"{len(batch)} image(s), model {loaded.name}, layer {layer_name}")

    per_method: list[xr.Dataset] = []
    kept_maps: dict[str, xr.DataArray] = {}
    cost: dict[str, dict[str, Any]] = {}
    fidelity = None
    cache_convention = None
    step_info: dict[str, Any] = {}
    for method in chosen_methods:
        started = time.perf_counter()
        say(f"{method_label(method)}: maps")
        if needs_masked_passes(method):  # from a cache, which also serves the top-k fidelity
            from scorecam_explorer.compose import scorecam
            from scorecam_explorer.methods.scorecam import scorecam_cache

            cache = scorecam_cache(
                loaded,
                batch.tensor,
                layer_name,
                preset=preset,
                convention=convention,
                image_ids=batch.image_ids,
                tune_allocator=tune_allocator,
                **family_options,
            )
            cache_convention = json.loads(cache.attrs["mask_convention"])
            maps = scorecam(cache, layer_name, targets, preset=preset)
            map_passes = int(cache.attrs["forward_passes"])  # model calls, as the engine counted them
            if topk:
                fidelity = topk_fidelity(cache, layer_name, targets, preset=preset)
        else:
            with forward_call_counter(loaded.module) as calls:
                maps = get_method(method).compute(loaded, batch.tensor, layer_name, targets, batch_size=batch_size)
            map_passes = calls[0]  # model calls (for a gradient method, each with one backward pass)
        map_seconds = time.perf_counter() - started
        maps = maps.assign_coords(image=batch.image_ids)
        if keep_maps:
            kept_maps[method] = maps

        say(f"{method_label(method)}: average drop / increase")
        started = time.perf_counter()
        confidence = average_drop_increase(
            loaded, batch.tensor, maps, targets, keep_fraction=keep_fraction, space=space, batch_size=batch_size
        )
        say(f"{method_label(method)}: deletion / insertion")
        deleted = deletion(loaded, batch.tensor, maps, targets, step_fraction=step_fraction, batch_size=batch_size)
        inserted = insertion(
            loaded,
            batch.tensor,
            maps,
            targets,
            step_fraction=step_fraction,
            blur_kernel=blur_kernel,
            blur_sigma=blur_sigma,
            batch_size=batch_size,
        )
        energy = np.full(len(batch), np.nan)
        if chosen_boxes:
            pointing = energy_pointing_game(maps, chosen_boxes)
            for image, value in zip(pointing.coords["image"].values, pointing.values):
                energy[batch.image_ids.index(str(image))] = value
        metric_seconds = time.perf_counter() - started
        step_info = json.loads(deleted.attrs["protocol"])
        cost[method] = {
            "seconds": {"maps": round(map_seconds, 3), "metrics": round(metric_seconds, 3)},
            "forward_passes": {
                "maps": int(map_passes),
                "metrics": int(
                    confidence.attrs["forward_passes"] + deleted.attrs["forward_passes"] + inserted.attrs["forward_passes"]
                ),
                "average_drop_increase": int(confidence.attrs["forward_passes"]),
                "deletion": int(deleted.attrs["forward_passes"]),
                "insertion": int(inserted.attrs["forward_passes"]),
            },
        }
        per_method.append(
            xr.Dataset(
                {
                    "probability": ("image", confidence["probability"].values),
                    "explanation_probability": ("image", confidence["explanation_probability"].values),
                    "drop": ("image", confidence["drop"].values),
                    "increase": ("image", confidence["increase"].values),
                    "deletion_auc": ("image", deleted["auc"].values),
                    "insertion_auc": ("image", inserted["auc"].values),
                    "energy_pointing": ("image", energy),
                    "deletion_curve": (("image", "step"), deleted["curve"].values),
                    "insertion_curve": (("image", "step"), inserted["curve"].values),
                },
                coords={"step": deleted.coords["step"].values, "fraction": ("step", deleted.coords["fraction"].values)},
            )
        )

    per_image = xr.concat(per_method, dim="method").assign_coords(
        method=chosen_methods,
        image=batch.image_ids,
        target=("image", np.asarray(targets, dtype=np.int64)),
        target_name=("image", [loaded.class_names[t] for t in targets]),
    )
    sanity_results: dict[str, xr.Dataset] = {}
    if sanity:
        for method in chosen_methods:
            say(f"{method_label(method)}: sanity check")
            started = time.perf_counter()
            sanity_results[method] = sanity_check(
                loaded, batch.tensor, layer_name, targets, method=method, depth=sanity_depth, preset=preset,
                batch_size=batch_size, tune_allocator=tune_allocator,
            )
            cost[method]["seconds"]["sanity"] = round(time.perf_counter() - started, 3)
            cost[method]["forward_passes"]["sanity"] = int(sanity_results[method].attrs["forward_passes"])

    protocol = {
        "model": loaded.name,
        "weights": loaded.weights,
        "weights_fingerprint": loaded.fingerprint(),
        "layer": layer_name,
        "preprocessing": loaded.preprocessing.describe(),
        "target": "top-1 predicted class of each image" if target is None else f"given: {target}",
        "methods": chosen_methods,
        "images": len(batch),
        "score": "softmax probability of the target class",
        "keep_fraction": keep_fraction,
        "space": space,
        "step_fraction": step_fraction,
        "step_pixels": step_info.get("step_pixels"),
        "steps": step_info.get("steps"),
        "deletion_substrate": "zeros of the normalised input (the normalisation mean colour)",
        "insertion_substrate": f"RISE gaussian blur of the input (klen={blur_kernel}, sigma={blur_sigma}, zero padding)",
        "blur_kernel": blur_kernel,
        "blur_sigma": blur_sigma,
        "auc": "trapezoid over the fraction of pixels changed",
        "boxes": len(chosen_boxes),
        "preset": preset if any(needs_masked_passes(m) for m in chosen_methods) else None,
        "mask_convention": cache_convention.get("name") if cache_convention else None,
        "family": family_label(sampler) if any(needs_masked_passes(m) for m in chosen_methods) else None,
        "mask_sampler": sampler if any(needs_masked_passes(m) for m in chosen_methods) else None,
        "gradient_maps": "ReLU(sum_k w_k A_k) of the logit's gradients, bilinear (align_corners=False), min-max",
        "sanity_depth": sanity_depth if sanity else None,
        "package_version": _package_version(),
    }
    return EvaluationResult(
        per_image=per_image,
        protocol=protocol,
        cost=cost,
        fidelity=fidelity,
        sanity=sanity_results,
        skipped=image_set.skipped,
        maps=kept_maps,
    )


def _package_version() -> str:
    from scorecam_explorer import __version__

    return __version__
