"""The guards in front of a real tritonserver (serve.http_guard, serve.grpc_guard) and the canaries behind health:
what an independent probe used to knock the server over with, replayed, and what must hold instead."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.client import HTTPResponse
from pathlib import Path

import numpy as np
import pytest

from conftest import LOT_IMAGE_SIZE as SIZE, stub_pids
from serving_helpers import ROOT, ClientError, PAClipClient, free_ports, start_server

pytestmark = pytest.mark.server

pytest.importorskip("h11", reason="h11 is not installed: pip install -e '.[serve]'")

from serve.http_guard import INTERNAL_HEADER, HttpGuard  # noqa: E402
from serve.request_checks import Limits, image_side_limits  # noqa: E402

MAX_REQUEST = 16 << 20
CRASH_INPUT = {"name": "images", "shape": [1, 100000, 100000, 3], "datatype": "UINT8", "data": [0] * 10}
BANK_INPUT = {"name": "bank", "shape": [1, 1], "datatype": "BYTES", "data": ["washer"]}


@pytest.fixture(scope="module")
def server(repository, workdir):
    """This module's server: conftest's, with a 16 MB request limit."""
    limits = Limits(max_request_bytes=MAX_REQUEST, **image_side_limits(repository))
    srv = start_server(repository, workdir / "banks", workdir / "server.log", limits=limits)
    client = PAClipClient(srv.http_url)
    yield srv
    client.close()
    srv.stop()


@pytest.fixture(scope="module")
def bank(server, lot):
    client = PAClipClient(server.http_url)
    client.add_images("washer", "washer", lot[:4], reset=True)
    client.build_bank("washer", {"mode": "mutual"})
    client.close()
    return "washer"


def exchange(url: str, data: bytes, timeout: float = 30) -> tuple[int, str]:
    """Send raw bytes; the response read with the standard library's HTTP parser."""
    host, port = url.split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        response = HTTPResponse(sock)
        response.begin()
        return response.status, response.read().decode(errors="replace")


def request(body: bytes, target: str = "/v2/models/pa_clip/infer", method: str = "POST", version: str = "HTTP/1.1",
            headers: str | None = None) -> bytes:
    head = headers if headers is not None else f"Host: x\r\nContent-Length: {len(body)}\r\n"
    return f"{method} {target} {version}\r\n{head}\r\n".encode() + body


def infer_body(*inputs) -> bytes:
    return json.dumps({"inputs": list(inputs)}).encode()


