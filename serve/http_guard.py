"""The guard in front of tritonserver's HTTP port: requests are parsed by h11 (a kept HTTP/1.1 library), checked
(``serve.request_checks``), and forwarded as one canonical request; tritonserver's own port is on loopback and
answers only requests that carry the guard's per-start secret (health aside).

Refused before Triton sees them, each with a 4xx and a message that says what is wrong:
- anything h11 cannot parse, a target that is not a plain ``/v2/...`` path (absolute form, query, percent escapes,
  dot segments), a method Triton does not serve, a repeated framing or key header;
- without the access key (when the server has one): everything but health;
- a body over ``max_request_bytes`` (413), chunked or without a Content-Length (411), or one whose bytes, as they
  arrive, would take what all connections hold past ``max_inflight_bytes`` (503, retry): a body is budgeted by what
  it has sent, not by what it claims, so clients that claim much and trickle hold nothing of the others' share;
- JSON with duplicate keys, NaN, or deeper than ``max_json_depth``; an inference request whose claimed shapes do not
  match what it carries or claim too much (images over the encoder's side); a shared-memory registration of one of
  the server's own regions;
- a client too slow to send: idle, head and body read timeouts, and a body that falls under ``min_body_rate_bps``
  on average once ``body_grace_s`` have passed;
- connections past ``max_connections`` (all addresses; ``connection_cap``: lowered under a low file limit) or, with a
  key, past ``max_keyless_connections_per_peer`` of one address that have not yet sent the key (503, closed at once);
  such a connection also has only ``keyless_timeout_s`` to send each request head.

``/v2/health/ready`` is answered by the guard itself while the supervisor's canaries say a model is down.
"""

from __future__ import annotations

import asyncio
import hmac
import http.client
import io
import json
import re
import threading
from http import HTTPStatus

import h11

from postprocess.contract import ACCESS_KEY_HEADER

from .request_checks import (InflightBudget, Limits, Refused, check_inference_json, check_region_key,
                             connection_cap, key_refusal, load_json)

INTERNAL_HEADER = "pa-clip-internal"  # the per-start secret tritonserver's own ports ask for
# tritonserver 2.51 drops a request head of 8 KB or more (9 KB: it closed the connection unanswered, 502): a client's
# head is held under that with room for the host, length and secret headers the guard adds (431 above it)
MAX_HEAD_BYTES = 7 * 1024
# one path segment: no dot segments, no percent escapes, nothing Triton's router could read another way
TARGET = re.compile(rb"/v2(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)*")
DECIMAL = re.compile(r"[0-9]+")  # ASCII digits only: str.isdigit() takes "²", which int() refuses
HEALTH = re.compile(rb"/v2/health/(live|ready)|/v2/models/[^/]+(/versions/[^/]+)?/ready")
REGISTER = re.compile(rb"/v2/systemsharedmemory/region/[^/]+/register")
SINGLE_HEADERS = {b"content-length", b"transfer-encoding", b"inference-header-content-length", b"host",
                  ACCESS_KEY_HEADER.encode(), INTERNAL_HEADER.encode()}
NOT_FORWARDED = {b"connection", b"keep-alive", b"expect", b"transfer-encoding", b"content-length", b"host", b"te",
                 b"upgrade", b"trailer", b"proxy-connection", ACCESS_KEY_HEADER.encode(), INTERNAL_HEADER.encode()}
READ_SIZE = 1 << 16


