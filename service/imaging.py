"""Image bytes in and out: safe decoding of uploads, PNG encoding of generated digits.

Decoding is split in two so that a hostile upload costs little:

* ``open_image`` parses only the header: the format must be PNG, JPEG, GIF,
  BMP or WebP, and width × height must be within the pixel limit. This runs
  before any pixel is decompressed, so a decompression bomb (a tiny file that
  declares a huge canvas) is refused without being expanded.
* ``load_image`` decompresses the first frame; truncated or corrupt data fails
  here. Large JPEGs are decoded at a reduced scale (the classifier's
  preprocessing shrinks every image to at most ``WORKING_SIDE`` pixels anyway).

Both raise ``ImageError`` with a machine-readable type and a message that
names the problem; nothing here knows about HTTP.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.preprocessing import WORKING_SIDE

SUPPORTED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")
SUPPORTED_TEXT = "PNG, JPEG, GIF, BMP or WebP"

# The service enforces its own, lower pixel limit in open_image, before any
# decompression; Pillow's warning for large images would only add log noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageError(ValueError):
    def __init__(self, type_: str, message: str) -> None:
        super().__init__(message)
        self.type = type_
        self.message = message


def open_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Identify the image and check its size from the header; pixels stay compressed."""
    if not data:
        raise ImageError("empty_file", "the uploaded file is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError:
        raise ImageError("invalid_image", f"not a {SUPPORTED_TEXT} image") from None
    except Image.DecompressionBombError:
        raise ImageError(
            "image_too_large", f"the image is larger than the limit of {max_pixels} pixels"
        ) from None
    except Exception as error:  # Pillow's plugins raise many types for a broken header
        raise ImageError("invalid_image", f"unreadable image header ({error})") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError("invalid_image", f"the image has no pixels ({width}×{height})")
    if width * height > max_pixels:
        raise ImageError(
            "image_too_large",
            f"{width}×{height} = {width * height} pixels is more than the limit of {max_pixels}",
        )
    return image


def decoded_pixels(image: Image.Image) -> int:
    """The pixels ``load_image`` will decompress, known from the header alone.

    A large JPEG is first set to decode at a reduced scale (DCT scaling: 1/2,
    1/4 or 1/8, never below ``WORKING_SIDE``), which Pillow reflects in ``size``.
    """
    if image.format == "JPEG" and max(image.size) > 2 * WORKING_SIDE:
        image.draft(image.mode, (WORKING_SIDE, WORKING_SIDE))
    return image.width * image.height


def load_image(image: Image.Image) -> Image.Image:
    """Decompress the first frame; a corrupt or truncated file raises ``ImageError``."""
    decoded_pixels(image)
    try:
        image.load()
    except Exception as error:  # OSError for truncation, SyntaxError/ValueError for corruption
        raise ImageError(
            "corrupt_image", f"the {image.format} data is truncated or corrupt ({error})"
        ) from None
    return image


# zlib's fastest level: a 16-digit grid encodes in 0.11 ms instead of 0.24 ms at
# Pillow's default (6) (python -m bench.micro), for a file 12 % larger (6.8 kB
# instead of 6.0 kB); the encoding was 15 % of the worker's CPU samples under
# /generate n=16 load (docs/benchmarks.md).
PNG_COMPRESS_LEVEL = 1


def encode_png(pixels: np.ndarray) -> bytes:
    """A ``H×W`` uint8 array → grayscale PNG bytes (deterministic for equal input)."""
    buffer = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def grid_png(tiles: Sequence[np.ndarray], *, padding: int = 2) -> bytes:
    """Equal-size uint8 tiles → one PNG, laid out in a near-square grid, row by row."""
    return encode_png(grid_canvas(tiles, padding=padding))


def grid_canvas(tiles: Sequence[np.ndarray], *, padding: int = 2) -> np.ndarray:
    """Equal-size uint8 tiles → one uint8 image of them in a near-square grid, row by row."""
    count = len(tiles)
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    height, width = tiles[0].shape
    canvas = np.zeros(
        (rows * height + (rows + 1) * padding, columns * width + (columns + 1) * padding),
        dtype=np.uint8,
    )
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        top = padding + row * (height + padding)
        left = padding + column * (width + padding)
        canvas[top : top + height, left : left + width] = tile
    return canvas
