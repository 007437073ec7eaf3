"""One device choice for training and serving (models.devices)."""

from __future__ import annotations

import pytest

from models.devices import DeviceError, choose_device, valid_device_name


@pytest.mark.parametrize(
    ("requested", "gpus", "expected"),
    [
        ("auto", 0, "cpu"),
        ("auto", 2, "cuda:0"),
        (" CPU ", 4, "cpu"),
        ("cuda", 1, "cuda:0"),
        ("cuda:1", 2, "cuda:1"),
    ],
)
def test_a_device_is_chosen_from_its_name_and_the_gpus_present(requested, gpus, expected):
    assert choose_device(requested, gpus) == expected


@pytest.mark.parametrize(
    ("requested", "gpus", "message"),
    [
        ("cuda", 0, "has 0 usable GPU"),
        ("cuda:1", 1, "has 1 usable GPU"),
        ("tpu", 8, "expected auto, cpu, cuda or cuda:N"),
        ("cuda:x", 1, "expected auto"),
        ("cuda:", 1, "expected auto"),
    ],
)
def test_a_device_that_is_not_there_or_not_a_name_is_refused(requested, gpus, message):
    with pytest.raises(DeviceError, match=message):
        choose_device(requested, gpus)


def test_names_are_normalised():
    assert valid_device_name(" Cuda:3 ") == "cuda:3"


@pytest.mark.parametrize("module", ["training.mnist", "training.sentiment", "training.gan",
                                    "training.pipeline"])  # fmt: skip
def test_training_takes_every_device_name_the_service_takes(module, capsys):
    import importlib

    parser = importlib.import_module(module).build_parser()
    for name in ("auto", "cpu", "cuda", "cuda:1", "CUDA:0"):
        assert parser.parse_args(["--device", name]).device == valid_device_name(name)
    with pytest.raises(SystemExit):
        parser.parse_args(["--device", "gpu"])
    assert "expected auto, cpu, cuda or cuda:N" in capsys.readouterr().err
