"""The web page at ``/ui``: draw a digit, type a review, generate digits.

Plain HTML, CSS and JavaScript in ``service/ui/`` (no build step, nothing
fetched from elsewhere, so it works offline), served by the service itself: a
Starlette ``StaticFiles`` app mounted with BentoML's public ``asgi_app``
decorator. The page calls the service's own API routes (``/classify``,
``/classify_input``, ``/sentiment``, ``/generate``) on the same origin.
``/ui`` itself is redirected to ``/ui/`` by BentoML's router (Starlette's
``redirect_slashes``), so that the page's relative links resolve.
"""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

PAGE_PATH = "/ui"
PAGE_DIR = Path(__file__).with_name("ui")


def page_app() -> Starlette:
    """The ASGI app that serves ``service/ui/`` (``index.html`` at its root)."""
    if not (PAGE_DIR / "index.html").is_file():
        raise FileNotFoundError(f"the web page is missing: no {PAGE_DIR / 'index.html'}")
    return Starlette(routes=[Mount("/", app=StaticFiles(directory=PAGE_DIR, html=True))])
