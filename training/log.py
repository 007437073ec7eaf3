"""The one logging set-up of every training, export and registration command."""

from __future__ import annotations

import logging

# The ONNX toolchain logs every optimisation pass at INFO.
QUIET_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")


def configure_logging() -> None:
    """INFO for this project, with time and source; the toolchain's chatter stays quiet."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
