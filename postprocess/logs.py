"""Logging of the server-side code through Python's ``logging`` (issue 28): one logger tree, ``pa_clip``.

- ``python -m serve`` (``pa-clip serve``) writes its lines to the terminal as before (the message alone) unless
  ``--log-format json`` asks for one JSON object per line (time, level, logger, message: what a log collector
  reads) and ``--log-level`` filters them.
- Inside tritonserver the Python models hand their records to Triton's own log (``TritonLogHandler``), at the
  matching level, so they sit beside the server's lines; the same ``PA_CLIP_LOG_LEVEL`` environment variable that
  ``python -m serve`` sets for its children filters them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

ROOT = "pa_clip"
LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
LEVEL_ENV, FORMAT_ENV = "PA_CLIP_LOG_LEVEL", "PA_CLIP_LOG_FORMAT"


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"{ROOT}.{name}")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message`` and, for an
    exception, ``error``."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure(level: str | None = None, fmt: str | None = None, stream=None) -> logging.Logger:
    """The ``pa_clip`` tree to a terminal: ``level`` (default $PA_CLIP_LOG_LEVEL or info), ``fmt`` "text" (the
    message alone: what the terminal always showed) or "json" (default $PA_CLIP_LOG_FORMAT or text)."""
    level = (level or os.environ.get(LEVEL_ENV) or "info").lower()
    fmt = (fmt or os.environ.get(FORMAT_ENV) or "text").lower()
    if level not in LEVELS or fmt not in FORMATS:
        raise ValueError(f"log level one of {', '.join(LEVELS)} and format one of {', '.join(FORMATS)}, got "
                         f"{level!r} and {fmt!r}")
    root = logging.getLogger(ROOT)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    return root


class TritonLogHandler(logging.Handler):
    """Records into Triton's log through the Python backend's ``pb_utils.Logger``, level for level."""

    def __init__(self, pb_utils):
        super().__init__()
        self._logger = pb_utils.Logger

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if record.levelno >= logging.ERROR:
                self._logger.log_error(message)
            elif record.levelno >= logging.WARNING:
                self._logger.log_warn(message)
            elif record.levelno >= logging.INFO:
                self._logger.log_info(message)
            else:
                self._logger.log_verbose(message)
        except Exception:  # a log line must never break a request
            self.handleError(record)


def to_triton(pb_utils) -> logging.Logger:
    """Inside a Python model: the ``pa_clip`` tree into Triton's log, filtered by $PA_CLIP_LOG_LEVEL (default
    info)."""
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, TritonLogHandler) for h in root.handlers):
        handler = TritonLogHandler(pb_utils)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        root.addHandler(handler)
    level = (os.environ.get(LEVEL_ENV) or "info").lower()
    root.setLevel(level.upper() if level in LEVELS else "INFO")
    root.propagate = False
    return root