def _refusal(message: str) -> bytes:
    """A whole 503 answer, for a connection refused before h11 reads anything of it."""
    body = json.dumps({"error": message}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n" % len(body)) + body


class _Client:
    """One client connection: its address, and whether it has sent the key (or none is asked)."""

    def __init__(self, peer: str, keyed: bool):
        self.peer, self.keyed = peer, keyed


class HttpGuard:
    """``start()`` listens on (host, port) in a thread of its own and forwards to 127.0.0.1:upstream_port.

    ``key``: the access key clients must send (None: none asked). ``secret``: what tritonserver's own port asks for.
    ``health``: a callable giving (ready, reason), consulted for ``/v2/health/ready``."""

    def __init__(self, host: str, port: int, upstream_port: int, limits: Limits = Limits(), key: str | None = None,
                 secret: str | None = None, health=None):
        self.host, self.port, self.upstream_port = host, port, upstream_port
        self.limits = limits
        self.key, self.secret, self.health = key, secret, health
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="http-guard", daemon=True)
        self._server = None
        self._idle: set = set()  # connection tasks waiting for a client's next request (keep-alive)
        # every connection's task, held here: the loop holds tasks weakly, and one whose client has gone while it
        # waits on tritonserver was collected mid-wait ("Task was destroyed but it is pending!" on the console)
        self._connections: set = set()
        self.max_connections = connection_cap(limits.max_connections)
        self.open = 0  # connections open now
        self.keyless: dict = {}  # address -> its connections open now that have not sent the key
        self.budget = InflightBudget(limits.max_inflight_bytes)  # request bodies held right now

    def start(self) -> "HttpGuard":
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._serve, self.host, self.port), self._loop)
        try:
            self._server = future.result(30)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise
        return self

    def set_upstream(self, port: int) -> None:
        """Where tritonserver listens now (a restart picks a new port); connections opened later go there."""
        self.upstream_port = port

    def close_idle(self) -> None:
        """Close the connections that wait for a next request, so that a stopping tritonserver waits only for
        requests really in flight (an idle keep-alive connection would hold it until its exit timeout)."""
        if self._server is None:
            return

        async def close():
            idle = list(self._idle)
            for task in idle:
                task.cancel()
            await asyncio.gather(*idle, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)

    def stop(self) -> None:
        if self._server is None:
            return

        async def close():
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._server = None

    # -- one client connection --------------------------------------------------------------------------------
    async def _serve(self, reader, writer):
        client = _Client(str((writer.get_extra_info("peername") or ("?",))[0]), keyed=not self.key)
        # connections are capped, and those that have not sent the key more tightly per address: idle keyless
        # connections from one machine ran the process out of file descriptors (keyed clients got 503, then nothing)
        if self.open >= self.max_connections:
            refusal = f"the server has {self.open} connections open (at most {self.max_connections}): retry later"
        elif not client.keyed and self.keyless.get(client.peer, 0) >= self.limits.max_keyless_connections_per_peer:
            refusal = (f"{self.limits.max_keyless_connections_per_peer} connections from {client.peer} have not sent "
                       f"the access key yet: send '{ACCESS_KEY_HEADER}', or retry later")
        else:
            refusal = None
        if refusal is not None:
            writer.write(_refusal(refusal))
            writer.close()
            return
        self.open += 1
        self._connections.add(asyncio.current_task())
        if not client.keyed:
            self.keyless[client.peer] = self.keyless.get(client.peer, 0) + 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        upstream = _Upstream(self)
        try:
            while True:
                self._idle.add(asyncio.current_task())
                # without the key, a connection has keyless_timeout_s for each head (and the wait before it)
                limits, short = self.limits, self.limits.keyless_timeout_s
                first, whole = ((limits.idle_timeout_s, limits.head_timeout_s) if client.keyed else
                                (min(limits.idle_timeout_s, short), min(limits.head_timeout_s, short)))
                try:
                    event, head = await _next_event(conn, reader, first, whole)
                finally:
                    self._idle.discard(asyncio.current_task())
                if not isinstance(event, h11.Request):
                    return  # the client closed, or timed out between requests
                try:
                    _check_head(head)
                    await self._handle(conn, reader, writer, event, upstream, client)
                except Refused as refused:
                    await _answer(conn, writer, refused.status, str(refused), close=True)
                    return  # what else it sent is unread: close
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError as err:
            status = err.error_status_hint
            if status == 501:  # a transfer coding h11 does not take: the client's to change, not ours to implement
                status = 400
            await _answer(conn, writer, status, f"malformed HTTP request: {err}" + (
                " (send the body with a Content-Length)" if "Transfer-Encoding" in str(err) else ""), close=True)
        except (ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError, h11.LocalProtocolError,
                asyncio.CancelledError):  # a client gone or too slow, or the guard stopping: drop the connection
            return
        finally:
            upstream.close()
            writer.close()
            self.open -= 1
            self._connections.discard(asyncio.current_task())
            if not client.keyed:
                self._not_keyless(client)

    def _not_keyless(self, client: _Client) -> None:
        """``client`` no longer counts as a connection without the key (it sent it, or it closed)."""
        left = self.keyless.get(client.peer, 0) - 1
        if left > 0:
            self.keyless[client.peer] = left
        else:
            self.keyless.pop(client.peer, None)
        client.keyed = True

    async def _handle(self, conn, reader, writer, request: h11.Request, upstream, client: _Client) -> None:
        headers = _header_lists(request.headers)
        path = request.target
        if request.method not in (b"GET", b"POST"):
            raise Refused(405, f"method {request.method.decode('latin-1')} is not served (GET and POST are)")
        if not TARGET.fullmatch(path):
            raise Refused(400, "the request target must be a plain path under /v2 (no scheme and host, query, "
                               "percent escapes or dot segments)")
        repeated = sorted(name.decode() for name in SINGLE_HEADERS if len(headers.get(name, ())) > 1)
        if repeated:
            raise Refused(400, f"header {', '.join(repeated)} sent more than once")
        health = HEALTH.fullmatch(path) is not None
        if self.key:
            sent = headers.get(ACCESS_KEY_HEADER.encode(), [b""])[0]
            if hmac.compare_digest(sent, self.key.encode()):
                if not client.keyed:  # the documented timeouts from now on, and out of its address's count
                    self._not_keyless(client)
            elif not health:
                raise Refused(401, key_refusal(bool(sent), f"the '{ACCESS_KEY_HEADER}' header"))
        size = await self._check_length(conn, writer, request, headers, keyless=health)
        held = [0]  # what this body holds of the budget so far

        def reserve(n: int) -> None:
            self.budget.reserve(n)
            held[0] += n

        try:
            body = await _read_body(conn, reader, self.limits, reserve)
            if path == b"/v2/health/ready" and self.health is not None:
                ready, reason = self.health()
                if not ready:
                    await _answer(conn, writer, 503, f"not ready: {reason}")
                    return
            if request.method == b"POST":
                await self._check_body(path, headers, body)
            forwarded = [(k, v) for k, v in request.headers if k.lower() not in NOT_FORWARDED]
            forwarded += [(b"host", f"127.0.0.1:{self.upstream_port}".encode()), (b"content-length", str(size).encode())]
            if self.secret:
                forwarded.append((INTERNAL_HEADER.encode(), self.secret.encode()))
            await upstream.relay(h11.Request(method=request.method, target=path, headers=forwarded), body, conn,
                                 writer)
        finally:
            self.budget.release(held[0])

    async def _check_length(self, conn, writer, request, headers, keyless: bool = False) -> int:
        """The body's announced size, checked against the request limit (its bytes are budgeted as they arrive).
        ``keyless``: a path answered without the key (health) takes no body: a client without the key could
        otherwise fill the in-flight budget that keyed requests share."""
        if b"chunked" in b"".join(headers.get(b"transfer-encoding", [])).lower():
            raise Refused(411, "chunked request bodies are not accepted: send a Content-Length")
        lengths = headers.get(b"content-length")
        if not lengths:
            if request.method == b"POST":
                raise Refused(411, "a request with a body needs a Content-Length header")
            size = 0
        else:
            size = int(lengths[0])  # h11 has checked it is a number
        if keyless and size:
            raise Refused(413, "health requests carry no body")
        if size > self.limits.max_request_bytes:
            raise Refused(413, f"the request body is {size} bytes; this server takes at most "
                               f"{self.limits.max_request_bytes}")
        if size:
            self.budget.check(min(size, READ_SIZE))
        if conn.they_are_waiting_for_100_continue:
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        return size

    async def _check_body(self, path: bytes, headers: dict, body: bytes) -> None:
        loop = asyncio.get_running_loop()
        segments = path.split(b"/")
        if b"infer" in segments:
            announced = headers.get(b"inference-header-content-length")
            header_length = None
            if announced:
                text = announced[0].decode("latin-1")
                if not DECIMAL.fullmatch(text) or int(text) > len(body):  # not isdigit(): "²" is a digit to it
                    raise Refused(400, f"bad Inference-Header-Content-Length {text!r}")
                header_length = int(text)
            check = lambda: check_inference_json(body, header_length, self.limits)  # noqa: E731
        elif body:
            if len(body) > self.limits.max_json_bytes:
                raise Refused(413, f"a {len(body)}-byte JSON body; at most {self.limits.max_json_bytes}")
            register = REGISTER.fullmatch(path) is not None

            def check():
                document = load_json(body, "the request body", self.limits.max_json_depth)
                if register:
                    check_region_key(document.get("key") if isinstance(document, dict) else None)
        else:
            return
        # a large JSON document takes a while to parse: off the loop, so other connections go on
        await (loop.run_in_executor(None, check) if len(body) > (1 << 20) else _call(check))


