"""A real ``tritonserver`` on this machine, from the ``nvidia-pytriton`` wheel (Triton 2.51, Python backend only).

The wheel ships the server binary, the Python backend library and per-Python-version stubs. ``LocalServer``:

- lays out a backends folder in a private runtime directory: ``python/`` (library, utils, the stub for the running
  Python) and ``onnxruntime/`` (a copy of the same library plus ``onnxruntime_backend.py`` as ``model.py``), so the
  ``platform: "onnxruntime_onnx"`` encoder configs load unchanged;
- starts the server on 127.0.0.1 (unless told otherwise) with this Python's environment first on PATH, so the
  Python-backend models run with the packages installed here;
- waits until the server is ready, or stops it and raises ``ServerError`` with the server's own error lines;
- stops it (SIGTERM, then SIGKILL) and removes the shared-memory regions its backends left in /dev/shm.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from postprocess.atomic import pid_alive
from postprocess.logs import get_logger
from postprocess.serving import STORE_LIMIT_ENV

from .http_guard import INTERNAL_HEADER
from .request_checks import Limits, image_side_limits

HERE = Path(__file__).resolve().parent
SHM_DIR = Path("/dev/shm")
# Lines the CPU-only server prints at every start; they are not why a start failed.
BENIGN = ("CudaDriverHelper", "Failed to initialize NVML", "DCGM", "unable to create stream", "CUDA driver",
          "pinned memory", "cuda memory pool", "GPU metrics")


# How a process that dies of a C++ exception or a signal says so (tritonserver's own log has no E-line for it).
FATAL = ("terminate called", "what():", "Aborted", "Segmentation fault", "Killed", "std::bad_alloc")

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
# Every API Triton can restrict, except health: probes (Kubernetes, load balancers) carry no key.
RESTRICTED_APIS = ("metadata", "inference", "shared-memory", "model-config", "model-repository", "statistics",
                   "trace", "logging")


def is_loopback(host: str) -> bool:
    """A loopback address (127.0.0.0/8, ::1) or 'localhost': nothing off this machine reaches it. A name is never
    taken for one by its spelling ('127.example.com' was, and needed no key)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Starts tried when tritonserver finds one of its own (drawn) ports taken by the time it binds it.
INTERNAL_PORT_ATTEMPTS = 3


class ServerError(RuntimeError):
    """The server did not start or is not serving; the message carries its error lines."""


class StopRequested(Exception):
    """A stop was asked for (``LocalServer.stopping``) while the server was starting."""


class StopFlag:
    """What a stop request sets (``LocalServer.stopping``): set from a signal handler, so it takes no lock (a
    ``threading.Event`` does: a handler landing while the main thread holds it inside ``wait`` would wait on its
    own thread for ever)."""

    def __init__(self):
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        """Whether it is set, after at most ``timeout`` seconds (looked at every 0.1 s)."""
        end = time.monotonic() + timeout
        while not self._set and (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))
        return self._set


def free_ports(n: int, avoid: set[int] = frozenset()) -> list[int]:
    """n TCP ports free on 127.0.0.1 right now (held together while picking, so they differ), drawn below the
    machine's ephemeral range where it leaves room: a port is free when drawn and bound by a server a moment later
    (tritonserver binds its own after loading the models), and meanwhile every outgoing connection of the machine
    takes a source port from the ephemeral range. ``avoid``: ports not to return (a server's own, not bound yet)."""
    low, high = _outside_ephemeral_range()
    candidates = random.sample(range(low, high), min(high - low, 64 * n)) if high - low >= 64 * n else []
    sockets: list[socket.socket] = []
    extra: list[socket.socket] = []
    try:
        for port in candidates:
            if len(sockets) == n:
                break
            if port in avoid:
                continue
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            sockets.append(s)
        while len(sockets) < n:  # no room below the range (or all taken): the kernel's choice
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            if s.getsockname()[1] in avoid:
                extra.append(s)  # held until the end, so that the kernel chooses another
                continue
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets + extra:
            s.close()


