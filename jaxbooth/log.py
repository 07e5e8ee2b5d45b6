"""One log format for everything jaxbooth says: ``[jaxbooth] message`` / ``[jaxbooth] warning: ...``.

Both backends and the shared layer log through the standard ``logging`` module under the
``jaxbooth`` logger; ``setup_logging`` (called by the CLI) attaches the one handler. A library
user who configures logging themselves gets plain records instead (the CLI's handler does
not propagate, so a root handler some library installs never prints a line twice). Third-party loggers that
only add noise on a working run (bitsandbytes' optional-kernel message on CPUs, absl's
start-up chatter) are quietened to errors.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

LOGGER_NAME = "jaxbooth"
_NOISY_LOGGERS = ("bitsandbytes", "absl", "jax._src.xla_bridge", "torch.distributed.elastic")


class _Format(logging.Formatter):
    """``[jaxbooth] text`` for info, ``[jaxbooth] warning: text`` / ``error: text`` above it."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"[jaxbooth] error: {text}"
        if record.levelno >= logging.WARNING:
            return f"[jaxbooth] warning: {text}"
        return f"[jaxbooth] {text}"


class _FlushingHandler(logging.StreamHandler):
    """Writes through ``tqdm.write``, so a line never lands in the middle of a progress bar, to the
    ``sys.stderr`` of the moment (pytest's capsys swaps it) unless a stream was given."""

    def __init__(self, stream: TextIO | None = None):
        super().__init__(stream)
        self._fixed = stream is not None

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream if self._fixed else sys.stderr)
        except Exception:  # logging must never take the run down
            self.handleError(record)


def get_logger(name: str | None = None) -> logging.Logger:
    """The ``jaxbooth`` logger, or a child of it (``get_logger("data")``)."""
    return logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name}")


def setup_logging(level: int = logging.INFO, stream: TextIO | None = None) -> logging.Logger:
    """Attach the jaxbooth handler once (idempotent) and quieten third-party noise."""
    logger = get_logger()
    logger.setLevel(level)
    if not any(isinstance(h, _FlushingHandler) for h in logger.handlers):
        handler = _FlushingHandler(stream)
        handler.setFormatter(_Format())
        logger.addHandler(handler)
    logger.propagate = False  # libraries that call logging.basicConfig() would print every line twice
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    return logger


def info(message: str) -> None:
    get_logger().info(message)


def warning(message: str) -> None:
    get_logger().warning(message)
