"""``compute_cache``: every forward pass Score-CAM needs, once, into one xarray cache.

For images X_1..X_N and each requested layer with channels A_1..A_C:

    logits[i]              = f(X_i)                 one unmasked pass (also records A)
    baseline_logits[i]     = f(X_i * 0)             one pass for all-zero masks
    masked_logits[i, k, :] = f(X_i∘H_ik)          one pass per non-constant channel

where H_ik is channel k's mask under the chosen convention. A mask sampler
(:mod:`scorecam_explorer.sampling`) may forward S masked inputs M_ik^(s) per channel
instead; masked_logits[i, k, :] is then the mean of their S outputs (Score-CAM's sampler, the
default, has S = 1 and M_ik = X_i∘H_ik). A Score-CAM map for any class,
weighting or channel subset is then a function of these arrays alone
(:mod:`scorecam_explorer.compose`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
import xarray as xr
from torch import nn

from scorecam_explorer import device as device_setup
from scorecam_explorer.cache import LayerArrays, build_cache
from scorecam_explorer.capture import capture, forward_call_counter
from scorecam_explorer.conventions import DEFAULT_CONVENTION, MaskConvention, get_convention
from scorecam_explorer.errors import ScorecamError
from scorecam_explorer.inputs import Inputs, prepare_inputs
from scorecam_explorer.layouts import LayerLayout
from scorecam_explorer.models import LoadedModel, as_loaded_model
from scorecam_explorer.planner import Plan, Planner, Stopwatch, candidate_plans, remembered_threads, threads_restored
from scorecam_explorer.preprocessing import Preprocessing
from scorecam_explorer.rewriting import (
    copy_key,
    folded_batchnorm,
    fused_copy,
    has_hooks,
    reject_folded,
    reject_fused,
    remembers_copy,
)
from scorecam_explorer.sampling import MaskSampler, cost_text, resolve_sampler
from scorecam_explorer.scoring import baseline_logits, score_layer

# Images per unmasked / baseline pass (bounds the memory of those passes).
_IMAGE_CHUNK = 16

_logger = logging.getLogger(__name__)


def compute_cache(
    model: LoadedModel | nn.Module,
    inputs: Inputs,
    layers: str | Sequence[str] | None = None,
    *,
    convention: str | MaskConvention = DEFAULT_CONVENTION,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    precision: str = "float32",
    preprocessing: Preprocessing | None = None,
    class_names: Sequence[str] | None = None,
    image_ids: Sequence[str] | None = None,
    tune_allocator: bool = True,
    fold_batchnorm: bool = True,
    fuse_pointwise: bool = True,
    adapt_threads: bool = True,
    sampler: str | MaskSampler | None = None,
    family: str | None = None,
    samples: int | None = None,
    std: float | None = None,
    seed: int | None = None,
) -> xr.DataTree:
    """Run the unmasked, baseline and masked forward passes and return the cache.

    Args:
        model: a :class:`~scorecam_explorer.models.LoadedModel` (its name, preprocessing,
            class names, default layer, layer layouts and weights fingerprint are used) or a plain
            ``nn.Module`` (class names ``class 0``.., model name its class name).
        inputs: a preprocessed tensor (N, 3, H, W) or (3, H, W), or one picture or a list
            of pictures (paths, ``"sample:NAME"``, PIL images, uint8 arrays) that the
            model's preprocessing turns into inputs.
        layers: a layer name, a list of names, or None for the model's default layer.
        convention: the mask convention (``paper``, ``official``, ``pytorch-grad-cam``,
            ``torchcam`` or a :class:`MaskConvention`); recorded in the cache.
        batch_size: masked inputs per forward pass; None measures the fastest size.
        device: ``"auto"`` (CUDA, then MPS, then CPU), or a device name.
        progress: show a progress bar (tqdm) of the masked inputs.
        on_progress: called as ``on_progress(done, total)`` each time masked inputs are
            accounted for: after each batch of masked passes, and for the channels whose
            constant (all-zero) masks the baseline pass stands for. ``total`` is the masked
            inputs of the call, images x channels of every layer, in model order, layer
            after layer; ``done`` rises with each call and the last call has ``done ==
            total``. The unit is masked inputs, not model calls (a model call forwards a
            batch of them; the cache's ``forward_passes`` counts calls). Independent of
            ``progress``; an exception it raises stops the computation.
        precision: ``"float32"`` or ``"bfloat16"`` (autocast for the masked and baseline
            passes only; faster on CPUs with AVX512-BF16 or AMX and on GPUs, slightly different
            scores). Refused, before any forward pass, on a device without native bfloat16
            (see :func:`scorecam_explorer.device.check_native_precision`).
        preprocessing: overrides the model's preprocessing (how pictures become inputs,
            and how a tensor input is shown).
        class_names: overrides the model's class names.
        image_ids: names of the images (default: file names, ``sample:NAME``, ``image-I``).
        tune_allocator: keep freed memory in the process (glibc ``mallopt``; faster on CPU,
            never changes a result; see :func:`scorecam_explorer.device.tune_allocator`).
        fold_batchnorm: run the masked passes on a copy of the model with each BatchNorm
            folded into the convolution before it (same function, float32 rounding
            differences only; see :func:`scorecam_explorer.rewriting.folded_batchnorm`).
            Every call checks the copy against the model's output on this call's unmasked
            input (one extra pass) and runs the model itself when they differ. Not done
            when the model carries forward hooks, so that they see every pass. The copy is
            kept for later calls until the model goes or
            :func:`scorecam_explorer.release_copies` is called.
        fuse_pointwise: on a CPU in float32, also run each convolution of the folded copy
            fused with the ReLU / ReLU6 / residual addition after it (one oneDNN call, the
            same values; see :mod:`scorecam_explorer.fusion`), checked on every call as
            the folded copy is.
        adapt_threads: on a CPU, also try the masked passes with one thread, and keep
            what was fastest for this model (torch's thread count is restored when
            compute returns). False leaves ``torch.get_num_threads()`` alone.
        sampler: how each channel's masked inputs are sampled (:mod:`scorecam_explorer.sampling`):
            None or ``"scorecam"`` for Score-CAM's one input X∘H_k per channel, or a
            :class:`~scorecam_explorer.sampling.MaskSampler` with S samples per channel, whose
            outputs are averaged into ``masked_logits``. Each batch of channels is then
            forwarded S times (S times the model calls), constant channels too unless the
            sampler says their inputs are all the baseline. Random draws come from a
            generator seeded with the sampler's ``seed``, one per layer. Recorded in the
            cache's ``mask_sampler`` attribute.
        family: the Score-CAM family member, the plain spelling of ``sampler``:
            ``"score-cam"`` (the default), ``"ss-cam"`` (SS-CAM: S noisy masks X∘(H_k + δ),
            δ ~ N(0, std²), drawn from torch's global generator in torchcam's order, so that
            the same ``torch.manual_seed`` reproduces torchcam's ``SSCAM`` noise) or
            ``"is-cam"`` (IS-CAM: S scaled masks c_s X∘H_k). Not with ``sampler``.
        samples: S, the masked inputs per channel (None: torchcam's defaults, 35 for SS-CAM,
            10 for IS-CAM; Score-CAM has 1). The masked passes cost S times Score-CAM's,
            and for SS-CAM a constant channel is forwarded too (its noise is not zero):
            the count is logged, and shown on the progress bar, before they start.
        std: SS-CAM's noise standard deviation σ (None: 2.0); only for SS-CAM.
        seed: SS-CAM's noise seed; only for SS-CAM. None draws from torch's global generator
            (torchcam's way) and records its state at each layer's start in the layer's
            ``noise`` attribute; an integer draws from ``torch.Generator().manual_seed(seed)``,
            made afresh for this call (the noise of ``torch.manual_seed(seed)`` before
            torchcam's ``SSCAM``), recorded in ``mask_sampler``; the global generator is then
            left alone. See ``docs/cache.md``.

    Returns:
        The cache (``docs/cache.md``), with ``forward_passes`` (model calls made) and
        ``seconds`` (wall time) among its attributes.
    """
    watch = Stopwatch()
    mask_convention = get_convention(convention)
    mask_sampler = resolve_sampler(sampler, family=family, samples=samples, std=std, seed=seed)
    precision = device_setup.check_native_precision(precision, device)  # before any forward pass
    preprocessing_known = isinstance(model, LoadedModel) or preprocessing is not None
    with _probe_counter(model) as probe_calls:  # a plain module is probed once (class count, layer shapes)
        loaded = _as_loaded(model, preprocessing, inputs)
        layer_names = _resolve_layers(loaded, layers)
    preprocessing = preprocessing or loaded.preprocessing
    names = list(class_names) if class_names is not None else list(loaded.class_names)
    prepared = prepare_inputs(inputs, preprocessing, image_ids, allow_repeated_ids=False)
    batch, ids = prepared.tensor, prepared.image_ids
    pictures = prepared.viewable(preprocessing if preprocessing_known else None)
    compute_device = device_setup.resolve_device(device)
    if tune_allocator:
        device_setup.tune_allocator()
    channels_last = device_setup.uses_channels_last(compute_device)
    module = loaded.module
    fingerprint = loaded.fingerprint()

    threads_key = (fingerprint, str(compute_device), precision)
    # the candidates read torch's thread count before a remembered one is set below
    plans = candidate_plans(compute_device, batch_size, adapt_threads=adapt_threads)
    # no faster copy for a model with forward hooks, so that they see every pass (asked
    # before the engine's own counting hook is added)
    use_copies = fold_batchnorm and not has_hooks(module)
    with _model_on(module, compute_device), threads_restored():
        if adapt_threads and (threads := remembered_threads(threads_key)) is not None:
            torch.set_num_threads(threads)  # what the masked passes found fastest last time
        on_device = batch.to(compute_device)
        with ExitStack() as counters:
            calls = [counters.enter_context(forward_call_counter(module))]
            layouts = {name: loaded.layout_for(name) for name in layer_names}
            activations, logits = _capture_in_chunks(module, on_device, layer_names, layouts)
            if logits.shape[1] != len(names):
                raise ScorecamError(
                    f"the model has {logits.shape[1]} outputs but {len(names)} class names were given."
                )
            masked_model, check_passes = _masked_model(
                module,
                on_device,
                logits,
                fold=use_copies,
                fuse=fuse_pointwise and compute_device.type == "cpu" and precision == "float32",
                key=copy_key(module, fingerprint, compute_device),
                channels_last=channels_last,
            )
            calls.append([check_passes])
            if masked_model is not module:
                calls.append(counters.enter_context(forward_call_counter(masked_model)))
            baseline = torch.cat(
                [
                    baseline_logits(masked_model, chunk, precision=precision, channels_last=channels_last)
                    for chunk in on_device.split(_IMAGE_CHUNK)
                ]
            )
            layer_arrays = _score_layers(
                masked_model,
                on_device,
                activations,
                baseline,
                mask_convention,
                planner_key=(fingerprint, tuple(batch.shape[1:]), str(compute_device), precision, batch_size, adapt_threads),
                threads_key=threads_key,
                plans=plans,
                precision=precision,
                channels_last=channels_last,
                progress=progress,
                on_progress=on_progress,
                sampler=mask_sampler,
            )
        forward_passes = probe_calls[0] + sum(count[0] for count in calls)

    cache = build_cache(
        pictures=pictures,
        inputs=batch.numpy(),
        logits=logits.cpu().numpy(),
        baseline_logits=baseline.cpu().numpy(),
        image_ids=ids,
        class_names=names,
        layers={name: replace(arrays, layout=layouts[name].name) for name, arrays in layer_arrays.items()},
        model_name=loaded.name,
        weights_fingerprint=fingerprint,
        preprocessing=preprocessing.describe() if preprocessing_known else None,
        convention=mask_convention,
        sampler=mask_sampler,
        dtype=precision,
        device=str(compute_device),
        forward_passes=forward_passes,
        seconds=watch.seconds,
    )
    for name, arrays in layer_arrays.items():
        if arrays.noise is not None:
            cache[name].attrs["noise"] = json.dumps(arrays.noise, sort_keys=True)
    return cache


def _score_layers(
    module: nn.Module,
    inputs: torch.Tensor,
    activations: dict[str, torch.Tensor],
    baseline: torch.Tensor,
    convention: MaskConvention,
    *,
    planner_key: tuple,
    threads_key: tuple,
    plans: list[Plan],
    precision: str,
    channels_last: bool,
    progress: bool,
    on_progress: Callable[[int, int], None] | None = None,
    sampler: MaskSampler,
) -> dict[str, _ScoredLayer]:
    """The masked passes of every layer, in model order, with one progress bar; each layer's
    arrays carry the sampler's record of its noise (:meth:`MaskSampler.noise_record`, with
    ``after``: the layers drawn before it in this call, from the same generator)."""
    total = sum(int(a.shape[0] * a.shape[1]) for a in activations.values())
    arrays: dict[str, _ScoredLayer] = {}
    sampler.start_call()
    cost = cost_text(sampler, total)  # said before any masked pass
    _logger.info("%s", cost)
    with _progress_bar(total, progress, cost if int(sampler.samples) > 1 or not sampler.constant_is_free else None) as bar:
        advance = _progress_counter(bar, total, on_progress)
        for name, activation in activations.items():
            bar.set_postfix_str(name)
            scores = score_layer(
                module,
                inputs,
                activation,
                convention,
                baseline=baseline,
                planner=Planner(key=(name, *planner_key), candidates=plans, threads_key=threads_key),
                layer=name,
                precision=precision,
                channels_last=channels_last,
                progress=advance,
                sampler=sampler,
            )
            record = sampler.noise_record()
            if record is not None and "layers_before" in record:
                record["after"] = list(arrays)[: int(record.pop("layers_before"))]
            arrays[name] = _ScoredLayer(
                activation=activation.cpu().numpy(),
                masked_logits=scores.masked_logits.numpy(),
                constant=scores.constant.numpy(),
                noise=record,
            )
    return arrays


@dataclass
class _ScoredLayer(LayerArrays):
    """A layer's arrays and what its random draws came from (None: nothing random)."""

    noise: dict[str, Any] | None = None


def _masked_model(
    module: nn.Module,
    inputs: torch.Tensor,
    logits: torch.Tensor,
    *,
    fold: bool,
    fuse: bool,
    key: tuple,
    channels_last: bool,
) -> tuple[nn.Module, int]:
    """The model the masked passes run on, and the forward passes its choice took.

    The fastest copy (fused, then BatchNorm-folded) that reproduces this call's unmasked
    ``logits`` f(X) on this call's own X, else the model itself (also when ``fold`` is
    False). Every call checks the copy it uses, one pass of the N unmasked images against
    the hundreds of masked ones: a copy computes the function the model had when it was
    traced, and a flag the model's forward reads (torchvision Inception3's
    ``transform_input``) may have changed since without changing the weights or the
    ``repr`` that key it. When a remembered copy differs, it is rebuilt from the model as
    it is now and checked again; when a copy built on this call differs, the model runs
    itself and ``key`` remembers that there is no copy (new weights or a new structure try
    again).
    """
    passes = 0
    for rebuild in (False, True) if fold else ():
        remembered = remembers_copy(module, key) and not rebuild
        folded = folded_batchnorm(module, key, channels_last=channels_last, rebuild=rebuild)
        if folded is None:
            break
        copy_, made = _agreeing_copy(folded, fused_copy(folded) if fuse else None, inputs, logits, channels_last)
        passes += made
        if copy_ is not None:
            return copy_, passes
        if not remembered:
            reject_folded(module, key)
            break
    return module, passes


def _agreeing_copy(
    folded: nn.Module, fused: nn.Module | None, inputs: torch.Tensor, logits: torch.Tensor, channels_last: bool
) -> tuple[nn.Module | None, int]:
    """``fused`` if it reproduces ``logits``, else ``folded`` if it does (the fused copy is
    then dropped for good: the fusion, not the model, is at fault), else None; and the
    forward passes the checks took."""
    passes = 0
    for candidate in (fused, folded):
        if candidate is None:
            continue
        same, made = _same_function(candidate, inputs, logits, channels_last)
        passes += made
        if same:
            if candidate is folded and fused is not None:
                reject_fused(folded)
            return candidate, passes
    return None, passes


def _same_function(
    candidate: nn.Module, inputs: torch.Tensor, logits: torch.Tensor, channels_last: bool
) -> tuple[bool, int]:
    """Whether ``candidate`` reproduces the unmasked ``logits`` up to float32 rounding,
    max |f'(X) - f(X)| <= 1e-4 max |f(X)|, fed as the masked passes will feed it (a copy
    that fails to run does not); and the forward passes that took."""
    outputs = []
    with forward_call_counter(candidate) as passes:
        try:
            with torch.inference_mode():
                for chunk in inputs.split(_IMAGE_CHUNK):
                    chunk = chunk.contiguous(memory_format=torch.channels_last) if channels_last else chunk
                    outputs.append(candidate(chunk))
        except (RuntimeError, ValueError, TypeError, NotImplementedError):
            return False, passes[0]
    if not all(isinstance(output, torch.Tensor) for output in outputs):
        return False, passes[0]
    output = torch.cat(outputs).float()
    scale = float(logits.abs().max()) or 1.0
    same = output.shape == logits.shape and float((output - logits).abs().max()) <= 1e-4 * scale
    return same, passes[0]


def _probe_counter(model: LoadedModel | nn.Module) -> AbstractContextManager[list[int]]:
    """Counts the model's forward calls while it is wrapped and its layers probed."""
    module = model.module if isinstance(model, LoadedModel) else model
    return forward_call_counter(module) if isinstance(module, nn.Module) else nullcontext([0])


def _as_loaded(model: LoadedModel | nn.Module, preprocessing: Preprocessing | None, inputs: object) -> LoadedModel:
    """The LoadedModel, or a plain module wrapped and probed at the size of the input tensor
    it is given (pictures: the preprocessing's size)."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        return as_loaded_model(model, inputs, preprocessing=preprocessing)
    raise ScorecamError(
        f"model must be a LoadedModel (scorecam_explorer.load_model) or a torch.nn.Module, not {type(model).__name__}."
    )


def _resolve_layers(loaded: LoadedModel, layers: str | Sequence[str] | None) -> list[str]:
    """Requested layers, checked, without duplicates, shallow to deep."""
    if layers is None:
        requested = [loaded.default_layer]
    elif isinstance(layers, str):
        requested = [layers]
    else:
        requested = [str(layer) for layer in layers]
        if not requested:
            raise ScorecamError("no layer given; pass a layer name, a list of names, or None for the default layer.")
    checked = [loaded.check_layer(layer) for layer in requested]
    order = {info.name: index for index, info in enumerate(loaded.layers(listed_only=False))}
    return sorted(set(checked), key=order.__getitem__)


def _capture_in_chunks(
    module: nn.Module, inputs: torch.Tensor, layers: list[str], layouts: Mapping[str, LayerLayout]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The activations (N, C, h, w), each layer read through its layout, and the logits."""
    pieces = [capture(module, chunk, layers, layouts) for chunk in inputs.split(_IMAGE_CHUNK)]
    activations = {name: torch.cat([piece.activations[name] for piece in pieces]) for name in layers}
    return activations, torch.cat([piece.logits for piece in pieces])


@contextmanager
def _model_on(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Move the model to ``device`` for the computation and back to where it was afterwards."""
    parameter = next(module.parameters(), None)
    original = parameter.device if parameter is not None else device
    if original != device:
        module.to(device)
    try:
        yield module
    finally:
        if original != device:
            module.to(original)


def _progress_bar(total: int, enabled: bool, description: str | None = None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="ch", desc=description or "Score-CAM", disable=not enabled, leave=False)


def _progress_counter(bar: Any, total: int, on_progress: Callable[[int, int], None] | None) -> Callable[[int], None]:
    """What the scoring loop calls with each count of masked inputs: the bar moves, and
    ``on_progress`` (when given) hears (done so far, total)."""
    if on_progress is None:
        return bar.update
    done = 0

    def advance(count: int) -> None:
        nonlocal done
        done += int(count)
        bar.update(count)
        on_progress(done, total)

    return advance
