"""Pure preprocessing shared by training-time evaluation and the service.

* ``digit_tensor_from_image``: any PIL image → a normalised ``1×28×28`` float
  tensor in MNIST's convention (white digit on black, fitted into a 20×20 box
  and centred by its centre of mass in a 28×28 frame, as MNIST was made).
* ``digit_pixels_from_images``: the same for many images at once, with the
  same result, several times cheaper per image (the service's path).
* ``normalize_digits`` / ``pixels_from_normalized`` /
  ``digits_from_generator_output``: the pixel conventions that link the data
  set, the classifier and the generator.
* ``encode_text_arrays`` / ``encode_texts``: tokenised texts → padded ids +
  lengths, as arrays (the service) or tensors (training).
* ``latent_arrays`` / ``latent_batch``: reproducible latent vectors and labels
  from a seed, as arrays or tensors.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from PIL import Image

from models.tokenizer import PAD_ID

# torch is imported only by the functions that build tensors, for training: the
# service runs on the NumPy functions, so that the serving parent process and the
# ONNX-only image never import it.
if TYPE_CHECKING:
    import torch

ArrayT = TypeVar("ArrayT", "torch.Tensor", np.ndarray)

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
CANVAS_SIDE = 28
DIGIT_BOX_SIDE = 20
# Decode at most this many pixels per side before the float work; a 20-pixel
# digit box loses nothing, and a huge upload costs no more than a small one.
WORKING_SIDE = 256
# A pixel counts as ink once it is this far from the background (0..1 scale).
INK_THRESHOLD = 0.1


def normalize_digits(pixels: ArrayT) -> ArrayT:
    """Pixels in ``[0, 1]`` (white ink on black) → the classifier's input scale (a tensor
    or an array)."""
    return (pixels - MNIST_MEAN) / MNIST_STD


def pixels_from_normalized(digits: np.ndarray) -> np.ndarray:
    """The classifier's input scale → uint8 pixels (0..255), to show what it was given."""
    pixels = np.clip(np.asarray(digits, dtype=np.float32) * MNIST_STD + MNIST_MEAN, 0, 1)
    return np.round(pixels * 255).astype(np.uint8)


def digits_from_generator_output(images: ArrayT) -> ArrayT:
    """Generator output in ``[-1, 1]`` → pixels in ``[0, 1]`` (a tensor or an array)."""
    return ((images + 1) / 2).clip(0, 1)


def _grayscale_unit(image: Image.Image) -> np.ndarray:
    """Any mode → a float32 ``H×W`` array in ``[0, 1]``, alpha composited away."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float32)
        if image.mode != "F" or values.max(initial=0) > 1:
            values = values / (65535.0 if values.max(initial=0) > 255 else 255.0)
        return np.clip(values, 0, 1)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        gray = np.asarray(rgba.convert("L"), dtype=np.float32) / 255.0
        if alpha.min() < 1.0:
            # Put the drawing on a background of the opposite brightness, so
            # black-on-transparent and white-on-transparent both stay visible.
            ink = (gray * alpha).sum() / max(alpha.sum(), 1e-6)
            background = 1.0 if ink < 0.5 else 0.0
            return gray * alpha + background * (1 - alpha)
        return gray
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def shrink_to_working_size(image: Image.Image) -> Image.Image:
    """At most ``WORKING_SIDE`` pixels per side (box filter); smaller images unchanged.

    The service calls this right after decoding a large upload, so that only the
    small copy outlives the decode; preprocessing then finds nothing to shrink.
    """
    if max(image.size) <= WORKING_SIDE:
        return image
    if image.mode == "1":
        image = image.convert("L")  # what RGBA would give, in a quarter of the memory
    elif image.mode in ("I;16", "I;16B", "I;16L", "I", "F", "P"):
        image = image.convert("F" if image.mode.startswith("I") or image.mode == "F" else "RGBA")
    scale = WORKING_SIDE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BOX)


def _white_ink_on_black(gray: np.ndarray) -> np.ndarray:
    """Decide polarity from the border, subtract the background, stretch ink to 1."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    ink = gray - background if background < 0.5 else background - gray
    ink = np.clip(ink, 0, None)
    peak = ink.max(initial=0)
    return ink / peak if peak > 0 else ink


