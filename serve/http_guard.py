"""A guard in front of tritonserver's HTTP port: what Triton 2.51 itself lacks to survive hostile requests.

Triton's HTTP frontend allocates the buffer an input's claimed shape needs before it compares the claim with the data:
a 200-byte JSON request claiming [1,100000,100000,3] makes it allocate 30 GB and abort (std::bad_alloc). No
configuration prevents it (the JSON is parsed before the model's dims are checked; 2.51 has no request-size option).
``HttpGuard`` listens where clients connect, forwards every request to tritonserver on loopback, and first refuses,
with a 4xx and a message that says what is wrong:

- a body over ``max_body_bytes`` (413) or without a Content-Length (411);
- an inference request whose JSON is malformed (400: Triton answers 500);
- an input whose claimed shape does not match what it carries: the number of JSON values, or the size of its binary
  part for fixed-size types (400), or that claims more than ``max_body_bytes`` of tensor (413).

Everything else passes through unchanged (keep-alive, the access-key header, binary tensors, shared memory).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading

INFER_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer/?(\?.*)?$")
ITEM_BYTES = {"BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1, "INT16": 2, "INT32": 4,
              "INT64": 8, "FP16": 2, "BF16": 2, "FP32": 4, "FP64": 8}
MAX_HEAD_BYTES = 64 * 1024


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _count_values(data) -> int:
    if isinstance(data, list):
        return sum(_count_values(v) for v in data)
    return 1


def check_inference_body(body: bytes, header_length: int | None, max_bytes: int) -> None:
    """Raise ``Refused`` unless every input's claimed shape agrees with what the request carries."""
    head = body if header_length is None else body[:header_length]
    try:
        request = json.loads(head)
    except (ValueError, UnicodeDecodeError) as err:
        raise Refused(400, f"the inference request is not valid JSON: {err}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs", []), list):
        raise Refused(400, "the inference request must be a JSON object with an 'inputs' list")
    binary_left = 0 if header_length is None else len(body) - header_length
    for item in request.get("inputs", []):
        if not isinstance(item, dict):
            raise Refused(400, "each entry of 'inputs' must be a JSON object")
        name, shape, datatype = item.get("name", "?"), item.get("shape"), item.get("datatype", "")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise Refused(400, f"input '{name}': 'shape' must be a list of non-negative integers, got {shape!r}")
        elements = math.prod(shape)
        size = ITEM_BYTES.get(datatype)
        if size is not None and elements * size > max_bytes:
            raise Refused(413, f"input '{name}' claims shape {shape} ({elements * size} bytes of {datatype}); this "
                               f"server takes at most {max_bytes} bytes per request")
        parameters = item.get("parameters") or {}
        if "data" in item:
            carried = _count_values(item["data"])
            if carried != elements:
                raise Refused(400, f"input '{name}' claims shape {shape} ({elements} values) but carries {carried}")
        elif "binary_data_size" in parameters:
            binary = parameters["binary_data_size"]
            if not isinstance(binary, int) or binary < 0 or binary > binary_left:
                raise Refused(400, f"input '{name}': binary_data_size {binary!r} is more than the request carries")
            binary_left -= binary
            if size is not None and binary != elements * size:
                raise Refused(400, f"input '{name}' claims shape {shape} of {datatype} ({elements * size} bytes) "
                                   f"but carries {binary} bytes")
        elif "shared_memory_region" not in parameters:
            raise Refused(400, f"input '{name}' carries no data (no 'data', binary part or shared-memory region)")