def _outside_ephemeral_range() -> tuple[int, int]:
    """Ports [low, high) below the ephemeral range (Linux: ip_local_port_range, 32768 by default); empty elsewhere."""
    try:
        first = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0, 0
    return max(1024, first - 12000), first


def pytriton_dir() -> Path:
    spec = importlib.util.find_spec("pytriton")  # found, not imported: its __init__ needs packages we skip
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("tritonserver not found: pip install '.[serve]' and then "
                          "pip install --no-deps nvidia-pytriton (see README), or run the NGC Triton image")
    return Path(list(spec.submodule_search_locations)[0])


def bundled_server() -> tuple[Path, Path, Path]:
    """(tritonserver binary, python backend folder, stub for this Python)."""
    root = pytriton_dir() / "tritonserver"
    binary = root / "bin" / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    for path in (binary, root / "backends" / "python" / "libtriton_python.so", stub):
        if not path.is_file():
            raise ServerError(f"the nvidia-pytriton bundle lacks {path} (Python {version})")
    return binary, root / "backends" / "python", stub


def prepare_backends(target: Path) -> Path:
    """Lay out the backends folder the server is pointed at."""
    _, python_backend, stub = bundled_server()
    python_dir = target / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for source in (python_backend / "libtriton_python.so", python_backend / "triton_python_backend_utils.py", stub):
        shutil.copy2(source, python_dir / source.name)
    ort_dir = target / "onnxruntime"
    ort_dir.mkdir(exist_ok=True)
    # a copy, not a link: the server resolves the backend's folder from the library's real path
    shutil.copy2(python_backend / "libtriton_python.so", ort_dir / "libtriton_python.so")
    shutil.copy2(HERE / "onnxruntime_backend.py", ort_dir / "model.py")
    return target


