"""A server's life against real tritonservers on loopback: starts, stops, crashes and restarts (of tritonserver,
of ``python -m serve``, in the middle of a build), and what they leave behind (processes, shared memory). The kill and
restart cycles are ``slow``.
"""

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import tritonserver_pids
from serving_helpers import ROOT, LocalServer, PAClipClient, ServerError, free_ports, start_server

pytestmark = pytest.mark.server


@pytest.mark.slow
def test_restart_keeps_banks_and_a_kill_during_a_build_keeps_the_previous_bank(repository, workdir, lot):
    banks, log = workdir / "banks_restart", workdir / "restart.log"
    srv = start_server(repository, banks, log)
    client = PAClipClient(srv.http_url)
    client.add_images("line1", "washer", lot, reset=True)
    first = client.build_bank("line1")
    maps_before, scores_before = client.score(lot[:3], "line1")
    # a second, much larger lot: its build takes seconds, and the server dies in the middle of it
    big = np.concatenate([lot] * 10)
    for start in range(0, len(big), 16):
        client.add_images("line1", "washer", big[start:start + 16], reset=start == 0)
    client.close()
    outcome = []
    building = threading.Thread(target=lambda: outcome.append(_build_outcome(srv.http_url, "line1")))
    building.start()
    deadline = time.monotonic() + 60
    while "building bank 'line1'" not in srv.log_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    srv.kill()
    building.join(60)
    assert "building bank 'line1'" in srv.log_text()
    assert outcome == ["failed"], "the build finished before the server was killed"
    srv.stop()
    assert not list(Path("/dev/shm").glob(srv.shm_prefix + "*"))

    srv = start_server(repository, banks, log)
    try:
        client = PAClipClient(srv.http_url)
        info = client.bank_info("line1")
        assert info["version"] == first["version"] and info["n_images"] == len(lot)
        maps_after, scores_after = client.score(lot[:3], "line1")
        assert np.abs(maps_after - maps_before).max() < 1e-6
        assert np.abs(scores_after - scores_before).max() < 1e-6
        assert not list((banks / "line1").glob(".tmp-*"))
        client.close()
    finally:
        srv.stop()


def _build_outcome(url, bank) -> str:
    client = PAClipClient(url, timeout_s=120)
    try:
        client.build_bank(bank)
    except Exception:  # noqa: BLE001 - the server is killed under it
        return "failed"
    return "finished"


