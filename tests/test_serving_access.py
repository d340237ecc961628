"""Access to a real tritonserver on loopback: with a key, nothing but health answers without it (HTTP, gRPC, the
CLI); ``python -m serve`` refuses to open up to other machines without one."""

import os
import subprocess
import sys

import pytest

from serving_helpers import ROOT, ClientError, LocalServer, PAClipClient, free_ports

pytestmark = pytest.mark.server


def test_with_an_access_key_nothing_but_health_answers_without_it(repository, workdir, lot):
    key = "k" * 8 + "-test-key-0123456789"
    http, grpc, metrics = free_ports(3)
    srv = LocalServer(repository, workdir / "banks_keyed", http_port=http, grpc_port=grpc, metrics_port=metrics,
                      key=key).start(timeout=180)
    try:
        for protocol, url in (("http", srv.http_url), ("grpc", srv.grpc_url)):
            for wrong in ("", "not-the-key-at-all-000"):
                stranger = PAClipClient(url, protocol, key=wrong)
                with pytest.raises(ClientError):
                    stranger.list_banks()
                with pytest.raises(ClientError):
                    stranger.score(lot[:1], "washer")
                stranger.close()
            keyed = PAClipClient(url, protocol, key=key)
            keyed.check_ready()
            assert keyed.list_banks() == []
            keyed.close()
        assert srv.ready()  # health stays open for probes
        # the CLI takes the key from the environment
        proc = subprocess.run([sys.executable, "client/infer.py", "--url", srv.http_url, "--images", str(workdir),
                               "--bank", "washer", "--out", str(workdir / "keyed_out"), "--quiet"], cwd=ROOT,
                              capture_output=True, text=True, env={**os.environ, "PA_CLIP_KEY": "wrong-key-000000"})
        assert proc.returncode == 2
    finally:
        srv.stop()


def test_serve_refuses_to_open_up_without_a_key(repository):
    proc = subprocess.run([sys.executable, "-m", "serve", "--repository", str(repository), "--host", "0.0.0.0"],
                          cwd=ROOT, capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                                       if k != "PA_CLIP_KEY"})
    assert proc.returncode == 2 and "give an access key" in proc.stderr

