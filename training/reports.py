"""PNG training reports shared by the training scripts.

* ``plot_curves``: one panel per metric family (loss, accuracy, ...) with a line
  per series, e.g. ``{"train_loss": [...], "validation_loss": [...]}``.
* ``save_report``: training curves beside a labelled confusion matrix or a grid of
  ``28×28`` samples (one row per digit), in one PNG.

Matplotlib runs on the non-interactive Agg backend, so reports are written on
machines without a display.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes

Panel = Callable[[Axes], None]


def _family(series_name: str) -> str:
    """``"train_loss"`` and ``"validation_loss"`` share the panel ``"loss"``."""
    return series_name.rsplit("_", 1)[-1]


def draw_curves(axes: Sequence[Axes], history: Mapping[str, Sequence[float]]) -> None:
    """Draw each metric family of ``history`` on its own axes (as many as families)."""
    families: dict[str, list[str]] = {}
    for name in history:
        families.setdefault(_family(name), []).append(name)
    for ax, (family, names) in zip(axes, families.items(), strict=False):
        for name in names:
            values = list(history[name])
            ax.plot(
                range(1, len(values) + 1),
                values,
                marker="o" if len(values) < 30 else None,
                markersize=3,
                label=name,
            )
        ax.set_title(family)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


def curve_families(history: Mapping[str, Sequence[float]]) -> int:
    return len({_family(name) for name in history})


def plot_curves(history: dict[str, list[float]], path: Path, title: str) -> Path:
    """Write one PNG with a panel per metric family (series named ``<split>_<metric>``)."""
    panels = max(1, curve_families(history))
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    draw_curves(axes[0], history)
    figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, path)


def draw_confusion_matrix(ax: Axes, matrix: np.ndarray, labels: Sequence[str]) -> None:
    """Counts with true labels on rows, predictions on columns; the diagonal is dimmed
    by a log colour scale so that the few errors stay visible."""
    matrix = np.asarray(matrix)
    ax.imshow(np.log1p(matrix), cmap="Blues")
    ticks = range(len(labels))
    ax.set_xticks(ticks, labels)
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = np.log1p(matrix.max()) / 2 if matrix.size else 0
    for row in ticks:
        for col in ticks:
            count = int(matrix[row, col])
            if count:
                ax.text(
                    col,
                    row,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if np.log1p(count) > threshold else "black",
                )
    ax.set_title(f"confusion matrix (accuracy {np.trace(matrix) / max(matrix.sum(), 1):.2%})")


def draw_digit_grid(ax: Axes, images: np.ndarray, row_labels: Sequence[str]) -> None:
    """``images``: ``rows×cols×H×W`` pixels in ``[0, 1]``, white ink on black."""
    rows, cols, height, width = images.shape
    mosaic = images.transpose(0, 2, 1, 3).reshape(rows * height, cols * width)
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([height * r + height / 2 - 0.5 for r in range(rows)], row_labels)
    ax.set_xticks([])
    ax.set_title("samples, one row per digit")


def save_report(
    path: Path,
    title: str,
    history: Mapping[str, Sequence[float]],
    extra_panels: Sequence[Panel] = (),
) -> Path:
    """Curves (one panel per metric family) followed by ``extra_panels``, in one row."""
    curves = max(1, curve_families(history))
    panels = curves + len(extra_panels)
    widths = [4.5] * curves + [6.0] * len(extra_panels)
    figure, axes = plt.subplots(
        1,
        panels,
        figsize=(sum(widths), 5.5),
        squeeze=False,
        gridspec_kw={"width_ratios": widths},
    )
    draw_curves(axes[0][:curves], history)
    for ax, draw in zip(axes[0][curves:], extra_panels, strict=True):
        draw(ax)
    figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, path)


def _save(figure: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
