"""Where the data sets live and how their files are laid out, without torch.

Read by the training code and by the benchmark's load generators, which must
stay light. The layout expected under the data root (``--data-dir``, else
``$DATA_DIR``, else ``../shared/data`` beside the repository)::

    MNIST/raw/train-images-idx3-ubyte   the original IDX files, uncompressed, as
    MNIST/raw/train-labels-idx1-ubyte   torchvision.datasets.MNIST(root) reads them
    MNIST/raw/t10k-images-idx3-ubyte
    MNIST/raw/t10k-labels-idx1-ubyte
    SST-2/train.tsv                     tab-separated, one header row naming the
    SST-2/dev.tsv                       columns: a label column (``label``, 0 or 1)
    SST-2/test.tsv                      and a text column (``sentence``, ``content``
                                        or ``text``), in either order

GLUE's own SST-2 files put the sentence first, and its test split has no labels
(``index``, ``sentence``): the columns are found by name, and a split without
labels is refused with a message rather than read with the wrong column as
labels.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNIST_RAW = Path("MNIST") / "raw"
MNIST_TEST_IMAGES = MNIST_RAW / "t10k-images-idx3-ubyte"
MNIST_FILES = {
    "train": (MNIST_RAW / "train-images-idx3-ubyte", MNIST_RAW / "train-labels-idx1-ubyte"),
    "test": (MNIST_TEST_IMAGES, MNIST_RAW / "t10k-labels-idx1-ubyte"),
}
SST2_SPLITS = ("train", "dev", "test")
SST2_LABEL_COLUMN = "label"
SST2_TEXT_COLUMNS = ("sentence", "content", "text")


class DataFormatError(ValueError):
    """A data file is not laid out as expected; the message names the file and why."""


def default_data_dir() -> Path:
    """``$DATA_DIR`` if set, else ``../shared/data`` beside the repository."""
    return Path(os.environ.get("DATA_DIR", DEFAULT_DATA_DIR))


class MissingDataError(SystemExit):
    """The data root, or a file a command reads from it, is not there. The message is
    one line naming the path tried and how to point at another; uncaught, it ends the
    command with it (exit status 1) instead of a traceback."""


def require_data(data_dir: Path, *files: Path) -> None:
    """Raise ``MissingDataError`` unless ``data_dir`` is a directory holding ``files``
    (paths relative to it)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        problem = f"no data directory at {data_dir}{_data_dir_origin(data_dir)}"
    else:
        missing = [str(name) for name in files if not (data_dir / name).is_file()]
        if not missing:
            return
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        problem = f"no {missing[0]}{more} in {data_dir}{_data_dir_origin(data_dir)}"
    raise MissingDataError(
        f"{problem}: point --data-dir or DATA_DIR at the directory that holds MNIST/ "
        "and SST-2/ (layout: training/sources.py)"
    )


def _data_dir_origin(data_dir: Path) -> str:
    """Where the path came from, when it is not an explicit ``--data-dir``."""
    if os.environ.get("DATA_DIR") and Path(os.environ["DATA_DIR"]) == data_dir:
        return " (from DATA_DIR)"
    if "DATA_DIR" not in os.environ and data_dir == DEFAULT_DATA_DIR:
        return " (the default: DATA_DIR is not set)"
    return ""


def sst2_path(data_dir: Path, split: str) -> Path:
    if split not in SST2_SPLITS:
        raise ValueError(f"unknown SST-2 split {split!r}; expected one of {SST2_SPLITS}")
    return Path(data_dir) / "SST-2" / f"{split}.tsv"


def read_sst2_rows(data_dir: Path, split: str) -> list[tuple[int, str]]:
    """(label, text) of every row of ``SST-2/<split>.tsv``, columns found by header name."""
    path = sst2_path(data_dir, split)
    require_data(data_dir, path.relative_to(data_dir))
    with path.open(newline="", encoding="utf-8") as stream:
        reader = csv.reader(stream, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = [name.strip().lower() for name in next(reader, [])]
        text_column = next((header.index(n) for n in SST2_TEXT_COLUMNS if n in header), None)
        if text_column is None:
            raise DataFormatError(
                f"{path}: no text column in the header {header}; expected one of "
                f"{', '.join(SST2_TEXT_COLUMNS)}"
            )
        if SST2_LABEL_COLUMN not in header:
            raise DataFormatError(
                f"{path}: no {SST2_LABEL_COLUMN!r} column in the header {header}; GLUE's "
                "SST-2 test split is unlabelled: use a labelled test split (0/1 labels)"
            )
        label_column = header.index(SST2_LABEL_COLUMN)
        rows = []
        for line, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise DataFormatError(
                    f"{path}:{line}: {len(row)} fields, the header has {len(header)}"
                )
            label = row[label_column].strip()
            if label not in ("0", "1"):
                raise DataFormatError(f"{path}:{line}: label {label!r}, expected 0 or 1")
            rows.append((int(label), row[text_column]))
    return rows