def probe_cases() -> list[tuple[str, bytes, int | None, str]]:
    """(what, raw request, expected status or None for any 4xx, words expected in the answer)."""
    crash = infer_body(CRASH_INPUT, BANK_INPUT)
    small = infer_body({"name": "images", "shape": [1, 2, 2, 3], "datatype": "UINT8", "data": [0] * 12}, BANK_INPUT)
    cases = [
        # the bypasses the probe found: the 300-byte request that aborted tritonserver, written other ways
        ("plain", request(crash), 413, "claims shape"),
        ("two spaces", request(crash, target=" /v2/models/pa_clip/infer"), 400, "malformed HTTP request"),
        ("absolute form", request(crash, target="http://x/v2/models/pa_clip/infer"), 400, "plain path"),
        ("duplicate shape, huge first",
         request(b'{"inputs": [{"name": "images", "shape": [1, 100000, 100000, 3], "shape": [1, 2, 2, 3], '
                 b'"datatype": "UINT8", "data": [0,0,0,0,0,0,0,0,0,0,0,0]}]}'), 400, "duplicate key 'shape'"),
        ("duplicate inputs",
         request(b'{"inputs": [{"name": "images", "shape": [1, 100000, 100000, 3], "datatype": "UINT8", '
                 b'"data": [0]}], "inputs": []}'), 400, "duplicate key 'inputs'"),
        ("900 levels", request(b'{"inputs": [{"name": "images", "shape": [1], "datatype": "UINT8", "data": ' +
                               b"[" * 900 + b"0" + b"]" * 900 + b"}]}"), 400, "nested"),
        ("0x0 image", request(infer_body({"name": "images", "shape": [1, 0, 0, 3], "datatype": "UINT8",
                                          "data": []}, BANK_INPUT)), 400, "at least one pixel"),
        ("1204x1204 image", request(infer_body({"name": "images", "shape": [1, 1204, 1204, 3],
                                                "datatype": "UINT8", "data": [0]}, BANK_INPUT)), 413,
         f"at most {SIZE} pixels"),
        ("versioned target", request(crash, target="/v2/models/pa_clip/versions/1/infer"), 413, "claims shape"),
    ]
    for target in ("/v2/models/pa_clip/infer/", "/v2//models/pa_clip/infer", "/v2/models/pa%5Fclip/infer",
                   "/v2/models/pa_clip/infer?x=1", "/v2/models/./pa_clip/infer", "/v2/models/../models/pa_clip/infer",
                   "/v2/models/pa_clip/infer#", "v2/models/pa_clip/infer", "*", "/v2/models/pa_clip/infer%00",
                   "/V2/models/pa_clip/infer", "/v2\\models\\pa_clip\\infer", "//x/v2/models/pa_clip/infer",
                   "https://127.0.0.1/v2/models/pa_clip/infer", "/v2/models/pa_clip/infer;x"):
        cases.append((f"target {target}", request(crash, target=target), 400, ""))
    for method in ("post", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "HEAD"):
        cases.append((f"method {method}", request(crash, method=method), None, ""))
    for version in ("HTTP/1.0", "HTTP/1.1 ", "HTTP/2.0", "HTTP/0.9", "HTTPS/1.1", "HTTP/1.1\r\nX"):
        cases.append((f"version {version!r}", request(crash, version=version), None, ""))
    length = len(crash)
    for what, head in [
        ("two lengths", f"Host: x\r\nContent-Length: {length}\r\nContent-Length: 10\r\n"),
        ("plus length", f"Host: x\r\nContent-Length: +{length}\r\n"),
        ("hex length", f"Host: x\r\nContent-Length: 0x{length:x}\r\n"),
        ("length list", f"Host: x\r\nContent-Length: {length}, {length}\r\n"),
        ("negative length", "Host: x\r\nContent-Length: -1\r\n"),
        ("chunked", "Host: x\r\nTransfer-Encoding: chunked\r\n"),
        ("chunked and length", f"Host: x\r\nTransfer-Encoding: chunked\r\nContent-Length: {length}\r\n"),
        ("odd encoding", f"Host: x\r\nTransfer-Encoding: gzip\r\nContent-Length: {length}\r\n"),
        ("no length", "Host: x\r\n"),
        ("no host", f"Content-Length: {length}\r\n"),
        ("two hosts", f"Host: x\r\nHost: y\r\nContent-Length: {length}\r\n"),
        ("folded header", f"Host: x\r\nX-A: 1\r\n  folded\r\nContent-Length: {length}\r\n"),
        ("no colon", f"Host: x\r\nBroken header\r\nContent-Length: {length}\r\n"),
        ("space before colon", f"Host: x\r\nContent-Length : {length}\r\n"),
        ("NUL in header", f"Host: x\r\nX-A: a\0b\r\nContent-Length: {length}\r\n"),
        ("two header lengths",
         f"Host: x\r\nContent-Length: {length}\r\nInference-Header-Content-Length: 5\r\n"
         f"Inference-Header-Content-Length: {length}\r\n"),
        ("header length past the body", f"Host: x\r\nContent-Length: {length}\r\nInference-Header-Content-Length: "
                                        f"{length + 1}\r\n"),
        ("header length not a number", f"Host: x\r\nContent-Length: {length}\r\nInference-Header-Content-Length: "
                                       "x\r\n"),
        ("huge length", f"Host: x\r\nContent-Length: {1 << 40}\r\n"),
        ("bare LF", f"Host: x\nContent-Length: {length}\n"),
    ]:
        cases.append((f"header: {what}", request(crash, headers=head), None, ""))
    for count in (33, 100, 5000, 100_000):
        cases.append((f"{count} levels", request(b'{"inputs": ' + b"[" * count + b"]" * count + b"}"), 400, "nested"))
    for constant in (b"NaN", b"Infinity", b"-Infinity"):
        cases.append((f"{constant!r}", request(b'{"inputs": [{"name": "images", "shape": [1], "datatype": "FP32", '
                                               b'"data": [' + constant + b"]}]}"), 400, "not JSON"))
    for cut in range(1, len(small), max(1, len(small) // 60)):  # truncated at ~60 places
        cases.append((f"cut at {cut}", request(small[:cut]), 400, "not valid JSON"))
    for key in ("name", "datatype", "data", "parameters"):
        item = json.dumps({"name": "images", "shape": [1, 2, 2, 3], "datatype": "UINT8", "data": [0] * 12,
                           "parameters": {}})
        doubled = item[:-1] + f', "{key}": {json.dumps(json.loads(item)[key])}}}'
        cases.append((f"duplicate {key}", request(b'{"inputs": [' + doubled.encode() + b"]}"), 400, "duplicate key"))
    cases.append(("duplicate binary size", request(
        b'{"inputs": [{"name": "images", "shape": [1, 2, 2, 3], "datatype": "UINT8", "parameters": '
        b'{"binary_data_size": 12, "binary_data_size": 0}}]}'), 400, "duplicate key"))
    for body in (b"", b"null", b"[]", b"{}", b'{"inputs": null}', b'{"inputs": "x"}', b'{"inputs": [1]}',
                 b'{"inputs": ["x"]}', b'{"inputs": [null]}', b'{"inputs": [[]]}', b"\xef\xbb\xbf{}", b"\xff\xfe",
                 b'{"inputs": [{}]}', b'"inputs"', b"1", b"true", b"{'inputs': []}", b'{"inputs": [], }'):
        cases.append((f"body {body[:20]!r}", request(body), 400, ""))
    for shape in ("null", '"1,2,2,3"', "[[1, 2], 2, 3]", "[1.0, 2, 2, 3]", "[true, 2, 2, 3]", "[-1, 2, 2, 3]",
                  "[18446744073709551617, 1, 1, 3]", "[9223372036854775807, 1, 1, 3]", "[1e9, 1, 1, 3]", "{}",
                  "[1, 2, 2, 3, -5]", '["1", 2, 2, 3]'):
        cases.append((f"shape {shape}", request(b'{"inputs": [{"name": "images", "shape": ' + shape.encode() +
                                                b', "datatype": "UINT8", "data": [0]}]}'), None, ""))
    for size in ("-1", '"12"', "12.0", "1e3", "99999999", "null", "true", "[12]"):
        body = (b'{"inputs": [{"name": "images", "shape": [1, 2, 2, 3], "datatype": "UINT8", "parameters": '
                b'{"binary_data_size": ' + size.encode() + b"}}]}")
        cases.append((f"binary size {size}", request(body + bytes(12), headers=(
            f"Host: x\r\nContent-Length: {len(body) + 12}\r\nInference-Header-Content-Length: {len(body)}\r\n")),
            400, ""))
    for datatype, data in (("BYTES", '["a"]'), ("FP32", "[0]"), ("INT64", "[0]"), ("FOO", "[0]")):
        cases.append((f"{datatype} claim", request(b'{"inputs": [{"name": "bank", "shape": [1000000000, 1], '
                                                   b'"datatype": "' + datatype.encode() + b'", "data": ' +
                                                   data.encode() + b"}]}"), None, ""))
    # other endpoints: their JSON is read strictly too
    for target, body in (("/v2/repository/models/pa_clip/load", b'{"parameters": {}, "parameters": {}}'),
                         ("/v2/systemsharedmemory/region/r/register", b'{"key": "/a", "key": "/b"}'),
                         ("/v2/systemsharedmemory/region/r/register", b"[" * 2000 + b"]" * 2000),
                         ("/v2/systemsharedmemory/region/r/register", b'{"key": "/a/../b", "byte_size": 8}'),
                         ("/v2/trace/setting", b'{"trace_level": ["TIMESTAMPS"], "trace_level": []}'),
                         ("/v2/logging", b'{"log_verbose_level": NaN}'),
                         ("/v2/models/pa_clip/trace/setting", b"{"),
                         ("/v2/repository/index", b"{,}")):
        cases.append((f"{target} {body[:16]!r}", request(body, target=target), None, ""))
    for target in ("/v2/models/../v2/health/ready", "/", "/metrics", "/v2/models/pa_clip/generate_stream/../infer"):
        cases.append((f"GET {target}", request(b"", target=target, method="GET"), None, ""))
    return cases


def test_the_probes_requests_are_refused_and_the_server_stays_up(server, bank, lot):
    cases = probe_cases()
    assert len(cases) >= 180
    wrong = []
    for what, raw, status, words in cases:
        try:
            got, answer = exchange(server.http_url, raw)
        except (ConnectionError, socket.timeout, OSError) as err:  # closed without an answer: also a refusal
            got, answer = 0, str(err)
        fine = (got == status) if status is not None else (400 <= got < 500 or got in (501, 505) or got == 0)
        if not fine or words not in answer or got == 0 and status is not None:
            wrong.append(f"{what}: {got} {answer[:160]}")
    assert not wrong, "\n".join(wrong)
    assert server.process.poll() is None and server.ready()
    log = server.log_file.read_text(errors="replace")
    assert "bad_alloc" not in log and "terminate called" not in log
    client = PAClipClient(server.http_url)
    maps, _ = client.score(lot[:1], bank)
    client.close()
    assert maps.shape == (1, SIZE, SIZE)


def test_tritonserver_itself_answers_only_requests_carrying_the_guards_secret(server, bank, lot):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    body = json.dumps({"inputs": [{"name": "images", "shape": [1, SIZE, SIZE, 3], "datatype": "UINT8",
                                   "data": lot[0].reshape(-1).tolist()}, BANK_INPUT],
                       "parameters": {"binary_data_output": True}}).encode()  # FP16 maps come back binary only
    assert exchange(server.internal_http_url, request(body))[0] in (401, 403)
    secret = f"Host: x\r\nContent-Length: {len(body)}\r\n{INTERNAL_HEADER}: {server.secret}\r\n"
    status, answer = exchange(server.internal_http_url, request(body, headers=secret))
    assert status == 200, answer
    assert exchange(server.internal_http_url, request(b"", "/v2/health/ready", "GET"))[0] == 200  # probes
    grpc_client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.internal_grpc}")
    with pytest.raises(InferenceServerException):
        grpc_client.get_model_repository_index()
    assert grpc_client.get_model_repository_index(
        headers={f"triton-grpc-protocol-{INTERNAL_HEADER}": server.secret}) is not None
    assert grpc_client.is_server_ready()
    grpc_client.close()
    http_client = httpclient.InferenceServerClient(server.internal_http_url)
    with pytest.raises(InferenceServerException):
        http_client.get_model_repository_index()
    http_client.close()


def test_the_servers_own_shared_memory_cannot_be_registered(server, bank, lot):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    regions = sorted(Path("/dev/shm").glob(server.shm_prefix + "*"))
    assert regions, "the server's backends have no shared memory regions"
    alias = Path("/dev/shm") / f"alias_{os.getpid()}_{time.monotonic_ns()}"
    os.link(regions[0], alias)
    try:
        for client in (httpclient.InferenceServerClient(server.http_url),
                       grpcclient.InferenceServerClient(server.grpc_url)):
            for key in (f"/{regions[0].name}", f"/{alias.name}"):
                with pytest.raises(InferenceServerException, match="belongs to the server itself"):
                    client.register_system_shared_memory("stolen", key, 1 << 20)
            client.close()
    finally:
        alias.unlink()
    # a client's own region still works (the ensemble test in test_serving_contract.py scores through one)
    client = PAClipClient(server.http_url, shared_memory=True)
    maps, _ = client.score(lot[:1], bank)
    client.close()
    assert maps.shape == (1, SIZE, SIZE) and server.process.poll() is None


def test_limits_come_before_work_over_http_and_grpc(server, bank, lot):
    """(The encoder's own refusal of a large image needs a dynamic-size encoder: tests/test_serving_scale.py, the
    non-square lot.)"""
    big = np.zeros((1, 1204, 1204, 3), np.uint8)
    for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        client = PAClipClient(url, protocol)
        with pytest.raises(ClientError, match=f"at most {SIZE} pixels"):
            client.score(big, bank)
        with pytest.raises(ClientError, match="at least one pixel"):
            client.score(np.zeros((1, 0, 0, 3), np.uint8), bank)
        client.close()
    # gRPC's own maximum receive size: a message over the server's limit never reaches Triton
    huge = np.zeros((1, 2600, 2600, 3), np.uint8)  # 20 MB > 16 MB
    client = PAClipClient(server.grpc_url, "grpc")
    with pytest.raises(ClientError, match="(?i)larger than max|RESOURCE_EXHAUSTED"):
        client.score(huge, bank)
    client.close()
    assert server.process.poll() is None


def test_slow_clients_time_out_and_held_bodies_are_capped(server, bank):
    limits = Limits(max_request_bytes=1 << 20, max_inflight_bytes=1 << 20, idle_timeout_s=1.0, head_timeout_s=1.0,
                    read_timeout_s=1.0)
    port = free_ports(1)[0]
    guard = HttpGuard("127.0.0.1", port, server.internal_http, limits, secret=server.secret).start()
    try:
        slow = []
        for _ in range(50):  # half a head each, never finished
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"POST /v2/models/pa_clip/infer HTTP/1.1\r\nHost: x\r\n")
            slow.append(sock)
        stalled = socket.create_connection(("127.0.0.1", port), timeout=10)  # a body that stops coming
        stalled.sendall(b"POST /v2/models/pa_clip/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 950000\r\n\r\n{"
                        + b" " * 899_999)
        time.sleep(0.3)  # read by the guard: it holds what arrived
        # while it holds 900 kB, a second big body is over the 1 MB in flight: 503, retry
        status, answer = exchange(f"127.0.0.1:{port}", request(b"x" * 200_000))
        assert status == 503 and "retry" in answer, answer
        for sock in [*slow, stalled]:  # each dropped without an answer once its timeout passed
            try:
                assert sock.recv(4096) == b"", "a slow client got an answer"
            except ConnectionResetError:
                pass
            sock.close()
        assert guard.budget.held == 0
        # the bytes are free again: the same request is read and checked now
        status, answer = exchange(f"127.0.0.1:{port}", request(b"x" * 200_000))
        assert status == 400 and "not valid JSON" in answer
        idle = socket.create_connection(("127.0.0.1", port), timeout=10)
        idle.sendall(request(b"", "/v2/health/live", "GET"))
        time.sleep(2.5)  # over the idle timeout after its answer
        received = b""
        while chunk := idle.recv(4096):
            received += chunk
        assert received.startswith(b"HTTP/1.1 200"), received  # answered, then closed for idling
        idle.close()
    finally:
        guard.stop()


