"""python -m serve: serve a model repository with a local tritonserver until Ctrl-C.

Binds 127.0.0.1 by default (HTTP 8000, gRPC 8001, metrics 8002 on loopback). Off loopback (--host 0.0.0.0) it needs
an access key (--key, or $PA_CLIP_KEY): inference, bank actions and every administrative API then answer only
requests carrying it (header / gRPC metadata "pa-clip-key"; client/infer.py and the benchmarks send $PA_CLIP_KEY).
Health stays open for probes; the metrics port stays on loopback unless --metrics-host says otherwise.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from postprocess.contract import ACCESS_KEY_ENV

from .local import LocalServer, ServerError, is_loopback


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", default="model_repository", help="model repository (what `python -m export` wrote)")
    p.add_argument("--banks", default="banks", help="bank store folder (created if missing; survives restarts)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--key", default=None,
                   help=f"access key every request must carry (default: ${ACCESS_KEY_ENV}); required off loopback")
    p.add_argument("--insecure", action="store_true", help="off loopback without a key: anyone who reaches the "
                   "port can score, build and delete banks")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics port (it cannot check a key)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--log", default=None, help="server log file (default: a temporary folder, printed at start)")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for every model to load")
    p.add_argument("--verbose", type=int, default=0, help="tritonserver --log-verbose level")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    key = args.key if args.key is not None else os.environ.get(ACCESS_KEY_ENV) or None
    if not is_loopback(args.host) and not key and not args.insecure:
        print(f"error: --host {args.host} opens the server to other machines: give an access key (--key or "
              f"${ACCESS_KEY_ENV}; clients send it with the same variable), or --insecure on a network you trust",
              file=sys.stderr)
        return 2
    try:
        server = LocalServer(args.repository, args.banks, args.host, args.http_port, args.grpc_port,
                             args.metrics_port, args.log, log_verbose=args.verbose, key=key,
                             metrics_host=args.metrics_host)
        print(f"starting tritonserver on {args.host} (log: {server.log_file}) ...", file=sys.stderr, flush=True)
        start = time.monotonic()
        server.start(args.ready_timeout)
    except ServerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"ready in {time.monotonic() - start:.1f} s: HTTP {server.http_url}, gRPC {server.grpc_url}, "
          f"metrics {args.metrics_host}:{args.metrics_port}; banks in {server.banks}"
          f"{'; access key required' if key else ''}. Ctrl-C stops it.",
          file=sys.stderr, flush=True)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    try:
        while not stopping:
            if server.process.poll() is not None:
                print(f"error: tritonserver exited with code {server.process.returncode}; see {server.log_file}",
                      file=sys.stderr)
                server.stop()
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    print("stopping tritonserver ...", file=sys.stderr, flush=True)
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
