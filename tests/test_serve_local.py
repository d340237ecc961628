"""serve.local without a running server: what the supervisor shows of a dead server, and what a stop leaves."""

import time
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


class _Stop(Exception):
    """Ends a supervision that would otherwise go on restarting for ever."""


def _supervised(monkeypatch, lifetime: float, max_starts: int = 8):
    """``serve.supervise`` on a fake clock over a stand-in tritonserver that is down at first and, once started,
    dies ``lifetime`` seconds after the previous death (deaths at 0, lifetime, 2 * lifetime ...). Returns the return
    code (None: still supervising after ``max_starts`` restarts), the restarts made and the deaths' times."""
    import types

    import serve.__main__ as S

    clock = [0.0]
    monkeypatch.setattr(S, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))

    class Stopping:  # no stop is asked for; the supervisor's waits (checks, back-off) pass on the clock
        def is_set(self):
            return False

        def wait(self, seconds):
            clock[0] += seconds
            return False

    class Process:
        def __init__(self, dies_at):
            self.dies_at, self.returncode = dies_at, None

        def poll(self):
            if clock[0] >= self.dies_at:
                self.returncode = 1
            return self.returncode

    class Server:
        process, log_file, banks, health_state, http_url, grpc_url = None, "log", "banks", None, "http", "grpc"

        def __init__(self):
            self.starts, self.deaths = 0, []
            self.stopping = Stopping()

        def last_errors(self):
            self.deaths.append(clock[0])  # asked once per death, as the reason is written
            return []

        def stop(self, keep_guards=False):
            self.process = None

        def start(self, timeout):
            if self.starts == max_starts:
                raise _Stop
            self.starts += 1
            self.process = Process(len(self.deaths) * lifetime)

    server = Server()
    args = types.SimpleNamespace(canary_interval=0, max_restarts=3, restart_backoff=1.0, ready_timeout=1)
    try:
        code = S.supervise(server, args)
    except _Stop:
        code = None
    return code, server.starts, server.deaths


def test_the_supervisor_gives_up_after_max_restarts_within_ten_minutes_and_never_when_they_are_spread(monkeypatch):
    """--max-restarts 3: a server that dies a fourth time within ten minutes of its first death is given up (exit
    code 1) after exactly three restarts; one whose deaths come so far apart that no four fall within ten minutes
    (the oldest leaves the window when it is 600 s old) is restarted for as long as it keeps dying."""
    code, starts, deaths = _supervised(monkeypatch, lifetime=199.0)
    assert code == 1 and starts == 3 and deaths == [0.0, 199.0, 398.0, 597.0]
    code, starts, deaths = _supervised(monkeypatch, lifetime=200.0)
    assert code is None and starts == 8 and deaths[3] == 600.0


def test_listen_free_says_taken_for_a_port_a_server_listens_on_and_free_once_it_is_closed():
    """pick_ports trusts listen_free: a port another server listens on reported free is a start that can only fail."""
    import socket

    from serve.local import listen_free

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert listen_free("127.0.0.1", port) is False
    assert listen_free("127.0.0.1", port) is True


def test_listen_free_counts_a_port_left_in_time_wait_as_free():
    """A scrape's closed connection leaves the server's port in TIME_WAIT for a minute; servers bind with address
    reuse, so the port is free for them and must not push a run off its usual ports."""
    import socket

    from serve.local import listen_free

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    listener.close()
    accepted.close()  # the server side closes first: its end of the connection waits in TIME_WAIT on the port
    client.recv(1)
    client.close()
    with socket.socket() as plain:  # the premise: without address reuse the port cannot be bound now
        try:
            plain.bind(("127.0.0.1", port))
        except OSError:
            pass
        else:
            pytest.skip("this kernel let a plain bind reuse a TIME_WAIT port: nothing to tell apart")
    assert listen_free("127.0.0.1", port) is True


def test_the_stop_flag_is_set_from_a_signal_handler_without_a_lock(tmp_path):
    """python -m serve's SIGTERM / Ctrl-C handler sets the flag the start and the supervisor wait on. A
    threading.Event takes its lock in set() and holds it for a moment in every wait(): a handler landing in that
    moment waits on its own thread for ever (only SIGKILL ends the process). The flag holds no lock, and a signal
    sent while the main thread waits on it ends the wait at once."""
    import signal
    import threading

    from serve.local import StopFlag

    server = LocalServer(_repository(tmp_path))  # what its start waits on, and python -m serve sets
    flag = server.stopping
    server.stop()
    locks = (type(threading.Lock()), type(threading.RLock()), threading.Condition)
    assert isinstance(flag, StopFlag) and not [name for name, value in vars(flag).items() if isinstance(value, locks)]
    previous = signal.signal(signal.SIGTERM, lambda *_: flag.set())
    try:
        timer = threading.Timer(0.2, signal.raise_signal, (signal.SIGTERM,))
        timer.start()
        started = time.monotonic()
        assert flag.wait(10) and time.monotonic() - started < 2
        timer.join()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_free_ports_never_draws_a_port_it_is_told_to_avoid(monkeypatch):
    """A server's own public ports are not bound yet when tritonserver's are drawn: a draw of one of them was a
    start that failed ("already in use") after loading the models."""
    import serve.local as L

    monkeypatch.setattr(L, "_outside_ephemeral_range", lambda: (23000, 23128))
    avoided = set(range(23000, 23126))
    drawn = L.free_ports(2, avoid=avoided)
    assert len(set(drawn)) == 2 and not avoided & set(drawn), drawn