class HttpGuard:
    """``start()`` listens on (host, port) in a thread of its own and forwards to 127.0.0.1:upstream_port."""

    def __init__(self, host: str, port: int, upstream_port: int, max_body_bytes: int = 256 << 20):
        self.host, self.port, self.upstream_port = host, port, upstream_port
        self.max_body_bytes = max_body_bytes
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="http-guard", daemon=True)
        self._server = None
        self._idle: set = set()  # connection tasks waiting for a client's next request (keep-alive)

    def start(self) -> "HttpGuard":
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, self.host, self.port, limit=MAX_HEAD_BYTES), self._loop)
        self._server = future.result(30)
        return self

    def close_idle(self) -> None:
        """Close the connections that wait for a next request, so that a stopping tritonserver waits only for
        requests really in flight (an idle keep-alive connection would hold it until its exit timeout)."""
        if self._server is None:
            return

        async def close():
            self._server.close()  # and take no new ones
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

    async def _serve(self, client_reader, client_writer):
        upstream = None
        try:
            while True:
                self._idle.add(asyncio.current_task())
                try:
                    head = await _read_head(client_reader)
                finally:
                    self._idle.discard(asyncio.current_task())
                if head is None:
                    return
                request_line, headers = head
                try:
                    body = await self._read_body(client_reader, client_writer, request_line, headers)
                except Refused as refused:
                    await _answer(client_writer, refused.status, str(refused))
                    return  # the rest of what it sent is unread: close
                if upstream is None:
                    upstream = await asyncio.open_connection("127.0.0.1", self.upstream_port)
                up_reader, up_writer = upstream
                forwarded = [request_line] + [f"{k}: {v}" for k, v in headers if k.lower() != "expect"]
                up_writer.write(("\r\n".join(forwarded) + "\r\n\r\n").encode("latin-1") + body)
                await up_writer.drain()
                if not await _relay_response(up_reader, client_writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                asyncio.CancelledError):  # a client gone, garbage, or the guard stopping: drop the connection
            return
        finally:
            client_writer.close()
            if upstream is not None:
                upstream[1].close()

    async def _read_body(self, reader, writer, request_line: str, headers: list) -> bytes:
        lookup = {k.lower(): v for k, v in headers}
        if "chunked" in lookup.get("transfer-encoding", "").lower():
            raise Refused(411, "chunked request bodies are not accepted: send a Content-Length")
        length = lookup.get("content-length")
        method, path = (request_line.split(" ") + ["", ""])[:2]
        if length is None:
            if method in ("POST", "PUT"):
                raise Refused(411, "a request with a body needs a Content-Length header")
            return b""
        if not length.isdigit():
            raise Refused(400, f"bad Content-Length {length!r}")
        size = int(length)
        if size > self.max_body_bytes:
            raise Refused(413, f"the request body is {size} bytes; this server takes at most {self.max_body_bytes}")
        if lookup.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        body = await reader.readexactly(size)
        if method == "POST" and INFER_PATH.match(path):
            header_length = lookup.get("inference-header-content-length")
            if header_length is not None and (not header_length.isdigit() or int(header_length) > size):
                raise Refused(400, f"bad Inference-Header-Content-Length {header_length!r}")
            check_inference_body(body, None if header_length is None else int(header_length), self.max_body_bytes)
        return body


async def _read_head(reader):
    """(request or status line, [(name, value)]) or None at the end of the stream."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as err:
        if not err.partial:
            return None
        raise
    lines = raw.decode("latin-1").split("\r\n")[:-2]
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return lines[0], headers


async def _relay_response(reader, writer) -> bool:
    """Copy one response; False when the connection is to be closed afterwards."""
    head = await _read_head(reader)
    if head is None:
        return False
    status_line, headers = head
    writer.write(("\r\n".join([status_line] + [f"{k}: {v}" for k, v in headers]) + "\r\n\r\n").encode("latin-1"))
    lookup = {k.lower(): v for k, v in headers}
    if "chunked" in lookup.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            writer.write(size_line + chunk)
            if size == 0:
                break
    else:
        writer.write(await reader.readexactly(int(lookup.get("content-length", "0"))))
    await writer.drain()
    return lookup.get("connection", "").lower() != "close"


async def _answer(writer, status: int, message: str) -> None:
    reason = {400: "Bad Request", 411: "Length Required", 413: "Payload Too Large"}.get(status, "Error")
    body = json.dumps({"error": message}).encode()
    writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                 f"Connection: close\r\n\r\n".encode() + body)
    await writer.drain()
