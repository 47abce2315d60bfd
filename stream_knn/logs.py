"""Logging set-up for stream-knn processes: our own logger tree only, text or JSON lines."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

import orjson

__all__ = ["JsonFormatter", "RecentProblems", "setup_logging"]

_ROOT = "stream_knn"
#: Attributes a caller may pass in ``extra=`` that JSON lines carry as fields.
_CONTEXT = ("topic", "partition", "offset", "key", "reason", "version", "variant")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any context fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _CONTEXT:
            if hasattr(record, name):
                value = getattr(record, name)
                data[name] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()


class RecentProblems(logging.Handler):
    """Keeps the last ``size`` warnings and errors of our logger tree in memory, for the
    dashboard page and ``stream-knn status`` ("last errors").

    Attach with :meth:`attach`; the records are kept as plain dicts (time, level, logger,
    message), never the record objects with their arguments.
    """

    def __init__(self, size: int = 20) -> None:
        super().__init__(logging.WARNING)
        self.records: deque[dict[str, Any]] = deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except (TypeError, ValueError) as exc:  # a bad format string must not raise here
            message = f"{record.msg!r} (unformattable: {exc})"
        self.records.append(
            {
                "ts": record.created,
                "level": record.levelname,
                "logger": record.name,
                "message": message,
            }
        )

    def attach(self) -> RecentProblems:
        """Add this handler to the ``stream_knn`` logger (our own tree only)."""
        logging.getLogger(_ROOT).addHandler(self)
        return self

    def detach(self) -> None:
        logging.getLogger(_ROOT).removeHandler(self)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the ``stream_knn`` logger (not the root logger) once per process."""
    logger = logging.getLogger(_ROOT)
    logger.setLevel(level)
    for handler in list(logger.handlers):
        if getattr(handler, "_stream_knn", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler()
    handler._stream_knn = True  # type: ignore[attr-defined]
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
