"""The guard in front of tritonserver's gRPC port: what ``serve.http_guard`` is for HTTP.

Triton 2.51 takes gRPC messages up to 2 GB and has no option to lower that; its gRPC port is therefore on loopback,
asking for the guard's per-start secret (health aside), and clients reach it through this proxy, which:
- receives messages up to ``max_request_bytes`` (gRPC's own maximum receive size; larger: RESOURCE_EXHAUSTED), and
  forwards at most ``max_inflight_bytes`` of them at once, all calls together (more: UNAVAILABLE, retry), as the HTTP
  guard holds its bodies (a unary message is booked whole once it has arrived: gRPC hands it over no sooner);
- asks for the access key (metadata ``triton-grpc-protocol-pa-clip-key``, what Triton's own restriction reads) on
  everything but health, when the server has one;
- parses every message with its method's type (malformed: INVALID_ARGUMENT), refuses names holding a NUL or another
  control character, checks an inference request's claimed shapes against what it carries and against the limits,
  and refuses a shared-memory registration of the server's own regions (``serve.request_checks``); a registration
  Triton cannot make is the client's INVALID_ARGUMENT, not INTERNAL;
- holds at most ``max_connections`` connections (``connection_cap``), closing one that has not started HTTP/2
  within ``keyless_timeout_s``;
- handles at most ``max_keyless_calls`` health calls without the key at once (more: RESOURCE_EXHAUSTED, retry), and
  cancels one whose message has not come within ``keyless_timeout_s``: a unary handler holds a worker thread until
  its message arrives, and 16 keyless calls that never sent one held them all (keyed calls timed out);
- answers ServerReady with false while the supervisor's canaries say a model is down;
- forwards the message bytes unchanged otherwise. Streaming inference is not served (the product's models answer
  one response per request: use ModelInfer).
"""

from __future__ import annotations

import hmac
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from tritonclient.grpc import service_pb2

from postprocess.contract import ACCESS_KEY_HEADER
from postprocess.errors import BUSY

from .http_guard import INTERNAL_HEADER
from .request_checks import (InflightBudget, Limits, Refused, check_carried, check_region_key, check_shape,
                             check_tensor_names, connection_cap, has_control_character, key_refusal)

SERVICE = "/inference.GRPCInferenceService/"
STREAMING = {"ModelStreamInfer"}
HEALTH = {"ServerLive", "ServerReady", "ModelReady"}
KEY_METADATA = f"triton-grpc-protocol-{ACCESS_KEY_HEADER}"
INTERNAL_METADATA = f"triton-grpc-protocol-{INTERNAL_HEADER}"
CONTENT_FIELDS = [f.name for f in service_pb2.InferTensorContents.DESCRIPTOR.fields]
STATUS_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
                403: grpc.StatusCode.PERMISSION_DENIED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
                503: grpc.StatusCode.UNAVAILABLE}
UNLIMITED = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
# each method's request type: every message is parsed before it goes on (a malformed one is the client's fault)
REQUEST_TYPES = {m.name: getattr(service_pb2, m.input_type.name)
                 for m in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}
REGISTRATIONS = {"SystemSharedMemoryRegister", "CudaSharedMemoryRegister"}
NAME_FIELDS = ("name", "model_name", "region_name")
KEYLESS_MESSAGE_BYTES = 4096  # a health request is a model's name and version


def check_names(message) -> None:
    """Names Triton reads as C strings: one holding a NUL or another control character would be served as what
    comes before it ("pa_clip\\0x" as pa_clip)."""
    for field in NAME_FIELDS:
        if field in message.DESCRIPTOR.fields_by_name:
            value = getattr(message, field)
            if isinstance(value, str) and has_control_character(value):
                raise Refused(400, f"{field} {value[:80]!r} holds a NUL or another control character")