async def _call(function):
    return function()


class _Upstream:
    """The connection to tritonserver that one client connection uses (kept alive across its requests)."""

    def __init__(self, guard: HttpGuard):
        self.guard = guard
        self.streams = None
        self.conn = None

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
        self.streams = self.conn = None

    async def relay(self, request: h11.Request, body: bytes, client: h11.Connection, writer) -> None:
        if self.conn is not None and self.conn.our_state is not h11.IDLE:
            self.close()
        if self.conn is None:
            try:
                self.streams = await asyncio.open_connection("127.0.0.1", self.guard.upstream_port)
            except OSError:
                raise Refused(503, "the inference server is not answering (restarting?): retry in a moment") from None
            self.conn = h11.Connection(h11.CLIENT)
        up_reader, up_writer = self.streams
        up_writer.write(self.conn.send(request) + self.conn.send(h11.Data(data=body)) +
                        self.conn.send(h11.EndOfMessage()))
        await up_writer.drain()
        response = None
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await up_reader.read(READ_SIZE)
                if not data and response is None:
                    self.close()
                    raise Refused(502, "the inference server closed the connection without an answer (it may have "
                                       "died: python -m serve restarts it): retry in a moment")
                self.conn.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                response = event
                kept = [(k, v) for k, v in event.headers if k.lower() not in (b"connection", b"keep-alive",
                                                                                 b"transfer-encoding")]
                writer.write(client.send(h11.Response(status_code=event.status_code, headers=kept,
                                                      reason=event.reason)))
            elif isinstance(event, h11.Data):
                writer.write(client.send(h11.Data(data=event.data)))
                await writer.drain()
            elif isinstance(event, h11.EndOfMessage):
                writer.write(client.send(h11.EndOfMessage()))
                await writer.drain()
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                else:
                    self.close()
                return
            else:  # ConnectionClosed mid-response
                self.close()
                raise ConnectionError("the inference server closed the connection mid-answer")


