"""``multipart/form-data`` bodies, as a browser or ``curl -F`` sends them.

One encoder for the load generator, the micro-benchmarks and the tests, so that
every one of them sends the service the same wire format.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence

# (field name, file name or None for a plain field, content, part Content-Type or None)
Part = tuple[str, str | None, bytes, str | None]


def multipart_body(parts: Iterable[Part], boundary: str | None = None) -> tuple[bytes, str]:
    """Encode ``parts``; return (body, the request's Content-Type with its boundary)."""
    boundary = boundary or f"form-{secrets.token_hex(12)}"
    chunks: list[bytes] = []
    for field, filename, content, content_type in parts:
        disposition = f'form-data; name="{field}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        chunks.append(head.encode() + b"\r\n" + content + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def file_parts(
    field: str, files: Sequence[bytes], content_type: str | None = "image/png"
) -> list[Part]:
    """Files under one form field, named ``file0``, ``file1``, ..."""
    return [(field, f"file{index}", data, content_type) for index, data in enumerate(files)]
