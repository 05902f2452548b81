"""The CLI's logging: one handler on the `fmnist` logger, INFO as plain lines on stderr.

Its own module so that processes the CLI starts (`fmnist serve --workers`) set it up the same
way without importing the CLI.
"""

from __future__ import annotations

import logging
import sys


class _Formatter(logging.Formatter):
    """INFO as the plain line the library wrote; warnings and errors say what they are."""

    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        return msg if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {msg}"


def setup_logging(level: int) -> None:
    """One handler on the `fmnist` logger, writing to the current stderr (replaced on each call,
    so main() can run several times in one process, as the tests do)."""
    logger = logging.getLogger("fmnist")
    for h in [h for h in logger.handlers if getattr(h, "fmnist_cli", False)]:
        logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.fmnist_cli = True
    handler.setFormatter(_Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    # Ours alone: some of onnxruntime's modules call logging.basicConfig() when imported (as
    # `fmnist export --int8` does), and every line would then print twice, once through root.
    logger.propagate = False