def _header_lists(headers) -> dict:
    lists: dict = {}
    for name, value in headers:
        lists.setdefault(name.lower(), []).append(value)
    return lists


async def _next_event(conn: h11.Connection, reader, first_timeout: float, rest_timeout: float):
    """(the next h11 event, the raw bytes of its head when it is a request); ``first_timeout`` for the first byte,
    then ``rest_timeout`` for the whole head."""
    loop = asyncio.get_running_loop()
    deadline = None
    received = bytearray(conn.trailing_data[0])  # what the last cycle read past its end (a pipelined request)
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            head = bytes(received[:len(received) - len(conn.trailing_data[0])])
            return event, head
        timeout = first_timeout if deadline is None else max(0.0, deadline - loop.time())
        data = await asyncio.wait_for(reader.read(READ_SIZE), timeout)
        if deadline is None:
            deadline = loop.time() + rest_timeout
        received += data  # bounded: h11 refuses an unfinished head over MAX_HEAD_BYTES (431)
        conn.receive_data(data)


def _check_head(head: bytes) -> None:
    """What h11 lets through and Triton would not: a head over what Triton accepts (h11 checks only heads that
    arrive in pieces), and framing or key headers sent twice with the same value (h11 keeps one of them). The
    header lines are read again with the standard library's parser, which keeps every copy."""
    if len(head) > MAX_HEAD_BYTES:
        raise Refused(431, f"the request head is {len(head)} bytes; this server takes at most {MAX_HEAD_BYTES}")
    lines = io.BytesIO(head)
    lines.readline()  # the request line: h11 has read it
    try:
        message = http.client.parse_headers(lines)
    except http.client.HTTPException as err:  # over its 100 headers
        raise Refused(431, f"the request head has too many header lines: {err}") from None
    repeated = sorted({name.lower() for name in message.keys()
                       if name.lower().encode() in SINGLE_HEADERS and len(message.get_all(name)) > 1})
    if repeated:
        raise Refused(400, f"header {', '.join(repeated)} sent more than once")


async def _read_body(conn: h11.Connection, reader, limits: Limits, reserve=lambda n: None) -> bytes:
    """The whole body; ``reserve(n)`` books each piece against the shared budget as it arrives (it raises to
    refuse). A body slower than ``limits.min_body_rate_bps`` on average after ``limits.body_grace_s`` is dropped."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await asyncio.wait_for(reader.read(READ_SIZE), limits.read_timeout_s)
            elapsed = loop.time() - started
            if elapsed > limits.body_grace_s and len(body) + len(data) < limits.min_body_rate_bps * elapsed:
                raise asyncio.TimeoutError("the body comes too slowly")
            conn.receive_data(data)
        elif isinstance(event, h11.Data):
            reserve(len(event.data))
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body)
        else:
            raise ConnectionError("the client closed the connection mid-body")


async def _answer(conn: h11.Connection, writer, status: int, message: str, close: bool = False) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    try:
        writer.write(conn.send(h11.Response(status_code=status, headers=headers,
                                            reason=HTTPStatus(status).phrase.encode())) +
                     conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        await writer.drain()
    except (h11.LocalProtocolError, ConnectionError):
        pass  # a response was under way already, or the client is gone
