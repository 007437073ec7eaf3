"""Each training script's config is its command line (training/config.py): every
field is an option, a bad value is refused by its flag, and --help shows each
field's help."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from training import gan, mnist, sentiment
from training.common import RunConfig, invoked_with, run_provenance
from training.config import config_command_line, config_parser, config_record, parse_config

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [mnist, sentiment, gan]


def other_value(field: dataclasses.Field, hint) -> object:
    """A value of the field's type that is not its default."""
    if "choices" in field.metadata:
        return next(c for c in field.metadata["choices"] if c != field.default)
    if field.name == "device":
        return "cuda:1"
    kind = hint
    if typing.get_origin(hint) in (typing.Union, type(int | None)):
        kind = next(k for k in typing.get_args(hint) if k is not type(None))
    if kind is bool:
        return not field.default
    if typing.get_origin(kind) is tuple:
        items = [k for k in typing.get_args(kind) if k is not Ellipsis]
        items = items * 2 if len(items) == 1 else items
        return tuple(scalar(item, None, f"{field.name}{i}") for i, item in enumerate(items))
    return scalar(kind, field.default, field.name)


def scalar(kind: type, default, name: str) -> object:
    if kind is Path:
        return Path(f"/tmp/{name}")
    if kind is int:
        return (default or 0) + 3
    if kind is float:
        return (default or 0.0) + 0.125
    raise AssertionError(f"{name}: no sample value for {kind}")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_the_parser_takes_every_field_of_the_config(script):
    config_type = script.TrainConfig
    assert issubclass(config_type, RunConfig)
    hints = typing.get_type_hints(config_type)
    fields = dataclasses.fields(config_type)
    expected = config_type(**{f.name: other_value(f, hints[f.name]) for f in fields})
    argv = config_command_line(expected)
    flags = {arg for arg in argv if arg.startswith("--")}
    assert len(flags) == len(fields)  # every field differs from its default, so each is given
    assert parse_config(config_type, argv) == expected
    assert parse_config(config_type, []) == config_type()


@pytest.mark.parametrize(
    ("script", "argv", "flag"),
    [
        (mnist, ["--lr", "fast"], "--lr"),
        (mnist, ["--epochs", "1.5"], "--epochs"),
        (mnist, ["--canvas-fraction", "most"], "--canvas-fraction"),
        (sentiment, ["--seeds", "0", "one"], "--seeds"),
        (sentiment, ["--min-count"], "--min-count"),
        (gan, ["--betas", "0.5"], "--betas"),
        (gan, ["--dist-backend", "mpi"], "--dist-backend"),
        (gan, ["--device", "gpu"], "--device"),
    ],
)
def test_a_bad_value_is_refused_naming_its_flag(script, argv, flag, capsys):
    with pytest.raises(SystemExit):
        parse_config(script.TrainConfig, argv)
    assert f"argument {flag}" in capsys.readouterr().err


def test_old_flag_names_set_the_declared_fields():
    assert parse_config(mnist.TrainConfig, ["--lr", "0.01"]).max_learning_rate == 0.01
    assert parse_config(gan.TrainConfig, ["--lr", "0.01"]).learning_rate == 0.01
    config = parse_config(sentiment.TrainConfig, ["--seeds", "0", "1", "--teachers", "a", "b"])
    assert config.seeds == (0, 1) and config.teachers == (Path("a"), Path("b"))


def test_a_field_without_help_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Undocumented(RunConfig):
        width: int = 3

    with pytest.raises(TypeError, match=r"Undocumented\.width: no help"):
        config_parser(Undocumented)


def test_epochs_default_to_the_scripts_own_and_one_with_smoke():
    assert mnist.TrainConfig().resolved().epochs == 24
    assert gan.TrainConfig().resolved().epochs == 8
    assert mnist.TrainConfig(smoke=True).resolved().epochs == 1
    assert mnist.TrainConfig(smoke=True, epochs=3).resolved().epochs == 3
    smoke = sentiment.TrainConfig(smoke=True, ema_decay=0.99).resolved()
    assert (smoke.epochs, smoke.min_count, smoke.ema_decay) == (1, 1, 0.9)
    assert sentiment.TrainConfig().resolved().min_count == sentiment.TrainConfig.DEFAULT_MIN_COUNT


def test_settings_leave_out_where_and_how_a_run_happens():
    config = gan.TrainConfig(output_dir=Path("/a"), threads=2, classifier_dir=Path("/c"))
    settings = config.settings()
    assert {"output_dir", "threads", "device", "resume", "classifier_dir"}.isdisjoint(settings)
    assert settings["betas"] == (0.5, 0.999) and settings["data_dir"] == str(config.data_dir)
    record = config_record(config)
    assert record["output_dir"] == "/a" and record["classifier_dir"] == "/c"


def test_the_command_is_the_scripts_when_main_parsed_it_else_the_process(monkeypatch):
    device = torch.device("cpu")
    with invoked_with(["--smoke", "--seed", "3"]):
        assert run_provenance(device)["command"].endswith(" --smoke --seed 3")
    monkeypatch.setattr(sys, "argv", ["pipeline.py", "--quick", "--model", "mnist-cnn"])
    assert run_provenance(device)["command"].endswith(" --quick --model mnist-cnn")


def collapsed(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_help_lists_every_field_with_its_help():
    shown = subprocess.run(
        [sys.executable, "-m", "training.mnist", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    config_type = mnist.TrainConfig
    names = {name: getattr(config_type, name) for name in dir(config_type)}
    for field in dataclasses.fields(config_type):
        flag = field.metadata.get("flag", "--" + field.name.replace("_", "-"))
        assert flag in shown, field.name
        # argparse wraps lines at spaces and hyphens: compare without whitespace.
        help_text = field.metadata["help"].format_map(names).replace("%%", "%")
        assert collapsed(help_text) in collapsed(shown), field.name
    assert "--lr" in shown
    assert collapsed(
        "--epochs EPOCHS passes over the training data (default: 24; 1 with --smoke)"
    ) in (collapsed(shown))
