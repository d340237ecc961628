"""The one distinction every served error needs: the caller's mistake, or ours."""

from __future__ import annotations


class RequestError(ValueError):
    """A request that cannot be served as sent (bad input, unknown bank, lot too small, ...). Its message says what
    was wrong and what to do; the server returns it as a 400-style error and keeps serving. Any other exception
    that escapes a model is a fault of ours: logged with its traceback, answered as an internal error."""


BUSY = "server busy"  # how a ServerBusy message begins after the model's name: the client waits and retries on it


class ServerBusy(RequestError):
    """Not a mistake: the server cannot take this request now (a build of another bank holds its one build slot).
    Answered as 503 / UNAVAILABLE, with what it is waiting for; sent again later it succeeds."""

    def __init__(self, message: str):
        super().__init__(f"{BUSY}: {message}")
