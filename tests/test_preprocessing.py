"""Unit tests of the pure preprocessing in models/preprocessing.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.preprocessing import (
    MNIST_MEAN,
    MNIST_STD,
    digit_pixels_from_image,
    digit_tensor_from_image,
    digits_from_generator_output,
    encode_text_arrays,
    encode_texts,
    latent_arrays,
    latent_batch,
    normalize_digits,
    pixels_from_normalized,
)
from models.tokenizer import PAD_ID


def _seven() -> np.ndarray:
    """A hand-drawn 7 as white ink on black, 28×28 uint8, the MNIST convention."""
    canvas = np.zeros((28, 28), dtype=np.uint8)
    canvas[6:9, 8:21] = 255  # the bar
    for row in range(9, 23):  # the stroke down and to the left
        column = 19 - (row - 9) // 2
        canvas[row, column - 1 : column + 2] = 255
    return canvas


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return digit_pixels_from_image(Image.fromarray(_seven()))


def _close(a: np.ndarray, b: np.ndarray, tolerance: float = 0.06) -> bool:
    return float(np.abs(a - b).mean()) < tolerance


def test_output_is_28x28_unit_range_and_centred(reference: np.ndarray) -> None:
    assert reference.shape == (28, 28)
    assert reference.dtype == np.float32
    assert reference.min() >= 0.0 and reference.max() == pytest.approx(1.0)
    rows = np.flatnonzero(reference.max(axis=1) > 0.1)
    cols = np.flatnonzero(reference.max(axis=0) > 0.1)
    # Fitted into the 20×20 box: the longer side spans about 20 pixels.
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 in (19, 20, 21)
    mass = reference.sum()
    centre_row = (reference.sum(axis=1) * np.arange(28)).sum() / mass
    centre_col = (reference.sum(axis=0) * np.arange(28)).sum() / mass
    assert abs(centre_row - 13.5) <= 1.0 and abs(centre_col - 13.5) <= 1.0


def test_tensor_is_normalised_with_mnist_constants(reference: np.ndarray) -> None:
    tensor = digit_tensor_from_image(Image.fromarray(_seven()))
    assert tensor.shape == (1, 28, 28) and tensor.dtype == torch.float32
    expected = (torch.from_numpy(reference) - MNIST_MEAN) / MNIST_STD
    torch.testing.assert_close(tensor[0], expected)


def test_black_on_white_is_inverted(reference: np.ndarray) -> None:
    inverted = Image.fromarray(255 - _seven())
    assert _close(digit_pixels_from_image(inverted), reference)


def test_rgb_on_a_coloured_background(reference: np.ndarray) -> None:
    rgb = np.zeros((28, 28, 3), dtype=np.uint8)
    rgb[...] = (250, 245, 230)  # paper
    rgb[_seven() > 0] = (20, 20, 120)  # blue ink
    assert _close(digit_pixels_from_image(Image.fromarray(rgb)), reference)


@pytest.mark.parametrize("ink", [(0, 0, 0), (255, 255, 255)], ids=["black-ink", "white-ink"])
def test_rgba_with_transparent_background(reference: np.ndarray, ink: tuple[int, int, int]) -> None:
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)
    rgba[..., :3] = ink
    rgba[..., 3] = _seven()  # only the stroke is opaque
    assert _close(digit_pixels_from_image(Image.fromarray(rgba, mode="RGBA")), reference)


def test_sixteen_bit_grayscale(reference: np.ndarray) -> None:
    wide = _seven().astype(np.uint16) * 257
    image = Image.fromarray(wide)
    assert image.mode.startswith("I;16")
    assert _close(digit_pixels_from_image(image), reference)


def test_non_square_and_very_large_images(reference: np.ndarray) -> None:
    big = Image.fromarray(_seven()).resize((28 * 40, 28 * 40), Image.Resampling.NEAREST)
    wide = Image.new("L", (28 * 40 * 3, 28 * 40))
    wide.paste(big, (28 * 40, 0))
    assert _close(digit_pixels_from_image(wide), reference, tolerance=0.08)


def test_palette_and_one_bit_images(reference: np.ndarray) -> None:
    seven = Image.fromarray(_seven())
    assert _close(digit_pixels_from_image(seven.convert("P")), reference)
    assert _close(digit_pixels_from_image(seven.convert("1")), reference)


@pytest.mark.parametrize("size", [(1, 1), (1, 50), (3, 2)])
def test_tiny_images_give_a_valid_frame(size: tuple[int, int]) -> None:
    pixels = digit_pixels_from_image(Image.new("L", size, color=255))
    assert pixels.shape == (28, 28)
    assert np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1


def test_blank_image_is_all_background() -> None:
    assert digit_pixels_from_image(Image.new("RGB", (40, 40), "white")).max() == 0


def test_generator_pixels_round_trip_to_classifier_scale() -> None:
    images = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    pixels = digits_from_generator_output(images)
    torch.testing.assert_close(pixels, torch.tensor([0.0, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(normalize_digits(pixels)[0], torch.tensor(-MNIST_MEAN / MNIST_STD))


def test_normalized_input_maps_back_to_the_pixels_it_came_from(reference: np.ndarray) -> None:
    pixels = digit_pixels_from_image(Image.fromarray(reference))
    shown = pixels_from_normalized(normalize_digits(pixels))
    assert shown.dtype == np.uint8 and shown.shape == (28, 28)
    assert np.abs(shown.astype(np.float32) / 255 - pixels).max() <= 0.5 / 255 + 1e-6
    assert pixels_from_normalized(np.array([-10.0, 10.0])).tolist() == [0, 255]


def test_encode_texts_pads_and_records_lengths() -> None:
    ids, lengths = encode_texts([[5, 6, 7], [8], []])
    assert ids.dtype == torch.int64 and lengths.tolist() == [3, 1, 1]
    assert ids.tolist() == [[5, 6, 7], [8, PAD_ID, PAD_ID], [PAD_ID, PAD_ID, PAD_ID]]


def test_latent_batch_is_reproducible_and_respects_digit() -> None:
    latent_a, labels_a = latent_batch(16, 8, seed=3)
    latent_b, labels_b = latent_batch(16, 8, seed=3)
    torch.testing.assert_close(latent_a, latent_b)
    assert torch.equal(labels_a, labels_b) and labels_a.min() >= 0 and labels_a.max() <= 9
    other, _ = latent_batch(16, 8, seed=4)
    assert not torch.equal(latent_a, other)
    _, fixed = latent_batch(5, 8, seed=3, digit=7)
    assert fixed.tolist() == [7] * 5


def test_the_service_arrays_are_the_training_tensors() -> None:
    latent, labels = latent_arrays(16, 8, seed=3)
    assert latent.dtype == np.float32 and labels.dtype == np.int64 and latent.shape == (16, 8)
    tensors = latent_batch(16, 8, seed=3)
    assert np.array_equal(tensors[0].numpy(), latent) and np.array_equal(tensors[1], labels)
    ids, lengths = encode_text_arrays([[5, 6, 7], [8], []])
    expected_ids, expected_lengths = encode_texts([[5, 6, 7], [8], []])
    assert np.array_equal(lengths, expected_lengths.numpy())
    assert np.array_equal(ids, expected_ids.numpy()) and lengths.tolist() == [3, 1, 1]
    assert ids.dtype == np.int64 and lengths.dtype == np.int64
    pixels = digits_from_generator_output(np.array([-1.0, 0.0, 1.0, 2.0], dtype=np.float32))
    assert pixels.dtype == np.float32 and pixels.tolist() == [0.0, 0.5, 1.0, 1.0]