def test_grpc_messages_in_flight_are_capped_like_http_bodies(server, bank, lot):
    """The gRPC guard forwards at most max_inflight_bytes of messages at once (keyed calls could each hold
    --max-request-mb while Triton works): while the budget is taken, a message that does not fit is UNAVAILABLE with
    "retry"; it is given back on every path (served, refused)."""
    import grpc

    from serve.grpc_guard import GrpcGuard

    images = lot[:1]  # 112 x 112 x 3 bytes and a few hundred of framing
    limits = Limits(max_request_bytes=MAX_REQUEST, max_inflight_bytes=1 << 20)
    port = free_ports(1)[0]
    guard = GrpcGuard("127.0.0.1", port, server.internal_grpc, limits, secret=server.secret).start()
    client = PAClipClient(f"127.0.0.1:{port}", "grpc")
    try:
        held = (1 << 20) - images.nbytes  # another call's message, being forwarded
        guard.budget.reserve(held)
        with pytest.raises(ClientError, match="retry in a moment"):
            client.score(images, bank)
        assert guard.budget.held == held
        guard.budget.release(held)
        scores, _ = client.score(images, bank)  # fits now
        assert np.isfinite(scores).all()
        with pytest.raises(ClientError, match="invalid bank id"):  # the model's refusal, forwarded: given back too
            client.score(images, "washer\0x")
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        with pytest.raises(grpc.RpcError, match="malformed"):  # the guard's own refusal after booking
            channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(b"\xff\xff\xff\x01", timeout=30)
        channel.close()
        assert guard.budget.held == 0
    finally:
        client.close()
        guard.stop()