def server_environment(banks: Path | None, max_store_gb: float | None = None) -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    libs = [sysconfig.get_config_var("LIBDIR") or ""]
    if importlib.util.find_spec("pytriton") is not None:  # the bundle's own libraries (absent in the NGC image)
        libs.append(str(pytriton_dir().parent / "nvidia_pytriton.libs"))
    env["LD_LIBRARY_PATH"] = os.pathsep.join([p for p in libs if p] + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    if banks is not None:
        env["PA_CLIP_BANKS"] = str(Path(banks).resolve())
    if max_store_gb is not None:
        env[STORE_LIMIT_ENV] = str(max_store_gb)
    return env


def error_lines(log_text: str, limit: int = 40) -> list[str]:
    """The lines of a server log that say what went wrong. A tritonserver that refuses its arguments prints its
    whole usage text first (option lines that mention "error" among them) and its reason after it: that reason is
    kept, the usage text is not."""
    picked, in_usage = [], False
    for line in log_text.splitlines():
        text = line.strip()
        if text.startswith("Usage: tritonserver"):
            in_usage = True
            continue
        if not text or any(b in text for b in BENIGN):
            continue
        if in_usage:
            if not line[:1].isspace() and not text.endswith(":"):
                picked.append(text)  # not an option or a heading: what tritonserver says after its usage
            continue
        if text.startswith("E1") or text.startswith("E0") or "error" in text.lower() or "Traceback" in text \
                or "Exception" in text or "UNAVAILABLE" in text or text.startswith(FATAL):
            picked.append(text)
    return picked[-limit:]


def reclaim_shared_memory() -> list[str]:
    """Remove the /dev/shm regions of local servers whose owning process is gone (killed before it could clean up)."""
    removed = []
    for path in SHM_DIR.glob("pa_clip_*") if SHM_DIR.is_dir() else []:
        match = re.match(r"^pa_clip_(\d+)_[0-9a-f]{12}_", path.name)
        if match and not pid_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


CALLER_DIR = "PA_CLIP_CALLER_DIR"  # run.sh's: the folder the user ran it from, before it moved to the project


def from_caller(args, parser, names: tuple) -> None:
    """Make the relative paths the user gave in ``names`` (attributes of ``args``, any not left at the parser's
    default) relative to where run.sh was run, not the project folder it moves to (--images photos/ was "no such
    folder"). Defaults stay the project's; without run.sh nothing changes."""
    caller = os.environ.get(CALLER_DIR)
    if not caller:
        return
    for name in names:
        value = getattr(args, name)
        if value is not None and value != parser.get_default(name) and not Path(value).is_absolute():
            setattr(args, name, str(Path(caller) / value))


def listen_free(host: str, port: int) -> bool:
    """Whether a server could listen on (host, port) now (address reuse on, as servers have it: a port left in
    TIME_WAIT by a scrape is free)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


class LocalServer:
    """``with LocalServer(repo) as server: ...`` or ``start()`` / ``stop()``."""

    def __init__(self, repository: str | Path, banks: str | Path | None = None, host: str = "127.0.0.1",
                 http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 log_file: str | Path | None = None, extra_args: list[str] | None = None, log_verbose: int = 0,
                 key: str | None = None, metrics_host: str = "127.0.0.1", limits: Limits | None = None,
                 tritonserver: str | Path | None = None, max_store_gb: float | None = None):
        """``key``: when given, every API but health (inference, bank actions, metadata, shared memory, model
        control, statistics, trace, logging) answers only requests carrying it in the ``pa-clip-key`` header (HTTP)
        or metadata (gRPC). The metrics port cannot check a key: it stays on ``metrics_host`` (loopback).
        Clients reach HTTP and gRPC through the guards (``serve.http_guard``, ``serve.grpc_guard``: ``limits``, by
        default 256 MB a request and the encoder's longest image side); tritonserver's own ports are free ports on
        loopback that answer only requests carrying a secret drawn at each start (health aside).
        ``tritonserver``: the binary of a full Triton install (``/opt/tritonserver/bin/tritonserver`` in NVIDIA's
        image, with its native onnxruntime / TensorRT backends beside it) instead of the nvidia-pytriton bundle."""
        self.max_store_gb = max_store_gb  # what the bank store may hold: builds and adds past it are refused
        self.tritonserver = Path(tritonserver) if tritonserver is not None else None
        if self.tritonserver is not None and not self.tritonserver.is_file():
            raise ServerError(f"no tritonserver binary at {self.tritonserver}")
        self.repository = Path(repository).resolve()
        if not (self.repository.is_dir() and any(self.repository.glob("*/config.pbtxt"))):
            raise ServerError(f"{self.repository} is not a model repository (no */config.pbtxt): "
                              "run `python -m export onnx --out model_repository` first")
        hidden = sorted(p.name for p in self.repository.iterdir() if p.is_dir() and p.name.startswith("."))
        if hidden:  # tritonserver reads every folder as a model and stops on these ("unexpected directory name")
            raise ServerError(f"{self.repository} holds the folder(s) {', '.join(hidden)}, which tritonserver refuses "
                              "as models (an interrupted export leaves such): export again (it removes them) or remove "
                              "them")
        self.banks = Path(banks).resolve() if banks is not None else None
        self.host = host
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.extra_args = list(extra_args or [])
        self.log_verbose = log_verbose
        if key is not None and not KEY_PATTERN.match(key):  # before anything is made: a refused start leaves nothing
            raise ServerError("the access key must be 16-128 letters, digits, '-' or '_' (e.g. from "
                              "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
        self.key = key
        self.runtime = Path(tempfile.mkdtemp(prefix="pa-clip-triton-"))
        self.log_file = Path(log_file) if log_file else self.runtime / "tritonserver.log"
        # the owner's pid in the prefix: regions of servers whose owner is gone are reclaimed at the next start
        self.shm_prefix = f"pa_clip_{os.getpid()}_{uuid.uuid4().hex[:12]}_"
        self.metrics_host = metrics_host
        self.log_offset = 0  # where the current start's lines begin in the log
        if limits is None:
            limits = Limits(**image_side_limits(self.repository))
        self.limits = limits
        self.guards: list = []
        self.secret = ""  # drawn at each start: what tritonserver's own ports ask for
        self.internal_http = self.internal_grpc = 0  # tritonserver's own ports (loopback)
        self.health_state = (True, "")  # set by the supervisor's canaries (serve.__main__); the guards report it
        self.process: subprocess.Popen | None = None
        # set by whoever runs the server (python -m serve's SIGTERM / Ctrl-C): a start waiting for readiness stops
        # waiting; a flag looked at between steps, not an exception raised wherever the signal lands
        self.stopping = StopFlag()

    @property
    def python_run_platforms(self) -> set[str]:
        """Platforms this server runs through a Python stub: with the bundle, ONNX models go to
        serve/onnxruntime_backend.py; a full Triton install has the native backend."""
        from export.targets import ONNX

        return set() if self.tritonserver is not None else {ONNX.platform}

    def health(self) -> tuple[bool, str]:
        return self.health_state

    @property
    def internal_http_url(self) -> str:
        """tritonserver's own HTTP port (requests need ``internal_headers``)."""
        return f"127.0.0.1:{self.internal_http}"

    @property
    def internal_headers(self) -> dict:
        return {INTERNAL_HEADER: self.secret}

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self) -> list[str]:
        if self.tritonserver is not None:  # a full Triton install (the NGC image): its own native backends
            binary = self.tritonserver
            backends = binary.parent.parent / "backends"
        else:
            binary, _, _ = bundled_server()
            backends = prepare_backends(self.runtime / "backends")
        shm = [f"shm-region-prefix-name={self.shm_prefix}", "shm-default-byte-size=16777216",
               "shm-growth-byte-size=67108864"]
        args = [str(binary), "--model-repository", str(self.repository), "--backend-directory", str(backends),
                "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1", "--metrics-address", self.metrics_host,
                "--http-port", str(self.internal_http), "--grpc-port", str(self.internal_grpc),
                "--metrics-port", str(self.metrics_port), "--exit-on-error=true", "--strict-readiness=true",
                # a stop waits this long for requests in flight (an idle keep-alive connection would hold it 30 s)
                "--exit-timeout-secs=5", f"--log-verbose={self.log_verbose}"]
        for backend in ("python", "onnxruntime"):
            args += [f"--backend-config={backend},{opt}" for opt in shm]
        # the guards check the client's key; tritonserver's own ports answer only the guards (and the canaries)
        args += [f"--http-restricted-api={','.join(RESTRICTED_APIS)}:{INTERNAL_HEADER}={self.secret}",
                 f"--grpc-restricted-protocol={','.join(RESTRICTED_APIS)}:{INTERNAL_HEADER}={self.secret}"]
        return args + self.extra_args

    def start(self, timeout: float = 300.0) -> "LocalServer":
        if self.process is not None:
            raise ServerError("already started")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        reclaim_shared_memory()
        restarting = bool(self.guards)  # the supervisor's restart: the public ports stay open (ready says no)
        for attempt in range(1, INTERNAL_PORT_ATTEMPTS + 1):
            try:
                return self._start_once(timeout)
            except BaseException as err:
                # tritonserver's own ports are free when drawn and bound seconds later, once the models are loaded:
                # another process can take one meanwhile
                if (not isinstance(err, ServerError) or attempt == INTERNAL_PORT_ATTEMPTS
                        or not self._lost_an_internal_port()):
                    if not restarting:
                        self.stop_guards()
                    raise
                get_logger("serve").warning(f"tritonserver's own port was taken meanwhile "
                                            f"({self.last_errors()[-1]}); starting again on others")
        raise AssertionError("unreachable")

    def _lost_an_internal_port(self) -> bool:
        ports = (f":{self.internal_http}'", f":{self.internal_grpc}'")
        return any("already in use" in line and any(port in line for port in ports) for line in self.last_errors())

    def _start_once(self, timeout: float) -> "LocalServer":
        if self.stopping.is_set():
            raise StopRequested("stopped before starting")
        self.secret = secrets.token_urlsafe(24)
        self.internal_http, self.internal_grpc = free_ports(2, avoid={self.http_port, self.grpc_port,
                                                                       self.metrics_port})
        self.health_state = (True, "")
        # what can fail before the server runs is done before the public ports are taken (a failed start left
        # them listening, and the next start on them failed with "address already in use")
        # the guardian leads the new process group and takes it down if this process dies, even by SIGKILL
        guarded = [sys.executable, "-m", "serve.guardian", str(os.getpid()), "--", *self.command()]
        try:
            log = open(self.log_file, "ab")
        except OSError as err:
            raise ServerError(f"cannot write the server log {self.log_file}: {err.strerror or err}") from None
        try:
            self.log_offset = log.tell()
            if not listen_free(self.metrics_host, self.metrics_port):
                # tritonserver says ready before it binds its metrics port, then exits: a start that looked
                # fine went into a loop of restarts
                raise ServerError(f"the metrics port {self.metrics_host}:{self.metrics_port} is in use: pass another "
                                  "--metrics-port")
            self._start_guards()
            self.process = subprocess.Popen(guarded, stdout=log, stderr=subprocess.STDOUT, cwd=HERE.parent,
                                            env=server_environment(self.banks, self.max_store_gb),
                                            start_new_session=True)
        except BaseException:
            log.close()
            self.stop(keep_guards=True)  # start() closes them, unless it tries again or they were open before
            raise
        log.close()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop(keep_guards=True)
            raise
        return self

    def _start_guards(self) -> None:
        """The public ports: one guard each, forwarding to tritonserver's own ports (kept across restarts)."""
        from .grpc_guard import GrpcGuard
        from .http_guard import HttpGuard

        if self.guards:
            for guard in self.guards:
                guard.secret = self.secret
            self.guards[0].set_upstream(self.internal_http)
            self.guards[1].set_upstream(self.internal_grpc)
            return
        common = dict(limits=self.limits, key=self.key, secret=self.secret, health=self.health)
        try:
            self.guards.append(HttpGuard(self.host, self.http_port, self.internal_http, **common).start())
            self.guards.append(GrpcGuard(self.host, self.grpc_port, self.internal_grpc, **common).start())
        except OSError as err:
            self.stop_guards()
            raise ServerError(f"cannot listen on {self.host} (HTTP {self.http_port}, gRPC {self.grpc_port}): {err}"
                              ) from err

    def stop_guards(self) -> None:
        for guard in self.guards:
            guard.stop()
        self.guards = []

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stopping.is_set():
                raise StopRequested("stopped while starting")
            if self.process.poll() is not None:
                raise ServerError(self.failure(f"tritonserver exited with code {self.process.returncode}"))
            if self.ready():
                return
            self.stopping.wait(0.25)
        raise ServerError(self.failure(f"tritonserver was not ready after {timeout:.0f} s"))

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:  # not written yet, or not a file (a start refused for that says so itself)
            return ""

    def last_errors(self) -> list[str]:
        """The error lines of the current (or last) start."""
        return error_lines(self.log_text()[self.log_offset:])

    def failure(self, headline: str) -> str:
        """``headline`` with the server's error lines of this start and where its log is."""
        lines = self.last_errors()
        detail = "\n  ".join(lines) if lines else "(no error lines; full log: %s)" % self.log_file
        return f"{headline}. Server says:\n  {detail}\nFull log: {self.log_file}"

    def kill(self) -> None:
        """SIGKILL the server and its backend processes at once (what a crash looks like)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 30.0, keep_guards: bool = False) -> None:
        """``keep_guards``: a restart follows: the public ports stay open (health says not ready meanwhile)."""
        if self.guards:
            self.guards[0].close_idle()  # requests in flight finish; idle keep-alive connections do not hold the stop
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.process is not None:
            try:  # stubs the server could not reap
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process = None
        if not keep_guards:
            self.stop_guards()
        self.remove_shared_memory()
        self.remove_runtime()

    def remove_runtime(self) -> None:
        """The private folder goes, but for the log when it is there (it is printed at the start: for reading)."""
        shutil.rmtree(self.runtime / "backends", ignore_errors=True)
        if not self.log_file.resolve().is_relative_to(self.runtime.resolve()):
            shutil.rmtree(self.runtime, ignore_errors=True)

    def remove_shared_memory(self) -> list[str]:
        removed = []
        for path in SHM_DIR.glob(self.shm_prefix + "*") if SHM_DIR.is_dir() else []:
            path.unlink(missing_ok=True)
            removed.append(path.name)
        return removed

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.runtime, ignore_errors=True)
