"""serve.local without a running server: what the supervisor shows of a dead server, and what a stop leaves."""

from pathlib import Path

import pytest

pytest.importorskip("h11", reason="h11 is not installed: pip install -e '.[serve]'")

from serve.local import LocalServer, error_lines  # noqa: E402


def test_the_servers_real_last_error_is_shown():
    """A tritonserver that dies of an uncaught C++ exception prints no E-line: the runtime's words are the cause."""
    log = ("I1201 10:00:00.000 1 server.cc:674] model pa_clip READY\n"
           "W1201 10:00:00.000 1 pinned_memory_manager.cc:273] Unable to allocate pinned system memory\n"
           "terminate called after throwing an instance of 'std::bad_alloc'\n"
           "  what():  std::bad_alloc\n"
           "Aborted (core dumped)\n")
    assert error_lines(log) == ["terminate called after throwing an instance of 'std::bad_alloc'",
                                "what():  std::bad_alloc", "Aborted (core dumped)"]
    assert error_lines("Segmentation fault\n") == ["Segmentation fault"]
    assert error_lines("I1201 fine\nW1201 CUDA driver missing\n") == []


def _repository(tmp_path: Path) -> Path:
    (tmp_path / "repo" / "m").mkdir(parents=True, exist_ok=True)
    (tmp_path / "repo" / "m" / "config.pbtxt").write_text('name: "m"\nbackend: "python"\n')
    return tmp_path / "repo"


def test_a_stop_leaves_no_start_up_folder_unless_it_holds_the_log(tmp_path):
    elsewhere = LocalServer(_repository(tmp_path), log_file=tmp_path / "server.log")
    (elsewhere.runtime / "backends" / "python").mkdir(parents=True)
    elsewhere.stop()
    assert not elsewhere.runtime.exists()
    inside = LocalServer(_repository(tmp_path))  # the log in the folder: printed at the start, kept for reading
    (inside.runtime / "backends").mkdir()
    inside.log_file.write_text("log")
    inside.stop()
    assert inside.log_file.read_text() == "log" and not (inside.runtime / "backends").exists()
    inside.log_file.unlink()
    inside.runtime.rmdir()