def test_limits_agree_with_triton_and_every_refusal_is_a_4xx(server, bank, lot):
    """Issue 25's smaller finds, each refused now: heads Triton drops (a 9 KB head got 502, larger ones no answer),
    identical framing headers twice, other transfer codings (501), UINT8 JSON data that is not unsigned integers
    (Triton's own 500), names with a NUL over gRPC ("pa_clip\\0x" was served as pa_clip), malformed messages and
    registrations Triton cannot make (INTERNAL), a 1 MB category name (stored)."""
    import grpc
    from tritonclient.grpc import service_pb2

    from serve.http_guard import MAX_HEAD_BYTES

    small = infer_body({"name": "images", "shape": [1, 2, 2, 3], "datatype": "UINT8", "data": [0] * 12}, BANK_INPUT)
    pad = lambda n: f"Host: x\r\nX-Pad: {'a' * n}\r\n"  # noqa: E731
    cases = [
        ("a head just under the limit", request(b"", "/v2/health/live", "GET", headers=pad(MAX_HEAD_BYTES - 200)),
         200, ""),
        ("a head over it, in one piece", request(b"", "/v2/health/live", "GET", headers=pad(MAX_HEAD_BYTES + 10)),
         431, "at most"),
        ("a 20 KB head", request(b"", "/v2/health/live", "GET", headers=pad(20_000)), 431, ""),
        ("identical lengths", request(small, headers=f"Host: x\r\nContent-Length: {len(small)}\r\n"
                                                     f"Content-Length: {len(small)}\r\n"), 400, "more than once"),
        ("gzip", request(small, headers=f"Host: x\r\nTransfer-Encoding: gzip\r\nContent-Length: {len(small)}\r\n"),
         400, "Content-Length"),
    ]
    for data in ("[-1]", "[256]", "[1.5]", '["a"]', "[true]", "[null]"):
        # 32x32: at least the encoder's patch, which the guard asks before the values
        body = infer_body({"name": "images", "shape": [1, 32, 32, 1], "datatype": "UINT8",
                           "data": json.loads(data) + [0] * (32 * 32 - 1)}, BANK_INPUT)
        cases.append((f"UINT8 data {data}", request(body), 400, "UINT8 data must be integers in [0, 255]"))
    wrong = []
    for what, raw, status, words in cases:
        try:
            got, answer = exchange(server.http_url, raw)
        except (ConnectionError, socket.timeout, OSError) as err:
            got, answer = 0, str(err)
        if got != status or words not in answer:
            wrong.append(f"{what}: {got} {answer[:160]}")
    assert not wrong, "\n".join(wrong)

    channel = grpc.insecure_channel(server.grpc_url)
    method = lambda name: channel.unary_unary(f"/inference.GRPCInferenceService/{name}")  # noqa: E731
    for name, message, words in (
            ("ModelMetadata", b"\xff\xff\xff\x01", "malformed ModelMetadataRequest"),
            ("ModelMetadata", service_pb2.ModelMetadataRequest(name="pa_clip\0x").SerializeToString(), "NUL"),
            ("ModelReady", service_pb2.ModelReadyRequest(name="pa_clip\0x").SerializeToString(), "NUL"),
            ("SystemSharedMemoryRegister", service_pb2.SystemSharedMemoryRegisterRequest(
                name="r", key="/pa_clip_test_no_such_region", byte_size=8).SerializeToString(), "")):
        with pytest.raises(grpc.RpcError) as refused:
            method(name)(message, timeout=30)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (name, refused.value)
        assert words in (refused.value.details() or ""), refused.value.details()
    assert service_pb2.ModelReadyResponse.FromString(method("ModelReady")(
        service_pb2.ModelReadyRequest(name="pa_clip").SerializeToString(), timeout=30)).ready
    channel.close()
    client = PAClipClient(server.http_url)
    with pytest.raises(ClientError, match="at most 200 characters"):
        client.add_images("long_name", "x" * (1 << 20), lot[:2], reset=True)
    client.close()
    assert server.process.poll() is None and server.ready()


