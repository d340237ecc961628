"""The one distinction every served error needs: the caller's mistake, or ours."""

from __future__ import annotations


class RequestError(ValueError):
    """A request that cannot be served as sent (bad input, unknown bank, lot too small, ...). Its message says what
    was wrong and what to do; the server returns it as a 400-style error and keeps serving. Any other exception
    that escapes a model is a fault of ours: logged with its traceback, answered as an internal error."""
