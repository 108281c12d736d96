"""prepare_inputs: tensors and pictures into one float32 batch with ids, and the pictures shown."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from _tiny_models import normal

from scorecam_explorer.errors import ImageLoadError, NonFiniteError, ScorecamError
from scorecam_explorer.images import load_image
from scorecam_explorer.inputs import InputBatch, min_max_pictures, prepare_inputs, unique_ids
from scorecam_explorer.preprocessing import Preprocessing

PREPROCESSING = Preprocessing(resize=36, crop=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))


@pytest.fixture
def picture() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (50, 40, 3), dtype=np.uint8)


def test_a_tensor_is_taken_as_it_is_in_float32():
    x = normal(2, 3, 8, 6, dtype=torch.float64, requires_grad=True, seed=0)
    batch = prepare_inputs(x, None)
    assert isinstance(batch, InputBatch) and len(batch) == 2
    assert batch.tensor.dtype == torch.float32 and batch.tensor.is_contiguous() and not batch.tensor.requires_grad
    np.testing.assert_array_equal(batch.tensor.numpy(), x.detach().numpy().astype(np.float32))
    assert batch.image_ids == ["image-0", "image-1"]
    assert batch.pictures is None
    single = prepare_inputs(x[0].detach(), None)
    assert tuple(single.tensor.shape) == (1, 3, 8, 6)


@pytest.mark.parametrize("shape", [(2, 8, 8), (1, 1, 8, 8), (0, 3, 8, 8), (1, 1, 3, 8, 8), (8,)])
def test_a_tensor_of_the_wrong_shape_is_a_clear_error(shape):
    with pytest.raises(ScorecamError, match=r"\(N, 3, H, W\)"):
        prepare_inputs(torch.zeros(shape), PREPROCESSING)


def test_an_integer_or_non_finite_tensor_is_a_clear_error():
    with pytest.raises(ScorecamError, match="floating point"):
        prepare_inputs(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), PREPROCESSING)
    with pytest.raises(NonFiniteError, match="input tensor"):
        prepare_inputs(torch.full((1, 3, 4, 4), float("nan")), None)
    too_large_for_float32 = torch.full((1, 3, 4, 4), 1e300, dtype=torch.float64)
    with pytest.raises(NonFiniteError, match="input tensor"):
        prepare_inputs(too_large_for_float32, None)


def test_pictures_are_cropped_and_normalised_with_the_preprocessing(picture, tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(picture).save(path)
    sources = [str(path), Image.fromarray(picture), picture, "sample:chelsea", path]
    batch = prepare_inputs(sources, PREPROCESSING)
    expected = torch.stack([PREPROCESSING.to_tensor(load_image(source)) for source in sources])
    np.testing.assert_array_equal(batch.tensor.numpy(), expected.numpy())
    assert batch.tensor.dtype == torch.float32 and batch.tensor.is_contiguous()
    crop = PREPROCESSING.crop_image(Image.fromarray(picture))
    assert batch.pictures is not None and batch.pictures.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(batch.pictures[0], crop)
    np.testing.assert_array_equal(batch.pictures[2], crop)
    assert batch.image_ids == ["photo.png", "image-1", "image-2", "sample:chelsea", "photo.png#2"]


def test_one_picture_a_tuple_or_a_generator(picture):
    assert len(prepare_inputs(picture, PREPROCESSING)) == 1  # an array is one picture, not a list of rows
    assert len(prepare_inputs("sample:chelsea", PREPROCESSING)) == 1
    assert len(prepare_inputs((picture, picture), PREPROCESSING)) == 2
    assert len(prepare_inputs((p for p in [picture] * 3), PREPROCESSING)) == 3


def test_bad_pictures_are_clear_errors(picture, tmp_path):
    with pytest.raises(ScorecamError, match="no images"):
        prepare_inputs([], PREPROCESSING)
    with pytest.raises(ScorecamError, match="preprocessing"):
        prepare_inputs([picture], None)
    with pytest.raises(ScorecamError, match="not int"):
        prepare_inputs(5, PREPROCESSING)  # type: ignore[arg-type]
    with pytest.raises(ImageLoadError, match="not found"):
        prepare_inputs(str(tmp_path / "missing.png"), PREPROCESSING)


def test_given_ids(picture):
    x = torch.zeros(3, 3, 4, 4)
    assert prepare_inputs(x, None, ["a", "b", "c"]).image_ids == ["a", "b", "c"]
    assert prepare_inputs(x, None, [7, "a", 7]).image_ids == ["7", "a", "7#2"]  # type: ignore[list-item]
    with pytest.raises(ScorecamError, match="2 image ids given for 3 images"):
        prepare_inputs(x, None, ["a", "b"])
    with pytest.raises(ScorecamError, match="unique; repeated: a"):
        prepare_inputs(x, None, ["a", "b", "a"], allow_repeated_ids=False)
    assert prepare_inputs([picture], PREPROCESSING, ["mine"]).image_ids == ["mine"]


def test_unique_ids_suffixes_repeats_in_order():
    assert unique_ids(["a", "b", "a", "a", "b"]) == ["a", "b", "a#2", "a#3", "b#2"]
    assert unique_ids([]) == []


def test_viewable_pictures(picture):
    from_pictures = prepare_inputs([picture], PREPROCESSING)
    assert from_pictures.viewable(None) is from_pictures.pictures

    pixels = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(PREPROCESSING.normalise(pixels).copy())
    np.testing.assert_array_equal(prepare_inputs(x, PREPROCESSING).viewable(PREPROCESSING), pixels)

    values = np.random.default_rng(2).normal(size=(2, 3, 5, 4)).astype(np.float32)
    values[1] = 0.25  # a constant image
    shown = prepare_inputs(torch.from_numpy(values), None).viewable(None)
    first = values[0]
    by_hand = np.round((first - first.min()) / (first.max() - first.min()) * 255).transpose(1, 2, 0)
    np.testing.assert_array_equal(shown[0], by_hand.astype(np.uint8))
    np.testing.assert_array_equal(shown[1], np.zeros((5, 4, 3), np.uint8))
    np.testing.assert_array_equal(min_max_pictures(values), shown)
