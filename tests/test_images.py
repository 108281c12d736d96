"""Pictures: samples by name, files of any mode and size, arrays, and their errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from scorecam_explorer.errors import ImageLoadError
from scorecam_explorer.images import find_images, image_id, load_image, sample_names, sample_path
from scorecam_explorer.preprocessing import Preprocessing


def test_samples_ship_with_their_attribution() -> None:
    names = sample_names()
    assert {"chelsea", "coffee", "astronaut", "rocket"} <= set(names)
    attribution = (sample_path("chelsea").parent / "ATTRIBUTION.md").read_text()
    for name in names:
        assert f"{name}.jpg" in attribution
    assert "CC0" in attribution


def test_sample_by_name_is_rgb() -> None:
    image = load_image("sample:chelsea")
    assert image.mode == "RGB" and image.size == (451, 300)
    assert image_id("sample:chelsea") == "sample:chelsea"


def test_unknown_sample_names_the_choices() -> None:
    with pytest.raises(ImageLoadError, match="chelsea"):
        load_image("sample:chelsee")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA", "CMYK"])
def test_any_mode_becomes_rgb(tmp_path, mode: str) -> None:
    source = Image.new("RGB", (40, 30), (200, 100, 50))
    converted = source.convert(mode) if mode != "I;16" else Image.new("I;16", (40, 30), 1000)
    path = tmp_path / ("picture.tif" if mode in ("I;16", "CMYK") else "picture.png")
    converted.save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (40, 30)


def test_transparent_pixels_become_white(tmp_path) -> None:
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    path = tmp_path / "clear.png"
    rgba.save(path)
    assert np.asarray(load_image(path))[0, 0].tolist() == [255, 255, 255]


def test_missing_and_unreadable_files_name_the_path(tmp_path) -> None:
    with pytest.raises(ImageLoadError, match="not found: .*nope.jpg"):
        load_image(tmp_path / "nope.jpg")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ImageLoadError, match="not a readable image: .*notes.jpg"):
        load_image(text)
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)


def test_arrays() -> None:
    grey = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    assert load_image(grey).mode == "RGB"
    with pytest.raises(ImageLoadError, match="shape"):
        load_image(np.zeros((3, 4, 5), np.uint8))
    with pytest.raises(ImageLoadError, match=r"\[0, 1\]"):
        load_image(np.full((3, 4), 2.0))


def test_find_images(tmp_path) -> None:
    for name in ("b.png", "a.JPG", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in find_images(tmp_path)] == ["a.JPG", "b.png"]
    with pytest.raises(ImageLoadError, match="folder not found"):
        find_images(tmp_path / "missing")


def test_preprocessing_matches_torchvision() -> None:
    """Our resize/crop/normalise equals torchvision's ImageClassification on PIL input."""
    from torchvision.models import ResNet18_Weights

    transform = ResNet18_Weights.IMAGENET1K_V1.transforms()
    ours = Preprocessing(resize=256, crop=224)
    for name in ("chelsea", "rocket", "astronaut"):
        image = load_image(f"sample:{name}")
        expected = transform(image)
        actual = ours.to_tensor(image)
        assert actual.shape == expected.shape == (3, 224, 224)
        assert (actual - expected).abs().max().item() < 2e-2  # PIL vs tensor resize rounding
        assert (actual - expected).abs().mean().item() < 2e-3


def test_preprocessing_round_trip_and_description() -> None:
    preprocessing = Preprocessing(resize=40, crop=32)
    pixels = preprocessing.crop_image(load_image("sample:coffee"))
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    restored = preprocessing.denormalise(preprocessing.normalise(pixels))
    assert np.abs(restored.astype(int) - pixels.astype(int)).max() <= 1
    assert Preprocessing.from_description(preprocessing.describe()) == preprocessing


def test_small_pictures_are_upscaled_to_the_input_size() -> None:
    tiny = Image.new("RGB", (10, 6), (10, 20, 30))
    assert Preprocessing().crop_image(tiny).shape == (224, 224, 3)
