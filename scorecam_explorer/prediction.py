"""Top-k predictions of a model for a picture."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scorecam_explorer.capture import eval_mode
from scorecam_explorer.images import ImageSource, load_image
from scorecam_explorer.models import LoadedModel


@dataclass(frozen=True)
class Prediction:
    """One class of a prediction: index, name and softmax probability."""

    index: int
    name: str
    probability: float


def predict(model: LoadedModel, image: ImageSource, top: int = 5) -> list[Prediction]:
    """The ``top`` most probable classes for ``image``: softmax over the model's logits."""
    inputs = model.preprocessing(load_image(image))[None]
    parameter = next(model.module.parameters(), None)
    if parameter is not None:
        inputs = inputs.to(parameter.device)
    with eval_mode(model.module), torch.inference_mode():
        probabilities = torch.softmax(model.module(inputs).float(), dim=-1)[0].cpu()
    values, indices = probabilities.topk(min(top, probabilities.numel()))
    return [
        Prediction(int(index), model.class_names[int(index)], float(value))
        for value, index in zip(values, indices)
    ]
