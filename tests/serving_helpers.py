"""What the server-tier modules (tests/test_serving_*.py) share besides conftest's fixtures: the skip when there is
no tritonserver here, ``start_server`` and ``metrics_text``. Importing this module skips the importing test module
when tritonclient or the nvidia-pytriton bundle's tritonserver is absent."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("tritonclient.http", reason="tritonclient is not installed: pip install -e '.[serve]'")
try:
    from serve.local import LocalServer, ServerError, bundled_server, free_ports

    bundled_server()
except Exception as err:  # noqa: BLE001
    pytest.skip(f"tritonserver from the nvidia-pytriton wheel is not available here: {err}", allow_module_level=True)

from client.triton_client import ClientError, PAClipClient  # noqa: E402

__all__ = ["ROOT", "ClientError", "LocalServer", "PAClipClient", "ServerError", "free_ports", "metrics_text",
           "start_server"]


def start_server(repository: Path, banks: Path, log: Path, **options) -> LocalServer:
    """A LocalServer on three free loopback ports, started (``options``: LocalServer's, e.g. ``limits``)."""
    http, grpc, metrics = free_ports(3)
    return LocalServer(repository, banks, http_port=http, grpc_port=grpc, metrics_port=metrics,
                       log_file=log, **options).start(timeout=180)


def metrics_text(server: LocalServer) -> str:
    """What the server's metrics port answers (Prometheus text)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        return response.read().decode()