def check_inference_request(request: service_pb2.ModelInferRequest, limits: Limits) -> None:
    check_tensor_names(request.inputs, request.outputs)
    raw = list(request.raw_input_contents)
    # raw contents go, in order, with the inputs that do not read a shared-memory region (as Triton pairs them: an
    # image in shared memory beside a raw bank name was refused here, though Triton takes it)
    carried = [i for i, item in enumerate(request.inputs) if "shared_memory_region" not in item.parameters]
    if raw and len(raw) != len(carried):
        raise Refused(400, f"{len(raw)} raw_input_contents for {len(carried)} inputs not in shared memory: send "
                           "one per input that is not")
    raw_of = dict(zip(carried, raw))
    for i, item in enumerate(request.inputs):
        shape = list(item.shape)
        elements = check_shape(item.name, item.datatype, shape, limits)
        if i in raw_of:
            check_carried(item.name, item.datatype, elements, shape, binary_bytes=len(raw_of[i]))
        elif "shared_memory_region" not in item.parameters:
            values = sum(len(getattr(item.contents, field)) for field in CONTENT_FIELDS)
            check_carried(item.name, item.datatype, elements, shape, values=values)


class GrpcGuard:
    """``start()`` listens on (host, port) and forwards to 127.0.0.1:upstream_port (see the module's docstring)."""

    def __init__(self, host: str, port: int, upstream_port: int, limits: Limits = Limits(), key: str | None = None,
                 secret: str | None = None, health=None, workers: int = 16):
        self.host, self.port = host, port
        self.limits, self.key, self.secret, self.health = limits, key, secret, health
        self.workers = workers
        self.budget = InflightBudget(limits.max_inflight_bytes)  # messages checked and forwarded right now
        # health calls without the key handled now: fewer than the workers, so keyed calls always find one
        self.max_keyless_calls = max(1, min(limits.max_keyless_calls, workers - 1))
        self.keyless = threading.BoundedSemaphore(self.max_keyless_calls)
        self.server = None
        self.channel = None
        self.set_upstream(upstream_port)

    def set_upstream(self, port: int) -> None:
        old = self.channel
        self.upstream_port = port
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=UNLIMITED)
        if old is not None:
            old.close()

    def start(self) -> "GrpcGuard":
        self.server = grpc.server(ThreadPoolExecutor(self.workers, thread_name_prefix="grpc-guard"),
                                  handlers=[_Handlers(self)], maximum_concurrent_rpcs=4 * self.workers,
                                  options=[("grpc.max_receive_message_length", self.limits.max_request_bytes),
                                           ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0),
                                           # connections capped, and those that never start HTTP/2 closed soon:
                                           # idle TCP connections exhausted the process's file descriptors
                                           ("grpc.max_allowed_incoming_connections",
                                            connection_cap(self.limits.max_connections)),
                                           ("grpc.server_handshake_timeout_ms",
                                            int(self.limits.keyless_timeout_s * 1000)),
                                           # and one that started HTTP/2 and then sends no call is closed after
                                           # the idle time HTTP gives keep-alive connections (clients reconnect)
                                           ("grpc.max_connection_idle_ms", int(self.limits.idle_timeout_s * 1000))])
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        try:
            bound = self.server.add_insecure_port(address)
        except RuntimeError as err:
            bound = 0
            detail = str(err)
        else:
            detail = "in use?"
        if not bound:
            raise OSError(f"cannot listen for gRPC on {address} ({detail})")
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=2).wait(5)
            self.server = None
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def has_key(self, metadata) -> bool:
        """The call carries this server's key, or none is set."""
        if not self.key:
            return True
        sent = next((v for k, v in metadata if k == KEY_METADATA), "")
        return hmac.compare_digest(str(sent).encode(), self.key.encode())

    def key_refusal(self, name: str, metadata) -> str | None:
        """Why a call without this server's key is refused (None: it has the key, needs none, or none is set)."""
        if name in HEALTH or self.has_key(metadata):
            return None
        sent = any(k == KEY_METADATA and v for k, v in metadata)
        return key_refusal(sent, f"the '{KEY_METADATA}' metadata")

    def keyless_health(self, method: str, requests, context) -> bytes:
        """A health call without the key: one of at most ``max_keyless_calls`` at once, cancelled when its message has
        not come within ``keyless_timeout_s`` (grpcio has no such timeout: a call that never sent one held a worker
        thread for good)."""
        if not self.keyless.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.max_keyless_calls} health calls without the "
                          "access key are under way already: retry in a moment")
        timer = threading.Timer(self.limits.keyless_timeout_s, context.cancel)
        try:
            timer.start()
            try:
                request = next(requests, None)
            except grpc.RpcError:  # cancelled: by the timer, or by the client
                return b""  # not sent: the call is over
            timer.cancel()
            if request is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call ended without its request message")
            if len(request) > KEYLESS_MESSAGE_BYTES:  # nor the in-flight budget keyed calls share (as HTTP's health)
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"a {len(request)}-byte health message; at most "
                              f"{KEYLESS_MESSAGE_BYTES} without the access key")
            return self.forward(method, request, context)
        finally:
            timer.cancel()
            self.keyless.release()

    def forward(self, method: str, request: bytes, context) -> bytes:
        name = method[len(SERVICE):]
        metadata = [(k, v) for k, v in context.invocation_metadata()]
        try:
            if (refusal := self.key_refusal(name, metadata)) is not None:
                raise Refused(401, refusal)
            self.budget.reserve(len(request))
        except Refused as refused:
            context.abort(STATUS_CODES.get(refused.status, grpc.StatusCode.INVALID_ARGUMENT), str(refused))
        try:
            return self._checked_forward(method, name, request, metadata, context)
        finally:
            self.budget.release(len(request))

    def _checked_forward(self, method: str, name: str, request: bytes, metadata: list, context) -> bytes:
        try:
            if name == "ServerReady" and self.health is not None and not self.health()[0]:
                return service_pb2.ServerReadyResponse(ready=False).SerializeToString()
            message = _parse(REQUEST_TYPES[name], request)
            check_names(message)
            if name == "ModelInfer":
                check_inference_request(message, self.limits)
            elif name == "SystemSharedMemoryRegister":
                check_region_key(message.key)
        except Refused as refused:
            context.abort(STATUS_CODES.get(refused.status, grpc.StatusCode.INVALID_ARGUMENT), str(refused))
        outgoing = [(k, v) for k, v in metadata
                    if k not in (KEY_METADATA, INTERNAL_METADATA, "user-agent") and not k.startswith((":", "grpc-"))]
        if self.secret:
            outgoing.append((INTERNAL_METADATA, self.secret))
        call = self.channel.unary_unary(method)  # bytes in, bytes out: the message goes on as it came
        remaining = context.time_remaining()  # without a client deadline grpcio gives a huge number, not None
        try:
            return call(request, metadata=outgoing, timeout=remaining if remaining is not None and remaining < 1e7
                        else None)
        except grpc.RpcError as err:
            code = err.code()
            if code is grpc.StatusCode.UNAVAILABLE and BUSY not in (err.details() or ""):  # not a model's "busy"
                context.abort(code, "the inference server is not answering (restarting?): retry in a moment")
            if name in REGISTRATIONS and code is grpc.StatusCode.INTERNAL:
                code = grpc.StatusCode.INVALID_ARGUMENT  # Triton's answer to a region that cannot be registered
            context.abort(code, err.details() or str(code))