def test_clients_that_claim_much_and_trickle_do_not_stop_valid_requests(server, bank, lot):
    """The probe: two connections claiming 256 MB bodies and sending a byte now and then were booked at their claim
    against --max-inflight-mb (512), and every other request got 503 for as long as they trickled. Bodies are booked
    as they arrive now, and a body under the minimum rate after the grace period is dropped."""
    import threading

    limits = Limits(max_request_bytes=256 << 20, max_inflight_bytes=512 << 20, body_grace_s=3.0,
                    min_body_rate_bps=1024, read_timeout_s=30.0)
    port = free_ports(1)[0]
    guard = HttpGuard("127.0.0.1", port, server.internal_http, limits, secret=server.secret).start()
    stop = threading.Event()
    dropped = []

    def trickle():
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(b"POST /v2/models/pa_clip/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 268435456\r\n\r\n")
        started = time.monotonic()
        try:
            while not stop.is_set():
                sock.sendall(b"{")
                time.sleep(0.25)
        except OSError:  # the guard closed it
            dropped.append(time.monotonic() - started)
        finally:
            sock.close()

    threads = [threading.Thread(target=trickle) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)  # both are trickling, each claiming 256 MB: the whole budget under the old booking
        client = PAClipClient(f"127.0.0.1:{port}")
        started = time.monotonic()
        for _ in range(3):
            maps, scores = client.score(lot[:2], bank)  # valid requests are served meanwhile
            assert maps.shape[0] == 2 and np.isfinite(scores).all()
        assert client.bank_info(bank)["bank"] == bank
        client.close()
        assert time.monotonic() - started < 20 and len(dropped) < 2  # served while they still trickled
        for t in threads:
            t.join(15)
        assert len(dropped) == 2 and all(2.5 <= d <= 10 for d in dropped), dropped  # dropped after the grace
        assert guard.budget.held == 0
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        guard.stop()


