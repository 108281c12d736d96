"""Masked scoring: the model's full output for the input masked by each channel.

For image i, layer channel k with mask H_ik (see :mod:`scorecam_explorer.conventions`):

    masked_logits[i, k, :] = f(X_i∘H_ik)          (all K outputs, not one class)

Nothing here depends on the class or on how scores become weights, so these C forward
passes per image are done once and cached. Masks are built for a block of channels at a
time and masked inputs for one batch at a time (a batch may hold channels of several
images), so peak memory depends on the batch size, never on the number of channels.

A constant channel (max == min where it is normalised) has H_ik = 0, so its masked input is
the baseline X_i * 0 and its row is f(X_i * 0), forwarded once per image as
``baseline_logits``; such channels are flagged in ``constant`` and not forwarded again.

Which masked inputs a channel gets is the mask sampler's choice
(:mod:`scorecam_explorer.sampling`): Score-CAM's is the one above; a sampler with S samples
per channel gives

    masked_logits[i, k, :] = (1/S) * sum_s f(M_ik^(s))

with the S samples of a batch forwarded one after the other (S model calls of the batch's
size), and constant channels forwarded too unless the sampler says their inputs are all the
baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from scorecam_explorer.capture import check_finite, check_logits, eval_mode
from scorecam_explorer.conventions import MaskConvention
from scorecam_explorer.device import autocast
from scorecam_explorer.errors import ScorecamError
from scorecam_explorer.planner import Plan, Planner, Stopwatch, apply_plan, synchronize
from scorecam_explorer.sampling import MaskSampler, ScoreCamSampler

ProgressCallback = Callable[[int], None]


@dataclass
class LayerScores:
    """Masked outputs of one layer.

    Attributes:
        masked_logits: f(X_i∘H_ik), float32 (N, C, K), on the CPU (for a sampler with S
            samples, the mean of the S outputs, see :mod:`scorecam_explorer.sampling`).
        constant: bool (N, C), True where channel k of image i was constant (forwarded only
            when the sampler says a constant channel is not free, or ``skip_constant`` is False).
        forwarded: number of masked inputs actually forwarded (S per forwarded channel).
    """

    masked_logits: torch.Tensor
    constant: torch.Tensor
    forwarded: int


def forward_masked(
    module: nn.Module,
    batch: torch.Tensor,
    *,
    precision: str = "float32",
    channels_last: bool = False,
) -> torch.Tensor:
    """f(batch) for masked inputs: float32 (B, K), optionally under bfloat16 autocast.

    ``channels_last`` only changes the input's memory layout (the convolutions pick their
    channels-last kernels from it); the model's parameters are left as they are.
    """
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(batch.device, precision):
        return check_logits(module(batch))


def baseline_logits(
    module: nn.Module, inputs: torch.Tensor, *, precision: str = "float32", channels_last: bool = False
) -> torch.Tensor:
    """f(X * 0) for every image: float32 (N, K), the output for an all-zero mask.

    ``X * 0`` (not a fresh zero tensor) so that the baseline is bit for bit the masked
    input of a constant channel (negative inputs give -0.0).
    """
    with eval_mode(module):
        logits = forward_masked(module, inputs * 0, precision=precision, channels_last=channels_last)
    check_finite(logits, "the model's output on the baseline input (X * 0)")
    return logits


def score_layer(
    module: nn.Module,
    inputs: torch.Tensor,
    activation: torch.Tensor,
    convention: MaskConvention,
    *,
    baseline: torch.Tensor,
    planner: Planner,
    layer: str = "layer",
    precision: str = "float32",
    channels_last: bool = False,
    progress: ProgressCallback | None = None,
    skip_constant: bool = True,
    sampler: MaskSampler | None = None,
    generator: torch.Generator | None = None,
) -> LayerScores:
    """Forward the input masked by every non-constant channel of one layer.

    Args:
        module: the model (run in eval mode, without autograd).
        inputs: X, float32 (N, 3, H, W) on the compute device.
        activation: A, float32 (N, C, h, w) on the same device.
        convention: how masks are built.
        baseline: f(X * 0), (N, K), from :func:`baseline_logits` (same precision).
        planner: chooses the batch size (and CPU threads).
        layer: the layer's name, for error messages.
        precision: ``"float32"`` or ``"bfloat16"`` (autocast).
        channels_last: feed channels-last inputs.
        progress: called with the number of channels accounted for after each step.
        skip_constant: give constant channels the baseline's row instead of forwarding
            their (all-zero-mask) inputs; the result is the same, the work is not. Only
            done when the sampler's ``constant_is_free`` says so.
        sampler: how each channel's masked inputs are sampled and their outputs reduced
            (None: Score-CAM's one input X∘H_k); see :mod:`scorecam_explorer.sampling`.
            Each batch of channels is forwarded once per sample, so ``planner`` sees the
            time of one forward pass of the batch's size.
        generator: what the sampler draws from (default: ``sampler.generator`` on X's device).
            The sampler's ``start_layer`` is called first, with the layer's N, C and (H, W).

    Raises:
        NonFiniteError: a masked output with NaN or inf.
    """
    sampler = sampler if sampler is not None else ScoreCamSampler()
    if generator is None:
        generator = sampler.generator(inputs.device)
    n_samples = int(sampler.samples)
    n_images, n_channels = activation.shape[:2]
    size = (int(inputs.shape[-2]), int(inputs.shape[-1]))
    sampler.start_layer(n_images=int(n_images), n_channels=int(n_channels), size=size)
    masked_logits = torch.empty((n_images, n_channels, baseline.shape[1]), dtype=torch.float32)
    constant = torch.zeros((n_images, n_channels), dtype=torch.bool)
    forwarded = 0

    def forward_batch(images: torch.Tensor, channels: torch.Tensor, masks: torch.Tensor, plan: Plan) -> None:
        apply_plan(plan)
        watch = Stopwatch()
        if bool((images == images[0]).all()):
            source = inputs[int(images[0])]
        else:  # a batch that spans two images
            source = inputs[images.to(inputs.device)]
        outputs: list[torch.Tensor] = []
        given = 0
        for batch in sampler.masked_inputs(source, masks, generator=generator, images=images, channels=channels):
            given += 1
            if given > n_samples:
                break
            outputs.append(forward_masked(module, batch, precision=precision, channels_last=channels_last))
        if given != n_samples:
            raise ScorecamError(
                f"mask sampler {sampler.name!r} gave {'more than ' if given > n_samples else ''}"
                f"{min(given, n_samples)} masked input(s) for a batch, but says it samples {n_samples}."
            )
        synchronize(inputs.device)
        seconds = watch.seconds
        for output in outputs:
            check_finite(output, f"the model's output on the input masked by layer {layer!r}")
        logits = sampler.reduce(outputs)
        if tuple(logits.shape) != (len(channels), baseline.shape[1]):
            raise ScorecamError(
                f"mask sampler {sampler.name!r} reduced a batch of {len(channels)} channels to shape "
                f"{tuple(logits.shape)}, not ({len(channels)}, {baseline.shape[1]})."
            )
        planner.record(plan, seconds / n_samples, len(channels))
        masked_logits[images, channels] = logits.cpu()
        if progress is not None:
            progress(len(channels))

    queue = _MaskQueue()
    with eval_mode(module):
        for image in range(n_images):
            for first, masks, flags in convention.mask_blocks(activation[image], size):
                channels = torch.arange(first, first + len(masks))
                flags = flags.cpu()
                constant[image, channels[flags]] = True
                skip = flags if skip_constant and sampler.constant_is_free else torch.zeros_like(flags)
                if bool(skip.any()):
                    masked_logits[image, channels[skip]] = baseline[image].float().cpu()
                    if progress is not None:
                        progress(int(skip.sum()))
                keep = ~skip
                queue.put(torch.full((int(keep.sum()),), image), channels[keep], masks[keep.to(masks.device)])
                forwarded += n_samples * _drain(queue, planner, forward_batch, final=False)
        forwarded += n_samples * _drain(queue, planner, forward_batch, final=True)
    return LayerScores(masked_logits=masked_logits, constant=constant, forwarded=forwarded)


class _MaskQueue:
    """Masks waiting to be forwarded, in (image, channel) order: at most one block plus one batch."""

    def __init__(self) -> None:
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.count = 0

    def put(self, images: torch.Tensor, channels: torch.Tensor, masks: torch.Tensor) -> None:
        if len(channels):
            self.parts.append((images, channels, masks))
            self.count += len(channels)

    def put_back(self, images: torch.Tensor, channels: torch.Tensor, masks: torch.Tensor) -> None:
        self.parts.insert(0, (images, channels, masks))
        self.count += len(channels)

    def take(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, channels, masks = (torch.cat(part) for part in zip(*self.parts))
        self.parts = [(images[size:], channels[size:], masks[size:])]
        self.count = len(channels) - min(size, len(channels))
        return images[:size], channels[:size], masks[:size]


def _drain(
    queue: _MaskQueue,
    planner: Planner,
    forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Plan], None],
    *,
    final: bool,
) -> int:
    """Forward full batches from ``queue`` (and the rest if ``final``); returns how many."""
    done = 0
    while queue.count and (final or queue.count >= planner.next_plan().batch_size):
        plan = planner.next_plan()
        images, channels, masks = queue.take(plan.batch_size)
        try:
            forward(images, channels, masks, plan)
        except torch.OutOfMemoryError:
            queue.put_back(images, channels, masks)
            planner.shrink_after_out_of_memory(plan)
            if masks.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        done += len(channels)
    return done
