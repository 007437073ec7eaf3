"""MNIST test digits redrawn as a browser canvas draws them, and the classifier measured on them.

    python -m training.drawn_digits                      # all 10,000 test digits, one drawing each
    python -m training.drawn_digits --limit 2000 --save-examples /tmp/drawn.png

A digit drawn with a mouse or a finger on the web page (``/ui``) differs from
an MNIST scan: the pen is a thick round brush of one width from end to end,
the canvas is much larger than 28×28 and the digit sits wherever the person
put it. To measure that, every MNIST *test* digit is

1. thinned to its one-pixel skeleton (Zhang–Suen), which keeps the shape the
   writer traced and forgets the pen;
2. redrawn on a canvas of one of ``CANVAS_SIDES`` pixels: each pair of
   8-connected skeleton pixels becomes a line with round caps and joins
   (Pillow's ``ImageDraw``, as a canvas ``lineCap = "round"`` stroke), of a
   width from ``STROKE_WIDTHS`` (a fraction of the digit's height), at a size
   and a position drawn at random, off-centre, supersampled and box-filtered
   so the edges are anti-aliased like a canvas. Where the writer inked a
   region solid (a loop filled in, as a small 9 or 8 often is in MNIST), the
   skeleton alone would be a line, and a filled 9 would be redrawn as a 7; so
   wherever the original ink is thicker than the digit's typical stroke, the
   brush is widened by that excess (``stroke_depths``) and the filled region
   stays filled;
3. encoded as a dark-on-light PNG, decoded again, and sent through the
   service's own preprocessing (``models.preprocessing``) and the released
   classifier.

The set is a pure function of ``--seed`` and the MNIST test file. The same
run also reports the classifier on the 10,000 MNIST test images through the
same preprocessing, so the two figures come from one code path. The MNIST
files are read from ``--data-dir`` (default ``$DATA_DIR`` or
``../shared/data``).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from models.preprocessing import digit_pixels_from_images, normalize_digits
from models.registry import MNIST_CLASSIFIER, get_spec
from training.common import default_data_dir
from training.data import mnist_test_set
from training.log import configure_logging

log = logging.getLogger(__name__)

# Canvas sides a page offers on a phone, a laptop and a large screen (CSS pixels).
CANVAS_SIDES = (160, 280, 420)
# Brush width as a fraction of the drawn digit's height: from a fine pen to a fat finger.
STROKE_WIDTHS = (0.06, 0.09, 0.13, 0.18)
# The digit's height as a fraction of the canvas side.
DIGIT_HEIGHTS = (0.35, 0.8)
SUPERSAMPLE = 3
INK_LEVEL = 0.35  # MNIST pixels above this are pen strokes before thinning
BATCH = 500


@dataclass(frozen=True)
class Drawing:
    """How one test digit is redrawn."""

    canvas_side: int
    stroke_width: float
    digit_height: float
    # Where the digit's box sits in the free space around it: 0 = left/top, 1 = right/bottom.
    offset_x: float
    offset_y: float


def skeletons(ink: np.ndarray) -> np.ndarray:
    """Zhang–Suen thinning of a boolean ``N×H×W`` stack, all images at once."""
    image = np.pad(ink.astype(bool), ((0, 0), (1, 1), (1, 1)))
    while True:
        changed = False
        for step in (0, 1):
            p = _neighbours(image)  # P2..P9 clockwise from north
            count = sum(p)
            transitions = sum((~p[i]) & p[(i + 1) % 8] for i in range(8))
            if step == 0:
                first, second = p[0] & p[2] & p[4], p[2] & p[4] & p[6]
            else:
                first, second = p[0] & p[2] & p[6], p[0] & p[4] & p[6]
            remove = image & (count >= 2) & (count <= 6) & (transitions == 1) & ~first & ~second
            if remove.any():
                image &= ~remove
                changed = True
        if not changed:
            return image[:, 1:-1, 1:-1]


def _neighbours(image: np.ndarray) -> list[np.ndarray]:
    padded = np.pad(image, ((0, 0), (1, 1), (1, 1)))
    height, width = image.shape[1:]
    offsets = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))
    return [padded[:, 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width] for dy, dx in offsets]


def stroke_depths(ink: np.ndarray) -> np.ndarray:
    """How deep each ink pixel of a boolean ``N×H×W`` stack lies inside its stroke: the
    number of 3×3 erosions it survives (1 on an edge; the stroke's half-width, in pixels,
    on its centre line)."""
    depth = np.zeros(ink.shape, dtype=np.int16)
    remaining = ink.astype(bool)
    height, width = ink.shape[1:]
    while remaining.any():
        depth += remaining
        padded = np.pad(remaining, ((0, 0), (1, 1), (1, 1)))
        eroded = remaining.copy()
        for dy in range(3):
            for dx in range(3):
                eroded &= padded[:, dy : dy + height, dx : dx + width]
        remaining = eroded
    return depth


def skeleton_segments(skeleton: np.ndarray) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Each pair of 8-connected skeleton pixels once, as ((row, col), (row, col))."""
    points = set(zip(*np.nonzero(skeleton), strict=True))
    segments = []
    for row, col in sorted(points):
        for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):
            if (row + dy, col + dx) in points:
                segments.append(((row, col), (row + dy, col + dx)))
    return segments