KEY = "k" * 8 + "-test-key-0123456789"


def test_keyless_grpc_health_calls_cannot_hold_the_workers(server):
    """The probe: health answers without the key, and a unary handler holds a worker thread until its message
    comes: 16 keyless ServerLive calls that never sent one held every worker (keyed calls timed out), 64 reached
    grpcio's maximum_concurrent_rpcs (RESOURCE_EXHAUSTED). Now a few are handled at once (the others refused at
    once), each cancelled when its message has not come within keyless_timeout_s. Connections are capped too
    (max_connections), and one that never starts HTTP/2 is closed after keyless_timeout_s."""
    import threading

    import grpc
    from tritonclient.grpc import service_pb2

    from serve.grpc_guard import KEY_METADATA, SERVICE, GrpcGuard

    limits = Limits(max_request_bytes=MAX_REQUEST, keyless_timeout_s=1.5, max_keyless_calls=4, max_connections=20)
    port = free_ports(1)[0]
    guard = GrpcGuard("127.0.0.1", port, server.internal_grpc, limits, key=KEY, secret=server.secret).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stop = threading.Event()

    def never_sends():
        stop.wait()
        yield from ()

    stalled, idle = [], []
    try:
        channel.unary_unary(f"{SERVICE}ServerLive")(b"", timeout=10)  # connected
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]  # never start HTTP/2
        time.sleep(0.3)
        assert idle[-1].recv(4096) == b""  # over the 20 connections: closed at once
        stalled = [channel.stream_unary(f"{SERVICE}ServerLive").future(never_sends()) for _ in range(70)]
        time.sleep(0.5)  # all of them at the guard
        started = time.monotonic()
        answer = channel.unary_unary(f"{SERVICE}ServerMetadata")(b"", metadata=[(KEY_METADATA, KEY)], timeout=5)
        assert service_pb2.ServerMetadataResponse.FromString(answer).name == "triton"
        assert time.monotonic() - started < 2
        codes = []
        for call in stalled:
            with pytest.raises(grpc.RpcError) as ended:
                call.result(timeout=10)
            codes.append(ended.value.code())
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 70 - 4, codes
        assert time.monotonic() - started < 5  # the waiting ones cancelled after 1.5 s
        live = channel.unary_unary(f"{SERVICE}ServerLive")(b"", timeout=10)  # health still answers without the key
        assert service_pb2.ServerLiveResponse.FromString(live).live
        for sock in idle[:-1]:  # closed (after a GOAWAY) once keyless_timeout_s passed
            while sock.recv(4096):
                pass
    finally:
        stop.set()
        for sock in idle:
            sock.close()
        for call in stalled:
            call.cancel()
        channel.close()
        guard.stop()


