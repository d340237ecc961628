"""python -m serve: serve a model repository with a local tritonserver until Ctrl-C.

Binds 127.0.0.1 by default (HTTP 8000, gRPC 8001, metrics 8002 on loopback). Off loopback (--host 0.0.0.0) it needs
an access key (--key, or $PA_CLIP_KEY): inference, bank actions and every administrative API then answer only
requests carrying it (HTTP header "pa-clip-key", gRPC metadata "triton-grpc-protocol-pa-clip-key"; client/infer.py
and the benchmarks send $PA_CLIP_KEY).
Health stays open for probes; the metrics port stays on loopback unless --metrics-host says otherwise.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from postprocess.contract import ACCESS_KEY_ENV
from postprocess import flags as F
from postprocess.logs import FORMAT_ENV, FORMATS, LEVEL_ENV, LEVELS, configure, get_logger

from .canary import Canaries
from .local import LocalServer, ServerError, StopFlag, StopRequested, from_caller, is_loopback
from .request_checks import Limits, image_side_limits


def build_parser(prog: str = "python -m serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", default="model_repository", help="model repository (what `python -m export` wrote)")
    p.add_argument("--banks", default="banks", help="bank store folder (created if missing; survives restarts)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--key", default=None,
                   help=f"access key every request must carry (default: ${ACCESS_KEY_ENV}); required off loopback")
    p.add_argument("--insecure", action="store_true", help="off loopback without a key: anyone who reaches the "
                   "port can score, build and delete banks")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics port (it cannot check a key)")
    p.add_argument("--http-port", type=F.PORT, default=8000)
    p.add_argument("--grpc-port", type=F.PORT, default=8001)
    p.add_argument("--metrics-port", type=F.PORT, default=8002)
    p.add_argument("--log", default=None, help="server log file (default: a temporary folder, printed at start)")
    p.add_argument("--ready-timeout", type=F.SECONDS, default=600.0, help="seconds to wait for every model to load")
    p.add_argument("--verbose", type=F.integer(0, 10), default=0, help="tritonserver --log-verbose level")
    p.add_argument("--max-restarts", type=F.integer(0, 1000), default=5,
                   help="restart a tritonserver that dies or whose model fails its canary, up to this many times "
                   "within ten minutes")
    p.add_argument("--restart-backoff", type=F.number(0.0, 60.0), default=1.0, metavar="SECONDS",
                   help="the first restart's delay; each further one within ten minutes waits twice as long (at most "
                   "60 s)")
    p.add_argument("--max-store-gb", type=F.number(0.0, 1e6, open_low=True), default=None,
                   help="what the bank store may hold: an add or a build past it is refused with what to delete "
                   "(default: no limit)")
    p.add_argument("--tritonserver", default=None,
                   help="a full Triton install's binary (NVIDIA's image: /opt/tritonserver/bin/tritonserver, with its "
                   "native backends) instead of the one the nvidia-pytriton wheel bundles")
    p.add_argument("--canary-interval", type=F.number(0.0, 3600.0), default=2.0,
                   help="seconds between canary requests through each Python-run model (0: none)")
    p.add_argument("--max-request-mb", type=F.integer(1, 4096), default=256, help="largest request body / gRPC message taken")
    p.add_argument("--max-inflight-mb", type=F.integer(1, 65536), default=512,
                   help="request bodies held at once, all connections together, over HTTP and (its own budget) over "
                        "gRPC (more: 503 / UNAVAILABLE, retry)")
    p.add_argument("--log-level", choices=LEVELS, default=None,
                   help=f"the least important lines shown, here and in the models' lines of the server log "
                   f"(default ${LEVEL_ENV} or info)")
    p.add_argument("--log-format", choices=FORMATS, default=None,
                   help=f"text (the lines as they read) or json (one object per line, for a log collector; default "
                   f"${FORMAT_ENV} or text)")
    return p


def main(argv=None, prog: str = "python -m serve") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    from_caller(args, parser, ("repository", "banks", "log"))
    if args.max_inflight_mb < args.max_request_mb:
        parser.error(f"--max-inflight-mb ({args.max_inflight_mb}) must be at least --max-request-mb "
                     f"({args.max_request_mb}): one request of the largest size must fit")
    if len({args.http_port, args.grpc_port, args.metrics_port}) < 3:
        parser.error(f"--http-port, --grpc-port and --metrics-port must differ, got {args.http_port}, "
                     f"{args.grpc_port}, {args.metrics_port}")
    for name, value in ((LEVEL_ENV, args.log_level), (FORMAT_ENV, args.log_format)):
        if value:
            os.environ[name] = value  # tritonserver's Python models read it too (postprocess.logs.to_triton)
    log = configure(args.log_level, args.log_format)
    key = args.key if args.key is not None else os.environ.get(ACCESS_KEY_ENV) or None
    if not is_loopback(args.host) and not key and not args.insecure:
        log.error(f"error: --host {args.host} opens the server to other machines: give an access key (--key or "
                  f"${ACCESS_KEY_ENV}; clients send it with the same variable), or --insecure on a network you trust")
        return 2
    if not is_loopback(args.host) and not key:  # --insecure: said once, where the operator reads the start
        log.warning(f"warning: --insecure: the server on {args.host} answers every machine that reaches it without a "
                    "key: anyone there can score, build and delete banks")

    stopping = StopFlag()

    def stop_request(*_):
        # a flag the start and the supervisor look at between their steps: a KeyboardInterrupt raised wherever the
        # signal landed once escaped the stop and left the process killed by SIGINT (exit -2 after a clean SIGTERM)
        stopping.set()

    signal.signal(signal.SIGTERM, stop_request)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # a background job's ignored Ctrl-C stays so
        signal.signal(signal.SIGINT, stop_request)
    server = None
    try:
        limits = Limits(max_request_bytes=args.max_request_mb << 20, max_inflight_bytes=args.max_inflight_mb << 20,
                        **image_side_limits(Path(args.repository)))
        server = LocalServer(args.repository, args.banks, args.host, args.http_port, args.grpc_port,
                             args.metrics_port, args.log, log_verbose=args.verbose, key=key,
                             metrics_host=args.metrics_host, limits=limits, tritonserver=args.tritonserver,
                             max_store_gb=args.max_store_gb)
        server.stopping = stopping
        log.info(f"starting tritonserver on {args.host} (log: {server.log_file}) ...")
        start = time.monotonic()
        server.start(args.ready_timeout)
        log.info(f"ready in {time.monotonic() - start:.1f} s: HTTP {server.http_url}, gRPC {server.grpc_url}, "
                 f"metrics {args.metrics_host}:{args.metrics_port}; banks in {server.banks}"
                 f"{'; access key required' if key else ''}. Ctrl-C stops it.")
        return supervise(server, args)
    except ServerError as err:
        log.error(f"error: {err}")
        return 2
    except StopRequested:
        return 0
    finally:  # a second stop request only sets the flag again: nothing cuts the stop short
        if server is not None and (server.process is not None or server.guards):
            log.info("stopping tritonserver ...")
            server.stop()


def supervise(server: LocalServer, args) -> int:
    """Restart tritonserver when it dies (a crash, the OOM killer) or one of its Python-run models fails its canary
    (a dead stub: ``serve.canary``): health says not ready at once, back-off 1, 2, 4 ... 60 s, the reason logged;
    banks are on disk and a build cut short leaves the previous version live. Gives up after --max-restarts
    within ten minutes (1); returns 0 once a stop is asked for (``server.stopping``)."""
    log = get_logger("serve")
    canaries = Canaries(server, args.canary_interval) if args.canary_interval > 0 else None
    deaths: list[float] = []
    try:
        while not server.stopping.is_set():
            reason = _why_down(server, canaries)
            if reason is None:
                server.stopping.wait(0.25)
                continue
            server.health_state = (False, reason)  # /v2/health/ready answers 503 from now until the restart is up
            now = time.monotonic()
            deaths = [t for t in deaths if now - t < 600] + [now]
            log.warning(f"{reason}; full log: {server.log_file}")
            if len(deaths) > args.max_restarts:
                log.error(f"error: {len(deaths)} restarts needed in ten minutes; giving up")
                return 1
            delay = min(60.0, args.restart_backoff * 2.0 ** (len(deaths) - 1))
            log.warning(f"restarting tritonserver in {delay:.3g} s (banks stay as they are in {server.banks}) ...")
            server.stop(keep_guards=True)  # what the server left: stubs, shared memory; clients wait at the guards
            if server.stopping.wait(delay):
                break
            try:
                server.start(args.ready_timeout)
                log.info(f"restarted: HTTP {server.http_url}, gRPC {server.grpc_url}")
            except ServerError as err:
                log.error(f"restart failed: {err}")
            if canaries is not None:
                canaries.reset()
        return 0
    finally:
        if canaries is not None:
            canaries.close()


def _why_down(server: LocalServer, canaries) -> str | None:
    """Why the server must be restarted, or None while it serves."""
    if server.process is None or server.process.poll() is not None:
        code = server.process.returncode if server.process is not None else -1  # -1: the last restart failed
        how = f"signal {code - 128}" if code > 128 else f"exit code {code}"
        return f"tritonserver died ({how}); its last error lines: {server.last_errors()[-3:] or 'none'}"
    if canaries is not None:
        healthy, failures = canaries.check()
        if not healthy:
            # a killed server fails its canaries too, often before its exit shows: name the death when it was one
            try:
                server.process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                return f"a model failed its canary ({failures})"
            return _why_down(server, None)
    return None


if __name__ == "__main__":
    sys.exit(main())