def _fit_into_box(ink: np.ndarray) -> np.ndarray:
    """A white-on-black ``H×W`` drawing → its 28×28 MNIST placement."""
    marked = ink > INK_THRESHOLD
    rows, cols = np.flatnonzero(marked.any(axis=1)), np.flatnonzero(marked.any(axis=0))
    if rows.size == 0:
        return np.zeros((CANVAS_SIDE, CANVAS_SIDE), dtype=np.float32)
    if max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 == DIGIT_BOX_SIDE:
        boxes = np.array([[rows[0], rows[-1], cols[0], cols[-1]]])
        return _place_box_sized(ink[np.newaxis], boxes)[0]
    return _centre_by_mass(_resize_into_box(ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]))


def _resize_into_box(crop: np.ndarray) -> np.ndarray:
    scale = DIGIT_BOX_SIDE / max(crop.shape)
    height = max(1, round(crop.shape[0] * scale))
    width = max(1, round(crop.shape[1] * scale))
    resized = Image.fromarray(crop.astype(np.float32), mode="F").resize(
        (width, height), Image.Resampling.BILINEAR if scale > 1 else Image.Resampling.BOX
    )
    return np.clip(np.asarray(resized, dtype=np.float32), 0, 1)


def _centre_by_mass(digit: np.ndarray) -> np.ndarray:
    canvas = np.zeros((CANVAS_SIDE, CANVAS_SIDE), dtype=np.float32)
    height, width = digit.shape
    mass = digit.sum()
    if mass <= 0:
        return canvas
    centre_row = (digit.sum(axis=1) * np.arange(height)).sum() / mass
    centre_col = (digit.sum(axis=0) * np.arange(width)).sum() / mass
    top = round(float(CANVAS_SIDE / 2 - 0.5 - centre_row))
    left = round(float(CANVAS_SIDE / 2 - 0.5 - centre_col))
    # Clip the placement so the digit never leaves the frame.
    top = min(max(top, 0), CANVAS_SIDE - height)
    left = min(max(left, 0), CANVAS_SIDE - width)
    canvas[top : top + height, left : left + width] = digit
    return canvas