def test_a_grpc_connection_that_sends_no_call_is_closed_after_the_idle_time():
    """A connection that started HTTP/2 and then sent nothing held its place in the guard's connection cap for ever
    (only one that never started HTTP/2 was closed): a few hundred such took every place from keyed clients."""
    from serve.grpc_guard import GrpcGuard

    limits = Limits(max_request_bytes=MAX_REQUEST, idle_timeout_s=1.5)
    port, upstream = free_ports(2)  # no call is made: nothing needs to answer upstream
    guard = GrpcGuard("127.0.0.1", port, upstream, limits, key=KEY).start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            started = time.monotonic()
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))  # preface, SETTINGS
            received = sock.recv(4096)
            assert received[3] == 4  # the server's SETTINGS: HTTP/2 has started
            while chunk := sock.recv(4096):  # then nothing from us: a GOAWAY, and the connection closed
                received += chunk
            assert 1.0 < time.monotonic() - started < 8
    finally:
        guard.stop()


def test_keyless_http_connections_are_capped_and_time_out_soon(server):
    """The probe: a thousand idle TCP connections without the key, 120 s idle timeout each, ran the process out of
    file descriptors: keyed clients got 503, then nothing, and the canaries failed with EMFILE. A connection that
    has not sent the key has keyless_timeout_s now, and one address may hold max_keyless_connections_per_peer of
    them; all connections together max_connections (more: 503 at once). Keyed connections keep the idle timeout."""
    limits = Limits(max_request_bytes=MAX_REQUEST, keyless_timeout_s=1.5, max_keyless_connections_per_peer=8,
                    max_connections=24)
    port = free_ports(1)[0]
    guard = HttpGuard("127.0.0.1", port, server.internal_http, limits, key=KEY, secret=server.secret).start()

    def connect(source: str):  # 127.0.0.0/8 is loopback: each source address is another peer
        return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))

    def ask(sock, target: str = "/v2/health/live", key: str | None = None) -> tuple[int, bytes]:
        sock.sendall(request(b"", target, "GET", headers="Host: x\r\n" + (f"pa-clip-key: {key}\r\n" if key else "")))
        response = HTTPResponse(sock)
        response.begin()
        return response.status, response.read()

    def refused(sock) -> bool:
        response = HTTPResponse(sock)
        response.begin()  # without sending anything: the answer comes at once
        return response.status == 503 and b"retry later" in response.read()

    flood = []
    try:
        flood = [connect("127.0.0.1") for _ in range(8)]  # idle, no key: the address's share
        time.sleep(0.2)
        extra = connect("127.0.0.1")
        assert refused(extra)
        extra.close()
        keyed = connect("127.0.0.2")
        assert ask(keyed, "/v2", KEY)[0] == 200
        for sock in flood:  # closed unanswered once keyless_timeout_s passed
            assert sock.recv(4096) == b""
            sock.close()
        time.sleep(0.5)
        assert ask(keyed)[0] == 200  # still open after twice the keyless timeout: the key was sent
        with connect("127.0.0.1") as again:
            assert ask(again)[0] == 200  # room again for that address
        time.sleep(0.2)
        assert guard.open == 1 and not guard.keyless
        flood = [connect(f"127.0.0.{3 + i % 3}") for i in range(23)]  # every connection taken
        time.sleep(0.2)
        assert guard.open == 24
        assert refused(connect("127.0.0.9"))
        assert ask(keyed, "/v2", KEY)[0] == 200  # open connections go on
        keyed.close()
    finally:
        for sock in flood:
            sock.close()
        guard.stop()