def draw(
    skeleton: np.ndarray,
    drawing: Drawing,
    depths: np.ndarray | None = None,
    supersample: int = SUPERSAMPLE,
) -> Image.Image:
    """One skeleton → a dark-on-light ``canvas_side``² grayscale canvas, anti-aliased.

    With ``depths`` (``stroke_depths`` of the ink the skeleton came from), a skeleton
    pixel deeper than the digit's median stroke is drawn with the brush widened by the
    excess, so regions the writer filled in stay filled.
    """
    rows, cols = np.nonzero(skeleton)
    side = drawing.canvas_side * supersample
    height_px = drawing.digit_height * side
    width_px_stroke = max(1.0, drawing.stroke_width * height_px)
    span = max(rows.max() - rows.min(), cols.max() - cols.min(), 1)
    scale = height_px / span
    box_h, box_w = (rows.max() - rows.min()) * scale, (cols.max() - cols.min()) * scale
    radius = width_px_stroke / 2
    radii = np.full(len(rows), radius)
    if depths is not None:
        depth = depths[rows, cols].astype(float)
        radii += np.maximum(depth - np.median(depth), 0) * scale
    margin = radii.max() + supersample
    top = margin + drawing.offset_y * max(side - box_h - 2 * margin, 0)
    left = margin + drawing.offset_x * max(side - box_w - 2 * margin, 0)

    def place(point: tuple[int, int]) -> tuple[float, float]:
        return (left + (point[1] - cols.min()) * scale, top + (point[0] - rows.min()) * scale)

    canvas = Image.new("L", (side, side), 255)
    pen = ImageDraw.Draw(canvas)
    for start, end in skeleton_segments(skeleton):
        pen.line([place(start), place(end)], fill=0, width=round(width_px_stroke))
    for point, r in zip(zip(rows, cols, strict=True), radii, strict=True):  # round caps, joins
        x, y = place(point)
        pen.ellipse([x - r, y - r, x + r, y + r], fill=0)
    return canvas.resize((drawing.canvas_side,) * 2, Image.Resampling.BOX)


def drawings(count: int, seed: int) -> list[Drawing]:
    """Every canvas side and stroke width in turn, sizes and offsets at random."""
    rng = np.random.default_rng(seed)
    combos = [(side, width) for side in CANVAS_SIDES for width in STROKE_WIDTHS]
    return [
        Drawing(
            canvas_side=combos[index % len(combos)][0],
            stroke_width=combos[index % len(combos)][1],
            digit_height=float(rng.uniform(*DIGIT_HEIGHTS)),
            offset_x=float(rng.uniform()),
            offset_y=float(rng.uniform()),
        )
        for index in range(count)
    ]


