"""Checks ``make serve`` runs before it starts the service, each failing in one line
that says what to do (rather than the traceback ``bentoml serve`` would end with)::

    python -m service.preflight --port 3000

* the port is free: BentoML binds it only after loading the service, and a port
  in use ends in a traceback from its process manager.

Exit status 0 when every check passes, 1 (with the line on stderr) otherwise.
Imports nothing heavy: it runs before every start.
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys

# BentoML's default: every interface.
DEFAULT_HOST = "0.0.0.0"
# How far past a taken port to look for a free one to suggest.
SUGGESTION_RANGE = 20


class PreflightError(RuntimeError):
    """A check failed; the message is the one line to print."""


def port_free(port: int, host: str = DEFAULT_HOST) -> bool:
    """Whether a server could listen on ``host:port`` now (bound the way BentoML binds:
    with ``SO_REUSEADDR``, so a port left in TIME_WAIT counts as free). Another reason
    not to is a ``PreflightError``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return False
            hint = ": pick a port above 1023 (make serve PORT=3000)" if port < 1024 else ""
            raise PreflightError(
                f"cannot listen on {host}:{port}: {error.strerror}{hint}"
            ) from None
    return True


def check_port(port: int, host: str = DEFAULT_HOST) -> None:
    if not 0 < port < 65536:
        raise PreflightError(
            f"{port} is not a port number: pick one of 1-65535 (make serve PORT=3000)"
        )
    if port_free(port, host):
        return
    candidates = range(port + 1, min(port + SUGGESTION_RANGE, 65536))
    other = next((p for p in candidates if port_free(p, host)), port + 1)
    raise PreflightError(
        f"port {port} is in use (is the service already running?): stop what listens "
        f"there, or pick another port: make serve PORT={other}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="the port to serve on")
    parser.add_argument("--host", default=DEFAULT_HOST, help="the interface (default: all)")
    args = parser.parse_args(argv)
    try:
        check_port(args.port, args.host)
    except PreflightError as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