def test_a_connection_whose_client_left_while_tritonserver_works_is_kept_until_the_stop(caplog):
    """A client that gave up while its request waited on tritonserver (here: a port that takes connections and never
    answers) left its connection's task held only weakly by the loop: it was collected mid-wait, its connection to
    tritonserver left open, and "Task was destroyed but it is pending!" came on the console."""
    import gc
    import http.client

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    port = free_ports(1)[0]
    guard = HttpGuard("127.0.0.1", port, silent.getsockname()[1]).start()
    try:
        for _ in range(3):
            client = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
            with pytest.raises(TimeoutError):
                client.request("GET", "/v2/health/live")
                client.getresponse()
            client.close()
        time.sleep(0.3)
        with caplog.at_level("ERROR", logger="asyncio"):
            gc.collect()
        assert "destroyed but it is pending" not in caplog.text
        assert guard.open == 3  # still waiting on tritonserver's answer
    finally:
        guard.stop()
        silent.close()
    assert guard.open == 0


def test_a_canary_this_process_cannot_send_is_not_a_dead_model(tmp_path):
    """With its file descriptors exhausted (the flood above) the supervisor's canaries failed with EMFILE and it
    restarted a healthy tritonserver over and over: a canary it cannot send says nothing about the model."""
    script = """if True:
        import resource, socket, types
        from tritonclient.grpc import model_config_pb2
        from serve.canary import Canaries
        canaries = Canaries(types.SimpleNamespace(repository=%r, python_run_platforms=set()))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            url = "127.0.0.1:%%d" %% s.getsockname()[1]  # closed: nothing answers
        config = model_config_pb2.ModelConfig(name="pa_clip_score")
        print(repr(canaries.probe(config, url, {})))  # a real failure
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        held = []
        try:
            while True:
                held.append(socket.socket())
        except OSError:
            pass
        print(repr(canaries.probe(config, url, {})))
    """ % str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dead, unsent = proc.stdout.splitlines()[-2:]
    assert dead != "''" and unsent == "''", proc.stdout
    assert "out of file descriptors" in proc.stderr


@pytest.mark.slow
def test_a_dead_stub_makes_health_false_and_the_server_comes_back(repository, workdir, lot):
    """Kill -9 of each Python-run model's stub (what the OOM killer does): ready must go false, the supervisor must
    restart the server, and a request must be answered again. Prints how long each took (README, Reliability)."""
    http, grpc, metrics = free_ports(3)
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--repository", str(repository), "--banks",
                             str(workdir / "banks_canary"), "--http-port", str(http), "--grpc-port", str(grpc),
                             "--metrics-port", str(metrics), "--canary-interval", "1", "--max-restarts", "9", "--restart-backoff", "0.25"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    url = f"127.0.0.1:{http}"
    lines: list[str] = []  # read as it comes: what a failed wait shows (and a full pipe would stop serve)
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def wait(condition, limit: float) -> float:
        started = time.monotonic()
        while not condition():
            said = "".join(lines)[-3000:]
            assert proc.poll() is None, f"python -m serve exited ({proc.returncode}):\n{said}"
            assert time.monotonic() - started < limit, f"not within {limit} s; python -m serve said:\n{said}"
            time.sleep(0.1)
        return time.monotonic() - started

    try:
        wait(ready, 180)
        client = PAClipClient(url)
        client.add_images("w", "washer", lot[:4], reset=True)
        client.build_bank("w", {"mode": "mutual"})
        client.close()
        timings = []
        for model in ("pa_clip_score", "pa_clip_bank", "clip_vision", "clip_text"):
            (stub,) = stub_pids(f"pa_clip_{proc.pid}_", model)
            os.kill(stub, signal.SIGKILL)
            noticed = wait(lambda: not ready(), 15)
            back = noticed + wait(ready, 120)
            client = PAClipClient(url)
            maps, _ = client.score(lot[:1], "w")
            client.close()
            assert maps.shape == (1, SIZE, SIZE)
            timings.append((model, noticed, back))
        print("\n".join(f"{m}: not ready after {n:.1f} s, serving again after {b:.1f} s" for m, n, b in timings))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    reader.join(10)
    log = "".join(lines)
    assert log.count("failed its canary") >= 4 and "is not healthy" in log, log[-3000:]
