"""The data set files are read by their headers: GLUE's own SST-2 layout is read
correctly, an unlabelled split is refused, and the shared copies read in full."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.sources import DataFormatError, read_sst2_rows


def _write(root: Path, split: str, text: str) -> Path:
    (root / "SST-2").mkdir(parents=True, exist_ok=True)
    (root / "SST-2" / f"{split}.tsv").write_text(text, encoding="utf-8")
    return root


def test_the_label_and_text_columns_are_found_by_name_in_either_order(tmp_path):
    ours = _write(tmp_path / "ours", "dev", "label\tcontent\n1\ta fine film .\n0\tdull .\n")
    glue = _write(tmp_path / "glue", "dev", "sentence\tlabel\na fine film .\t1\ndull .\t0\n")
    expected = [(1, "a fine film ."), (0, "dull .")]
    assert read_sst2_rows(ours, "dev") == expected
    assert read_sst2_rows(glue, "dev") == expected


def test_glue_s_unlabelled_test_split_is_refused_not_mislabelled(tmp_path):
    root = _write(tmp_path, "test", "index\tsentence\n0\tuneasy mishmash .\n1\tbrilliant .\n")
    with pytest.raises(DataFormatError, match=r"test\.tsv: no 'label' column.*unlabelled"):
        read_sst2_rows(root, "test")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("label\tsentence\n2\tsomething .\n", r"test\.tsv:2: label '2', expected 0 or 1"),
        ("label\tsentence\n1\ttoo\tmany\n", r"test\.tsv:2: 3 fields, the header has 2"),
        ("label\treview\n1\tgood .\n", r"no text column"),
    ],
)
def test_malformed_rows_name_the_file_and_line(tmp_path, content, message):
    with pytest.raises(DataFormatError, match=message):
        read_sst2_rows(_write(tmp_path, "test", content), "test")


def test_the_shared_copies_read_in_full(data_dir):
    sizes = {split: len(read_sst2_rows(data_dir, split)) for split in ("train", "dev", "test")}
    assert sizes == {"train": 67_349, "dev": 872, "test": 1_821}
    assert {label for label, _ in read_sst2_rows(data_dir, "dev")} == {0, 1}
