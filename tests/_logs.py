"""``logged_warning``: the ``pytest.warns`` of jaxbooth's ``[jaxbooth] warning:`` log lines."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator


class WarningCollector(logging.Handler):
    """Keeps the messages of the warnings logged to the logger it is added to."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def logged_warning(match: str | None = None) -> Iterator[list[str]]:
    """Collect the warnings logged under ``jaxbooth``; at least one must match ``match`` (a regex)."""
    logger = logging.getLogger("jaxbooth")
    handler = WarningCollector()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
    assert handler.messages, "no [jaxbooth] warning was logged"
    if match is not None:
        assert any(re.search(match, m) for m in handler.messages), f"no warning matches {match!r}: {handler.messages}"
