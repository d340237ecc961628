"""postprocess/logs.py: the server-side code logs through Python's logging; the terminal reads as before by default,
JSON lines for a collector on request, levels filter, and inside tritonserver the records go to Triton's log."""

import io
import json
import logging

import pytest

from postprocess import logs


def test_text_by_default_json_on_request_and_levels_filter(monkeypatch):
    monkeypatch.delenv(logs.LEVEL_ENV, raising=False)
    monkeypatch.delenv(logs.FORMAT_ENV, raising=False)
    stream = io.StringIO()
    logs.configure(stream=stream)
    logs.get_logger("serve").info("ready in 1.0 s")
    assert stream.getvalue() == "ready in 1.0 s\n"  # what the terminal always showed: the message alone
    stream = io.StringIO()
    logs.configure("warning", "json", stream)
    logs.get_logger("serve").info("not shown")
    logs.get_logger("serve").warning("tritonserver died")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logs.get_logger("score").error("the drift window failed", exc_info=True)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(r["level"], r["logger"], r["message"]) for r in lines] == [
        ("warning", "pa_clip.serve", "tritonserver died"), ("error", "pa_clip.score", "the drift window failed")]
    assert lines[0]["time"].endswith("Z") and "RuntimeError: boom" in lines[1]["error"]
    monkeypatch.setenv(logs.LEVEL_ENV, "error")
    stream = io.StringIO()
    logs.configure(stream=stream)  # the environment python -m serve sets for its children
    logs.get_logger("bank").warning("hidden")
    assert stream.getvalue() == ""
    with pytest.raises(ValueError, match="log level one of"):
        logs.configure("loud")


def test_inside_triton_records_go_to_its_log_level_for_level(monkeypatch):
    monkeypatch.delenv(logs.LEVEL_ENV, raising=False)
    seen = []

    class Logger:
        log_info = staticmethod(lambda m: seen.append(("info", m)))
        log_warn = staticmethod(lambda m: seen.append(("warn", m)))
        log_error = staticmethod(lambda m: seen.append(("error", m)))
        log_verbose = staticmethod(lambda m: seen.append(("verbose", m)))

    class PbUtils:
        pass

    PbUtils.Logger = Logger
    root = logs.to_triton(PbUtils)
    logs.to_triton(PbUtils)  # once per process, whatever the models do
    assert sum(isinstance(h, logs.TritonLogHandler) for h in root.handlers) == 1
    logs.get_logger("bank").info("building bank 'a'")
    logs.get_logger("score").warning("drift window failed")
    logs.get_logger("score").debug("not at info")
    assert seen == [("info", "pa_clip.bank: building bank 'a'"), ("warn", "pa_clip.score: drift window failed")]
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
