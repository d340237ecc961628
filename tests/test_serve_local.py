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
    # arguments refused: the usage text (whose option lines mention errors) is skipped, the reason after it kept
    usage = ("Usage: tritonserver [options]\n  --help\n\tPrint usage\nLogging:\n  --log-error <boolean>\n"
             "\tEnable/disable error level logging.\n\nThe server cannot listen to HTTP requests and GRPC requests at "
             "the same address and port 0.0.0.0:8765\n")
    assert error_lines(usage) == ["The server cannot listen to HTTP requests and GRPC requests at the same address "
                                  "and port 0.0.0.0:8765"]
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


def test_a_full_triton_install_is_run_with_its_own_backends(tmp_path):
    """NVIDIA's image (docs/k8s): its tritonserver, the backends folder beside it, no Python stand-in for ONNX; only
    Python-backend models get canaries there."""
    from serve.canary import python_run_models

    binary = tmp_path / "opt" / "tritonserver" / "bin" / "tritonserver"
    binary.parent.mkdir(parents=True)
    binary.write_text("")
    repo = _repository(tmp_path)
    (repo / "enc").mkdir()
    (repo / "enc" / "config.pbtxt").write_text('name: "enc"\nplatform: "onnxruntime_onnx"\n')
    server = LocalServer(repo, log_file=tmp_path / "log", tritonserver=binary)
    command = server.command()
    assert command[0] == str(binary)
    assert command[command.index("--backend-directory") + 1] == str(tmp_path / "opt" / "tritonserver" / "backends")
    assert [c.name for c in python_run_models(repo, server.python_run_platforms)] == ["m"]
    bundled = LocalServer(repo, log_file=tmp_path / "log")
    assert [c.name for c in python_run_models(repo, bundled.python_run_platforms)] == ["enc", "m"]
    server.stop()
    bundled.stop()
