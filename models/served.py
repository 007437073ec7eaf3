"""The model versions the service serves: ``models/served_models.json``.

One file names, for each model, the exact model store tag to serve
(``<registry name>:<content version>``). ``training.register`` writes it when it
registers the released artifacts; the service and the bento read it, and nothing
else of the artifacts tree. It lives in ``models/`` because both rooms above use
it: training writes the pins, serving reads them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

SERVED_MODELS_FILE = Path(__file__).resolve().with_name("served_models.json")


class ServedModelsError(ValueError):
    """The file of served versions cannot be read; the message names it."""


def served_tags(path: Path | None = None) -> dict[str, str]:
    """Registry name → the pinned store tag (none pinned when the file does not exist)."""
    path = path or SERVED_MODELS_FILE
    if not path.is_file():
        return {}
    try:
        tags = json.loads(path.read_text())
    except ValueError as error:
        raise ServedModelsError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(tags, dict) or not all(
        isinstance(tag, str) and tag.startswith(f"{name}:") for name, tag in tags.items()
    ):
        raise ServedModelsError(f'{path} must map each model name to "<name>:<version>"')
    return tags


def pin_served_tags(tags: Iterable[str], path: Path | None = None) -> bool:
    """Record these tags as the served versions of their models, keeping the others'.

    The file is rewritten only when a pin changes (so that registering the same
    release again leaves the checkout clean); returns whether it changed.
    """
    path = path or SERVED_MODELS_FILE
    current = served_tags(path)
    pinned = {**current, **{str(tag).partition(":")[0]: str(tag) for tag in tags}}
    if pinned == current:
        return False
    path.write_text(json.dumps(dict(sorted(pinned.items())), indent=2) + "\n")
    return True
