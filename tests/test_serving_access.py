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
            for wrong, said in (("", "this server needs its access key"),
                                ("not-the-key-at-all-000", "the access key sent is not this server's")):
                stranger = PAClipClient(url, protocol, key=wrong)
                # a wrong key said as one (it read as a missing one), with how the commands send it
                with pytest.raises(ClientError, match=f"{said}: send it in .*--key, or \\$PA_CLIP_KEY"):
                    stranger.list_banks()
                with pytest.raises(ClientError):
                    stranger.score(lot[:1], "washer")
                stranger.close()
            keyed = PAClipClient(url, protocol, key=key)
            keyed.check_ready()
            assert keyed.list_banks() == []
            keyed.close()
        assert srv.ready()  # health stays open for probes
        # the administrative APIs too: metadata and the model's configuration, over gRPC and HTTP
        import grpc
        import urllib.error
        import urllib.request

        from tritonclient.grpc import service_pb2

        channel = grpc.insecure_channel(srv.grpc_url)
        for method, message in (("ServerMetadata", service_pb2.ServerMetadataRequest()),
                                ("ModelMetadata", service_pb2.ModelMetadataRequest(name="pa_clip")),
                                ("ModelConfig", service_pb2.ModelConfigRequest(name="pa_clip"))):
            call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
            for wrong in ([], [("triton-grpc-protocol-pa-clip-key", "not-the-key-at-all-000")]):
                with pytest.raises(grpc.RpcError) as refused:
                    call(message.SerializeToString(), metadata=wrong, timeout=30)
                assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED, (method, refused.value)
            assert call(message.SerializeToString(), metadata=[("triton-grpc-protocol-pa-clip-key", key)], timeout=30)
        channel.close()
        for path in ("/v2", "/v2/models/pa_clip/config"):
            for wrong in ({}, {"pa-clip-key": "not-the-key-at-all-000"}):
                with pytest.raises(urllib.error.HTTPError) as refused:
                    urllib.request.urlopen(urllib.request.Request(f"http://{srv.http_url}{path}", headers=wrong),
                                           timeout=30)
                assert refused.value.code == 401, path
            with urllib.request.urlopen(urllib.request.Request(f"http://{srv.http_url}{path}",
                                                               headers={"pa-clip-key": key}), timeout=30) as answer:
                assert answer.status == 200, path
        # a call without the key is refused from its metadata, before its message is read: one whose message never
        # comes is answered at once (the guard held every such message, up to 256 MB each, before it checked)
        import time

        channel = grpc.insecure_channel(srv.grpc_url)

        def never_sends():
            time.sleep(30)
            yield b""

        call = channel.stream_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as refused:
            call(never_sends(), timeout=10)
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED, refused.value
        channel.close()
        # health answers without the key, so it takes no body (one without the key filled the in-flight budget);
        # a length header of non-ASCII digits is answered, not a dropped connection
        import http.client

        host, port = srv.http_url.split(":")
        for method, path, headers, body, status in [
                ("GET", "/v2/health/live", {}, b"x" * 64, 413),
                ("POST", "/v2/models/pa_clip/infer", {"pa-clip-key": key, "Inference-Header-Content-Length": "\u00b2"},
                 b"{}", 400)]:
            connection = http.client.HTTPConnection(host, int(port), timeout=30)
            connection.putrequest(method, path)
            for name, value in {**headers, "Content-Length": str(len(body))}.items():
                connection.putheader(name, value.encode("utf-8"))
            connection.endheaders(body)
            assert connection.getresponse().status == status, (method, path)
            connection.close()
        # the CLI takes the key from the environment
        proc = subprocess.run([sys.executable, "client/infer.py", "--url", srv.http_url, "--images", str(workdir),
                               "--bank", "washer", "--out", str(workdir / "keyed_out"), "--quiet"], cwd=ROOT,
                              capture_output=True, text=True, env={**os.environ, "PA_CLIP_KEY": "wrong-key-000000"})
        assert proc.returncode == 2
    finally:
        srv.stop()


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.1", "192.168.1.5"])
def test_serve_refuses_to_open_up_without_a_key(repository, host):
    """Any address off loopback, not only the wildcard: one interface's address opens the server as much."""
    proc = subprocess.run([sys.executable, "-m", "serve", "--repository", str(repository), "--host", host],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PA_CLIP_KEY"})
    assert proc.returncode == 2 and "give an access key" in proc.stderr and host in proc.stderr, proc.stderr



def test_a_start_that_fails_before_the_server_runs_leaves_its_ports_free(repository, tmp_path):
    """The public ports were taken before the log was opened and the command built: a start that failed there left
    them listening, and the next start on them failed with "address already in use"."""
    import socket

    from serve.local import ServerError

    http, grpc, metrics = free_ports(3)
    (tmp_path / "a_folder").mkdir()
    srv = LocalServer(repository, tmp_path / "banks", http_port=http, grpc_port=grpc, metrics_port=metrics,
                      log_file=tmp_path / "a_folder")
    with pytest.raises(ServerError, match="cannot write the server log"):
        srv.start(timeout=30)
    for port in (http, grpc):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))  # free again


def test_a_restart_that_fails_keeps_the_public_ports_open_saying_not_ready(repository, tmp_path):
    """The supervisor restarts tritonserver behind guards it keeps (clients are told "not ready", not refused); a
    restart that failed closed them, so the public ports refused connections through the back-off, and another
    process could take them. Here the restart fails at once (no time to get ready)."""
    import socket
    import urllib.error
    import urllib.request

    from serve.local import ServerError

    http, grpc, metrics = free_ports(3)
    srv = LocalServer(repository, tmp_path / "banks", http_port=http, grpc_port=grpc, metrics_port=metrics)
    srv.internal_http, srv.internal_grpc = free_ports(2)
    srv._start_guards()  # what a first start left (the supervisor stopped the server with keep_guards=True)
    try:
        srv.health_state = (False, "restarting")
        with pytest.raises(ServerError, match="not ready"):
            srv.start(timeout=0.01)
        assert len(srv.guards) == 2
        with pytest.raises(urllib.error.HTTPError) as answered:
            urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=10)
        assert answered.value.code == 503  # the guard answers: not ready, retry
        socket.create_connection(("127.0.0.1", grpc), timeout=5).close()
    finally:
        srv.stop()
    assert not srv.guards


def test_serve_opened_up_with_insecure_says_so_at_its_start(tmp_path):
    """--insecure opened the server to the network with nothing said (the ready line only lacked "access key
    required"). A repository that is none stops the start right after the check: nothing is bound."""
    proc = subprocess.run([sys.executable, "-m", "serve", "--repository", str(tmp_path), "--host", "0.0.0.0",
                           "--insecure"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PA_CLIP_KEY"})
    assert proc.returncode == 2 and "is not a model repository" in proc.stderr, proc.stderr
    assert "warning: --insecure: the server on 0.0.0.0 answers every machine" in proc.stderr, proc.stderr
