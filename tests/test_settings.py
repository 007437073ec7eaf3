"""Each setting is declared once (``service.settings.DECLARED``): the parser reads
exactly the declared variables, every bad value is refused with a message naming
its variable, and the committed reference (docs/settings.md) is the one the
declarations generate, so a changed default or a new setting fails here until the
reference is regenerated."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from service.settings import (
    DECLARED,
    PREFIX,
    RENAMED_MODEL_SETTINGS,
    ConnectionLimits,
    Limits,
    Settings,
    SettingsError,
    endpoints,
    reference,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE = REPO_ROOT / "docs" / "settings.md"


class RecordingEnviron(dict):
    """An environment that remembers every variable the settings look up."""

    def __init__(self, values: dict | None = None) -> None:
        super().__init__(values or {})
        self.asked: set[str] = set()

    def get(self, key, default=None):
        self.asked.add(key)
        return super().get(key, default)

    def __contains__(self, key) -> bool:
        self.asked.add(key)
        return super().__contains__(key)


def declared_variables() -> set[str]:
    return {PREFIX + name for setting in DECLARED for name in setting.names()}


def test_the_parser_reads_exactly_the_declared_variables():
    environ = RecordingEnviron()
    Settings.from_env(environ)
    assert environ.asked - set(RENAMED_MODEL_SETTINGS) == declared_variables()
    assert {f"{PREFIX}{e.upper()}_MAX_BATCH_SIZE" for e in endpoints()} <= environ.asked


def test_every_value_holding_field_comes_from_one_declaration():
    names = {setting.name.lower() for setting in DECLARED}
    for cls in (Limits, ConnectionLimits):
        assert {f.name for f in fields(cls)} <= names, cls
    per_model = {s.name.removeprefix("<ENDPOINT>_").lower() for s in DECLARED if s.per_model}
    assert per_model == {"backend", "precision", "tag", "max_batch_size", "max_latency_ms"}


def test_the_committed_reference_is_the_generated_one():
    assert REFERENCE.read_text() == reference(), (
        "docs/settings.md is stale: run `python -m service.settings > docs/settings.md`"
    )


def test_the_reference_shows_every_variable_with_its_default():
    text = reference()
    for setting in DECLARED:
        row = next(line for line in text.splitlines() if f"`{PREFIX}{setting.name}`" in line)
        if isinstance(setting.default, int) and not isinstance(setting.default, bool):
            assert f"{setting.default:,}" in row or str(setting.default) in row, row


def bad_values(setting) -> list[tuple[str, str]]:
    """(value, what the refusal says) for a value of this kind the service cannot use."""
    if setting.kind in ("int", "number"):
        cases = [("many", "expected an integer" if setting.kind == "int" else "expected a number")]
        if setting.minimum is not None:
            below = setting.minimum - 1 if setting.kind == "int" else setting.minimum - 0.5
            cases.append((str(int(below) if setting.kind == "int" else below), "at least"))
        return cases
    if setting.kind == "choice":
        return [("sideways", "expected one of")]
    if setting.kind == "flag":
        return [("maybe", "expected on or off")]
    if setting.kind == "device":
        return [("tpu", "expected auto, cpu, cuda or cuda:N")]
    return []  # free text: any value is accepted


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (PREFIX + setting.names()[-1], value, message)
        for setting in DECLARED
        for value, message in bad_values(setting)
    ],
)
def test_a_bad_value_is_refused_naming_its_variable(variable, value, message):
    with pytest.raises(SettingsError, match=re.escape(variable)) as refusal:
        Settings.from_env({variable: value})
    assert message in str(refusal.value)


def test_the_readme_points_to_the_reference_instead_of_repeating_it():
    readme = (REPO_ROOT / "README.md").read_text()
    assert "(docs/settings.md)" in readme


def test_defaults_quoted_in_the_docs_are_the_declared_ones():
    """Prose may quote a default, as "`SERVING_MAX_QUEUE_ITEMS` (4096)": it must be right."""
    defaults = {PREFIX + s.name: s.default for s in DECLARED if isinstance(s.default, int | float)}
    quoted = re.compile(r"`(SERVING_[A-Z_]+)` \((\d[\d,.]*)[,)]")
    checked = 0
    for path in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        for variable, value in quoted.findall(path.read_text()):
            if variable in defaults and not isinstance(defaults[variable], bool):
                assert float(value.replace(",", "")) == defaults[variable], (path.name, variable)
                checked += 1
    assert checked >= 8  # the tables of docs/operations.md, at least


def test_serving_defaults_come_from_each_model_s_spec():
    from models.registry import REGISTRY
    from service.settings import model_keys, resolve_backend

    settings = Settings.from_env({})
    for device_type in ("cpu", "cuda"):
        batching = settings.resolve_batching(device_type)
        for endpoint, name in model_keys().items():
            serving = REGISTRY[name].serving
            assert batching[endpoint] == serving.batching[device_type]
            model = settings.models[endpoint]
            assert resolve_backend(model, device_type) == serving.backend[device_type]
    # The LSTM leaves a core to the event loop; the convolutional models use both.
    assert settings.threads_per_model("sentiment", cpu_count=2) == 1
    assert settings.threads_per_model("classify", cpu_count=2) == 2
