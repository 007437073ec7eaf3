"""Bounds on the memory that decoding uploads can take, per request and per worker.

A compressed image says nothing about its decoded size: a 1-bit 4096×4096 PNG
is 2 KB on the wire and 16 MB once decoded (64 MB as RGBA). So the decoded
size is counted from each image's header, before its pixels are decompressed:

* ``RequestPixels``: the pixels one request's images decode to, in all; a
  request over its budget fails with ``images_too_large`` for the images beyond
  it, and those are never decoded.
* ``PixelBudget``: the pixels being decoded at once in this worker, across its
  threads; a large image waits for room before it is decoded, so concurrent
  requests cannot add up to more than the budget (one image larger than the
  whole budget is decoded alone).

``return_freed_memory_promptly`` makes freed decode buffers go back to the
operating system at once instead of staying in the allocator's heap.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Iterator

from service.imaging import ImageError

log = logging.getLogger(__name__)

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Buffers from this size up are mapped directly and unmapped when freed.
MMAP_THRESHOLD_BYTES = 1 << 20


class RequestPixels:
    """The decoded pixels of one request's images so far, against its budget."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def charge(self, pixels: int) -> None:
        """Count one image before it is decoded; ``ImageError`` once over the budget."""
        self.used += pixels
        if self.used > self.limit:
            raise ImageError(
                "images_too_large",
                f"the images of this request decode to more than {self.limit} pixels in all "
                "(SERVING_MAX_REQUEST_PIXELS); send fewer or smaller images per request",
            )


class PixelBudget:
    """Pixels being decoded at once in one worker process, shared by its threads."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self._room = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Wait until ``pixels`` fit, hold them for the block, then give them back."""
        pixels = min(pixels, self.limit)  # a single image over the budget runs alone
        with self._room:
            self._room.wait_for(lambda: self._used + pixels <= self.limit)
            self._used += pixels
        try:
            yield
        finally:
            with self._room:
                self._used -= pixels
                self._room.notify_all()


def return_freed_memory_promptly() -> bool:
    """Fix glibc's mmap threshold, so large buffers are returned when freed.

    glibc raises the threshold to the size of each mapped buffer that is freed
    (up to 32 MiB), so after the first large image, decode buffers come from
    the heap of whichever thread decoded them, and the heap keeps them: one
    request of large images left the worker almost 2 GiB larger for good.
    Returns False where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("not glibc: the allocator's defaults stay")
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_BYTES)
    )