def test_a_model_that_fails_to_load_stops_the_start_with_the_servers_words(repository, workdir):
    broken = workdir / "broken_repository"
    (broken / "clip_vision" / "1").mkdir(parents=True)
    (broken / "clip_vision" / "config.pbtxt").write_text((repository / "clip_vision" / "config.pbtxt").read_text())
    (broken / "clip_vision" / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    http, grpc, metrics = free_ports(3)
    server = LocalServer(broken, workdir / "banks_broken", http_port=http, grpc_port=grpc, metrics_port=metrics)
    with pytest.raises(ServerError, match="(?s)tritonserver exited.*clip_vision.*"):
        server.start(timeout=120)
    assert server.process is None
    assert not list(Path("/dev/shm").glob(server.shm_prefix + "*"))


def test_a_start_whose_own_port_was_taken_meanwhile_starts_again_on_others(repository, workdir, monkeypatch, caplog):
    """tritonserver's own ports are drawn free and bound a moment later; an outgoing connection of the machine can
    take one meanwhile (its source port comes from the same range). Such a start failed ("already in use") and
    ``python -m serve`` exited; a CI run waited three minutes for it. The first draw here is a port that is busy."""
    import serve.local

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    draws = []

    def draw(n: int, avoid=frozenset()) -> list[int]:
        ports = free_ports(n, avoid)
        if n == 2 and not draws:
            ports[0] = busy.getsockname()[1]
        draws.append(ports)
        return ports

    monkeypatch.setattr(serve.local, "free_ports", draw)
    http, grpc, metrics = free_ports(3)
    server = LocalServer(repository, workdir / "banks_port_race", http_port=http, grpc_port=grpc, metrics_port=metrics,
                         log_file=workdir / "port_race.log")
    try:
        with caplog.at_level("WARNING", logger="serve"):
            server.start(timeout=180)
        assert len(draws) == 2 and server.internal_http != busy.getsockname()[1]
        assert "starting again on others" in caplog.text and "already in use" in caplog.text
        client = PAClipClient(server.http_url)
        assert client.list_banks() == []
        client.close()
    finally:
        server.stop()
        busy.close()


def test_serve_command_starts_on_loopback_and_stops_cleanly_on_sigterm(repository, workdir):
    import signal

    http, grpc, metrics = free_ports(3)
    shm_before = set(Path("/dev/shm").glob("pa_clip_*"))  # the module's server holds its own regions
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--repository", str(repository), "--banks",
                             str(workdir / "banks_cli"), "--http-port", str(http), "--grpc-port", str(grpc),
                             "--metrics-port", str(metrics)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("ready in"):
                break
        assert f"HTTP 127.0.0.1:{http}" in lines[-1], "".join(lines)
        client = PAClipClient(f"127.0.0.1:{http}")
        client.check_ready()
        assert client.list_banks() == []
        client.close()
        for port in (http, grpc, metrics):  # what the kernel says is listening: loopback only
            assert listening_addresses(port) == {"127.0.0.1"}, (port, listening_addresses(port))
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        said = proc.stderr.read()
        assert code == 0 and "stopping tritonserver" in said, (code, said[-3000:])
    finally:
        proc.kill()
    leftover = set(Path("/dev/shm").glob("pa_clip_*")) - shm_before
    assert not leftover, leftover
    bad = subprocess.run([sys.executable, "-m", "serve", "--repository", str(workdir)], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "is not a model repository" in bad.stderr


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets in LISTEN state on ``port`` (/proc/net/tcp and tcp6)."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A = LISTEN
                continue
            raw = bytes.fromhex(address)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            text = socket.inet_ntop(family, raw)
            found.add(text.removeprefix("::ffff:"))  # an IPv6 socket bound to an IPv4 address
    return found


def test_listening_addresses_sees_a_socket_bound_to_all_interfaces():
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        assert listening_addresses(port) == {"0.0.0.0"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert listening_addresses(s.getsockname()[1]) == {"127.0.0.1"}


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    return True
            except (ProcessLookupError, PermissionError):
                continue
    return False


def _read_until(stream, text: str, timeout: float = 180) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    for line in stream:
        lines.append(line)
        if text in line or time.monotonic() > deadline:
            break
    return lines


@pytest.mark.slow
def test_serve_restarts_a_dead_server_and_nothing_outlives_a_killed_serve(repository, workdir, lot):
    import signal

    http, grpc, metrics = free_ports(3)
    banks = workdir / "banks_supervised"
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--repository", str(repository), "--banks", str(banks),
                             "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        assert "ready in" in _read_until(proc.stderr, "ready in")[-1]
        client = PAClipClient(f"127.0.0.1:{http}")
        client.add_images("kept", "washer", lot[:4], reset=True)
        built = client.build_bank("kept", {"mode": "mutual"})
        client.close()
        (server_pid,) = tritonserver_pids(proc.pid)
        os.kill(server_pid, signal.SIGKILL)  # a crash
        lines = _read_until(proc.stderr, "restarted:")
        text = "".join(lines)
        assert "tritonserver died (signal 9)" in text and "restarting tritonserver in 1 s" in text, text
        client = PAClipClient(f"127.0.0.1:{http}")
        assert client.bank_info("kept")["version"] == built["version"]  # banks intact
        client.close()
        (new_pid,) = tritonserver_pids(proc.pid)
        group = os.getpgid(new_pid)
        proc.kill()  # kill -9 of python -m serve itself: its server, stubs and shared memory must not outlive it
        proc.wait(10)
        deadline = time.monotonic() + 30
        while _group_alive(group) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group_alive(group), "processes of the server outlived python -m serve"
    finally:
        proc.kill()
    # the next start reclaims what the killed one left in /dev/shm
    from serve.local import reclaim_shared_memory

    reclaim_shared_memory()
    assert not [p for p in Path("/dev/shm").glob(f"pa_clip_{proc.pid}_*")]


KILL_CYCLES = 5  # ten took 167 s of the CI run; a leak shows in any cycle


@pytest.mark.slow
def test_kill_9_cycles_of_serve_leave_no_process_and_no_shared_memory(repository, workdir, lot):
    """Each cycle: python -m serve ready, a request that makes the stubs allocate shared memory, kill -9 of serve."""
    import signal

    from serve.local import reclaim_shared_memory

    leftovers, started = [], []
    for cycle in range(KILL_CYCLES):
        http, grpc, metrics = free_ports(3)
        proc = subprocess.Popen([sys.executable, "-m", "serve", "--repository", str(repository), "--banks",
                                 str(workdir / "banks_cycles"), "--http-port", str(http), "--grpc-port", str(grpc),
                                 "--metrics-port", str(metrics)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        started.append(proc.pid)
        try:
            assert "ready in" in _read_until(proc.stderr, "ready in")[-1], cycle
            (server_pid,) = tritonserver_pids(proc.pid)
            group = os.getpgid(server_pid)
            client = PAClipClient(f"127.0.0.1:{http}")
            client.list_banks()
            client.close()
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        deadline = time.monotonic() + 30
        while _group_alive(group) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(group):
            leftovers.append(f"cycle {cycle}: processes of group {group}")
    reclaim_shared_memory()  # what every start does first
    assert not leftovers
    # the regions of these servers (named by their pid: another run's on this machine are its own)
    assert not [p.name for pid in started for p in Path("/dev/shm").glob(f"pa_clip_{pid}_*")]


def test_sigterm_during_the_start_and_a_stop_held_by_an_idle_connection(repository, workdir):
    import http.client
    import signal

    def serve():
        http_port, grpc_port, metrics_port = free_ports(3)
        # Ctrl-C as at a terminal: a test run started in the background has SIGINT ignored, and serve keeps it so
        proc = subprocess.Popen([sys.executable, "-m", "serve", "--repository", str(repository), "--banks",
                                 str(workdir / "banks_sigterm"), "--http-port", str(http_port), "--grpc-port",
                                 str(grpc_port), "--metrics-port", str(metrics_port)], cwd=ROOT,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        return proc, http_port, grpc_port

    for stop in (signal.SIGTERM, signal.SIGINT):  # a service manager's stop, and Ctrl-C at a terminal
        proc, _, _ = serve()
        try:
            _read_until(proc.stderr, "starting tritonserver")
            time.sleep(0.3)  # tritonserver is starting, not ready
            proc.send_signal(stop)
            code = proc.wait(60)
            assert code == 0, (stop, code, proc.stderr.read()[-3000:])
        finally:
            proc.kill()
        deadline = time.monotonic() + 10
        while tritonserver_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not tritonserver_pids(proc.pid)

    proc, http_port, _ = serve()
    try:
        assert "ready in" in _read_until(proc.stderr, "ready in")[-1]
        idle = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
        idle.request("GET", "/v2/health/ready")  # a keep-alive connection left open and idle
        assert idle.getresponse().read() == b""
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        # unloading the models takes ~4 s here; an idle connection used to add the 30 s exit timeout
        assert time.monotonic() - started < 10, "the stop waited on an idle connection"
        idle.close()
    finally:
        proc.kill()



def test_a_shared_memory_client_lives_through_a_restart_and_a_refusal_leaves_no_region(repository, workdir, lot):
    """A restarted tritonserver knows no region registered before: every later batch of a --shared-memory run
    failed ("Unable to find shared memory region"); it registers again now. A registration the server refuses (no
    key) raised tritonclient's own exception and left its region in /dev/shm."""
    from client.triton_client import ServerRefused

    key = "k" * 24
    srv = start_server(repository, workdir / "banks_shm_restart", workdir / "shm_restart.log", key=key)
    try:
        client = PAClipClient(srv.http_url, shared_memory=True, key=key)
        client.add_images("w", "washer", lot[:4], reset=True)
        client.build_bank("w", {"mode": "mutual"})
        before = client.score(lot[:2], "w")
        srv.stop(keep_guards=True)  # what the supervisor does with a dead server
        srv.start(timeout=180)
        after = client.score(lot[:2], "w")
        assert np.abs(after[0] - before[0]).max() < 1e-6 and np.abs(after[1] - before[1]).max() < 1e-6
        client.close()
        keyless = PAClipClient(srv.http_url, shared_memory=True, key="")
        with pytest.raises(ServerRefused, match="access key"):
            keyless.score(lot[:2], "w")
        assert keyless._shm is None and not list(Path("/dev/shm").glob(f"pa_clip_in_*"))
        keyless.close()
    finally:
        srv.stop()


def test_a_taken_metrics_port_stops_the_start_with_what_to_pass(repository, workdir):
    """tritonserver says ready before it binds its metrics port, then exits: the start looked fine and the
    supervisor restarted it until it gave up."""
    http, grpc, metrics = free_ports(3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", metrics))
        taken.listen()
        server = LocalServer(repository, workdir / "banks_metrics", http_port=http, grpc_port=grpc,
                             metrics_port=metrics)
        started = time.monotonic()
        with pytest.raises(ServerError, match=f"metrics port 127.0.0.1:{metrics} is in use"):
            server.start(timeout=60)
        assert time.monotonic() - started < 10
