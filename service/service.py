"""The service's entry point for BentoML: ``service.service:ServingService``.

    bentoml serve service.service:ServingService --port 3000

(after ``python -m training.register`` has filled the model store). The routes,
one per task of each model in the registry (``service.tasks``), are documented
with examples on the OpenAPI page at ``/``; the web page is at ``/ui``.

``ServingService`` is built on first access from the environment
(``Settings.from_env``, every variable in ``docs/settings.md``) by
``service.bento.build_service``: importing this module reads, patches and
registers nothing. Code that wants other settings calls ``build_service``
itself, as the tests do.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def _from_environment() -> Any:
    from service.bento import build_service
    from service.settings import Settings, SettingsError

    try:
        settings = Settings.from_env()
    except SettingsError as error:  # a value the operator set: one line naming it
        raise SystemExit(f"cannot start: {error} (the settings: docs/settings.md)") from None
    return build_service(settings)


def __getattr__(name: str) -> Any:
    if name == "ServingService":
        return _from_environment()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