def as_png_upload(image: Image.Image) -> Image.Image:
    """Through PNG bytes and back, as the page's upload reaches the service."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue()))


def drawn_test_digits(digits: np.ndarray, seed: int = 0) -> Iterator[tuple[Image.Image, Drawing]]:
    """uint8 ``N×28×28`` MNIST digits → their canvas drawings, in order."""
    plans = drawings(len(digits), seed)
    for start in range(0, len(digits), BATCH):
        ink = upsampled(digits[start : start + BATCH]) > INK_LEVEL
        for offset, (skeleton, depths) in enumerate(
            zip(skeletons(ink), stroke_depths(ink), strict=True)
        ):
            plan = plans[start + offset]
            yield as_png_upload(draw(skeleton, plan, depths)), plan


def upsampled(digits: np.ndarray) -> np.ndarray:
    """uint8 ``N×28×28`` → float ``N×56×56`` in [0, 1] (bilinear): thinning at twice the
    resolution keeps small loops and thin joins that a 28-pixel skeleton would cut."""
    return (
        np.stack(
            [
                np.asarray(Image.fromarray(d).resize((56, 56), Image.Resampling.BILINEAR))
                for d in digits
            ]
        )
        / 255.0
    )


class ReleasedClassifier:
    """The released ``mnist-cnn`` behind the service's preprocessing."""

    def __init__(self, artifacts_dir: Path | None = None) -> None:
        spec = get_spec(MNIST_CLASSIFIER)
        self.artifact = spec.load_artifact(spec.artifact_dir(artifacts_dir))
        self.module = spec.load_module(self.artifact)

    @torch.inference_mode()
    def predict(self, images: Sequence[Image.Image]) -> np.ndarray:
        pixels = torch.from_numpy(digit_pixels_from_images(images))
        return self.module(normalize_digits(pixels).unsqueeze(1)).argmax(1).numpy()


def measure(
    data_dir: Path, limit: int | None, seed: int, artifacts_dir: Path | None = None
) -> dict:
    test_set = mnist_test_set(data_dir)
    digits = test_set.data.numpy()[:limit]
    labels = test_set.targets.numpy()[:limit]
    classifier = ReleasedClassifier(artifacts_dir)
    mnist_correct = sum(
        int((classifier.predict([Image.fromarray(d) for d in digits[i : i + BATCH]])
             == labels[i : i + BATCH]).sum())
        for i in range(0, len(digits), BATCH)
    )  # fmt: skip
    correct: list[bool] = []
    plans: list[Drawing] = []
    pending: list[Image.Image] = []
    for image, plan in drawn_test_digits(digits, seed):
        pending.append(image)
        plans.append(plan)
        if len(pending) == BATCH or len(plans) == len(digits):
            start = len(correct)
            predicted = classifier.predict(pending)
            correct.extend((predicted == labels[start : start + len(pending)]).tolist())
            pending = []
    correct_array = np.asarray(correct)

    def accuracy_by(key: str) -> dict[str, float]:
        values = np.asarray([getattr(plan, key) for plan in plans])
        return {
            str(v): round(float(correct_array[values == v].mean()), 4) for v in np.unique(values)
        }

    return {
        "images": len(digits),
        "seed": seed,
        "weights_sha256": classifier.artifact.metadata["files"]["weights.pt"],
        "mnist_test_accuracy": round(mnist_correct / len(digits), 4),
        "drawn_accuracy": round(float(correct_array.mean()), 4),
        "drawn_errors": int((~correct_array).sum()),
        "drawn_accuracy_by_stroke_width": accuracy_by("stroke_width"),
        "drawn_accuracy_by_canvas_side": accuracy_by("canvas_side"),
    }


def save_examples(data_dir: Path, path: Path, seed: int, count: int = 48) -> None:
    """A contact sheet of the first ``count`` drawings (each shrunk to 96²)."""
    digits = mnist_test_set(data_dir).data.numpy()[:count]
    tile = 96
    columns = 12
    sheet = Image.new("L", (columns * tile, -(-count // columns) * tile), 128)
    for index, (image, _) in enumerate(drawn_test_digits(digits, seed)):
        corner = ((index % columns) * tile + 2, (index // columns) * tile + 2)
        sheet.paste(image.resize((tile - 4, tile - 4)), corner)
    sheet.save(path)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--artifacts-dir", type=Path, default=None,
                        help="model artifacts root (default: the released ones)")  # fmt: skip
    parser.add_argument("--limit", type=int, default=None, help="the first N test digits only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-examples", type=Path, default=None,
                        help="also write a PNG contact sheet of the first drawings")  # fmt: skip
    args = parser.parse_args(argv)
    configure_logging()
    if args.save_examples:
        save_examples(args.data_dir, args.save_examples, args.seed)
    result = measure(args.data_dir, args.limit, args.seed, args.artifacts_dir)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