def _place_box_sized(ink: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """``_centre_by_mass`` for drawings whose bounding box is already box-sized, many at once.

    ``ink`` is ``N×H×W``; ``boxes`` holds each drawing's first and last ink row and
    column. A box-sized crop needs no resize (Pillow's resize to the same size is a
    copy), so only the centres of mass are computed, for the whole stack at once and
    with the same float32 sums for one drawing as for many; each box is then copied
    into place. Every MNIST digit takes this path.
    """
    count, height, width = ink.shape
    top, bottom, left, right = (boxes[:, i, np.newaxis] for i in range(4))
    row_index, col_index = np.arange(height), np.arange(width)
    in_box = ((row_index >= top) & (row_index <= bottom))[:, :, np.newaxis] & (
        (col_index >= left) & (col_index <= right)
    )[:, np.newaxis, :]
    digit = np.where(in_box, ink, np.float32(0))
    mass = digit.sum(axis=(1, 2))
    centre_row = (digit.sum(axis=2) * (row_index - top)).sum(axis=1) / mass
    centre_col = (digit.sum(axis=1) * (col_index - left)).sum(axis=1) / mass
    # The same placement as _centre_by_mass: rounded, clipped so the digit stays in frame.
    box_height, box_width = bottom[:, 0] - top[:, 0] + 1, right[:, 0] - left[:, 0] + 1
    place_top = np.clip(np.round(CANVAS_SIDE / 2 - 0.5 - centre_row), 0, CANVAS_SIDE - box_height)
    place_left = np.clip(np.round(CANVAS_SIDE / 2 - 0.5 - centre_col), 0, CANVAS_SIDE - box_width)
    canvas = np.zeros((count, CANVAS_SIDE, CANVAS_SIDE), dtype=np.float32)
    placements = zip(
        place_top.astype(int).tolist(), place_left.astype(int).tolist(), boxes.tolist(), strict=True
    )
    for k, (row, col, (first_row, last_row, first_col, last_col)) in enumerate(placements):
        box = digit[k, first_row : last_row + 1, first_col : last_col + 1]
        canvas[k, row : row + box.shape[0], col : col + box.shape[1]] = box
    return canvas


def digit_pixels_from_image(image: Image.Image) -> np.ndarray:
    """Any image → ``28×28`` float32 pixels in ``[0, 1]``, MNIST style (before normalisation)."""
    gray = _grayscale_unit(shrink_to_working_size(image))
    return _fit_into_box(_white_ink_on_black(gray))


def digit_pixels_from_images(images: Sequence[Image.Image]) -> np.ndarray:
    """Many images → ``N×28×28`` float32 pixels, each exactly ``digit_pixels_from_image``.

    Plain grayscale images of one size (the usual upload: a scan, a canvas
    export, an MNIST digit) take the whole-array route: decoding to floats,
    polarity, background and contrast, and the bounding boxes are computed for
    the group at once, leaving only the crop, resize and placement per image.
    Everything else goes through the single-image function.
    """
    pixels = np.empty((len(images), CANVAS_SIDE, CANVAS_SIDE), dtype=np.float32)
    same_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, image in enumerate(images):
        if image.mode == "L" and max(image.size) <= WORKING_SIDE:
            same_size[image.size].append(index)
        else:
            pixels[index] = digit_pixels_from_image(image)
    for indices in same_size.values():
        gray = np.stack([np.asarray(images[i]) for i in indices]).astype(np.float32) / 255.0
        ink = _white_ink_on_black_batch(gray)
        marked = ink > INK_THRESHOLD
        rows_marked, cols_marked = marked.any(axis=2), marked.any(axis=1)
        top, bottom = _first_and_last(rows_marked)
        left, right = _first_and_last(cols_marked)
        box_sized = rows_marked.any(axis=1) & (
            np.maximum(bottom - top, right - left) + 1 == DIGIT_BOX_SIDE
        )
        if box_sized.any():
            boxes = np.stack([top, bottom, left, right], axis=1)[box_sized]
            placed = _place_box_sized(ink[box_sized], boxes)
            pixels[np.asarray(indices)[box_sized]] = placed
        for k in np.flatnonzero(~box_sized):
            pixels[indices[k]] = _fit_into_box(ink[k])
    return pixels


def _white_ink_on_black_batch(gray: np.ndarray) -> np.ndarray:
    """``_white_ink_on_black`` over an ``N×H×W`` stack, image by image, in one pass."""
    border = np.concatenate([gray[:, 0], gray[:, -1], gray[:, :, 0], gray[:, :, -1]], axis=1)
    background = np.median(border, axis=1)[:, None, None]
    ink = np.where(background < 0.5, gray - background, background - gray)
    ink = np.clip(ink, 0, None)
    peak = ink.max(axis=(1, 2), keepdims=True)
    return np.divide(ink, peak, out=ink, where=peak > 0)


def _first_and_last(marked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a boolean ``N×L`` array: the first and last True position."""
    first = marked.argmax(axis=1)
    last = marked.shape[1] - 1 - marked[:, ::-1].argmax(axis=1)
    return first, last


def digit_tensor_from_image(image: Image.Image) -> torch.Tensor:
    """Any image → the classifier's normalised ``1×28×28`` float32 input."""
    import torch

    pixels = torch.from_numpy(digit_pixels_from_image(image))
    return normalize_digits(pixels).unsqueeze(0)


def encode_text_arrays(id_sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Id lists → (``N×T`` int64 ids padded with ``PAD_ID``, ``N`` int64 lengths).

    An empty sequence is encoded as one padding token with length 1, so every
    row has a valid position to pool over; callers reject empty text earlier.
    """
    lengths = np.array([max(1, len(ids)) for ids in id_sequences], dtype=np.int64)
    token_ids = np.full((len(id_sequences), int(lengths.max())), PAD_ID, dtype=np.int64)
    for row, ids in enumerate(id_sequences):
        token_ids[row, : len(ids)] = ids
    return token_ids, lengths


def encode_texts(id_sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode_text_arrays`` as tensors, for training and evaluation."""
    import torch

    token_ids, lengths = encode_text_arrays(id_sequences)
    return torch.from_numpy(token_ids), torch.from_numpy(lengths)


def latent_arrays(
    count: int, latent_dim: int, seed: int, digit: int | None = None, num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` float32 latent vectors and int64 labels, reproducible from ``seed``.

    NumPy's PCG64 generator gives the same numbers on every machine and does not
    need torch, so a seed means the same digits whichever backend serves them (the
    ONNX-only image has no torch). Without ``digit`` the labels are drawn from the
    same generator, after the latent vectors.
    """
    generator = np.random.default_rng(seed)
    latent = generator.standard_normal((count, latent_dim), dtype=np.float32)
    if digit is None:
        labels = generator.integers(0, num_classes, count, dtype=np.int64)
    else:
        labels = np.full(count, digit, dtype=np.int64)
    return latent, labels


def latent_batch(
    count: int, latent_dim: int, seed: int, digit: int | None = None, num_classes: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """``latent_arrays`` as tensors, for training and evaluation."""
    import torch

    latent, labels = latent_arrays(count, latent_dim, seed, digit, num_classes)
    return torch.from_numpy(latent), torch.from_numpy(labels)