def _parse(message_type, data: bytes):
    try:
        return message_type.FromString(data)
    except Exception as err:  # protobuf's DecodeError
        raise Refused(400, f"malformed {message_type.__name__}: {err}") from None


class _Handlers(grpc.GenericRpcHandler):
    def __init__(self, guard: GrpcGuard):
        self.guard = guard

    def service(self, details):
        method = details.method
        name = method[len(SERVICE):] if method.startswith(SERVICE) else ""
        if name not in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name:
            return None  # UNIMPLEMENTED
        if name in STREAMING:
            def refuse(_requests, context):
                context.abort(grpc.StatusCode.UNIMPLEMENTED, "streaming inference is not served: use ModelInfer")
            return grpc.stream_stream_rpc_method_handler(refuse)
        metadata = details.invocation_metadata or ()
        if name in HEALTH and not self.guard.has_key(metadata):
            return grpc.stream_unary_rpc_method_handler(lambda requests, context: self.guard.keyless_health(
                method, requests, context))  # its message read with a bounded wait, a few such calls at once
        if (refusal := self.guard.key_refusal(name, metadata)) is not None:
            # refused from the call's metadata, before its message is read: a unary handler runs only once the
            # whole message (up to max_request_bytes) has arrived, and calls without a key could hold that much each
            def unauthenticated(_requests, context):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)
            return grpc.stream_unary_rpc_method_handler(unauthenticated)
        return grpc.unary_unary_rpc_method_handler(lambda request, context: self.guard.forward(method, request,
                                                                                                context))
