"""What the guards in front of tritonserver check, for HTTP and gRPC alike, before Triton does any work.

Triton 2.51 allocates what an input's claimed shape needs before it compares the claim with the data, parses JSON
that a Python parser reads differently (duplicate keys: Triton keeps the first, Python the last), and lets any
client register the server's own shared-memory regions. Each check below raises ``Refused`` with the HTTP status
and a message that says what to send instead.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import threading
from dataclasses import dataclass
from pathlib import Path

from postprocess import contract as C, strict_json

ITEM_BYTES = {"BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1, "INT16": 2, "INT32": 4,
              "INT64": 8, "FP16": 2, "BF16": 2, "FP32": 4, "FP64": 8}
BYTES_PREFIX = 4  # every BYTES element carries at least its 4-byte length
# The regions a local server's backends create (serve.local.LocalServer.shm_prefix): never a client's to register.
SERVER_REGION = re.compile(r"^pa_clip_\d+_[0-9a-f]{12}_")
SHM_DIR = Path("/dev/shm")


def key_refusal(sent: bool, where: str) -> str:
    """Why a request without this server's key is refused: a wrong key said as one (it read as a missing one), and how
    the commands send it (``where``: the header or metadata it goes in)."""
    said = "the access key sent is not this server's" if sent else "this server needs its access key"
    return f"{said}: send it in {where} (pa-clip score and pa-clip banks: --key, or $PA_CLIP_KEY)"


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class InflightBudget:
    """The bytes of requests a guard holds at once, all connections together (``Limits.max_inflight_bytes``):
    ``reserve`` refuses what would take it past the limit (503, retry), ``release`` gives back. Thread-safe: the gRPC
    guard's handlers run on threads, the HTTP guard's on one event loop."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0
        self._lock = threading.Lock()

    def check(self, n: int) -> None:
        """Refused (503) when ``n`` more bytes would not fit now."""
        if self.held + n > self.limit:
            raise Refused(503, f"the server holds {self.held} bytes of requests already (at most {self.limit}): "
                               "retry in a moment")

    def reserve(self, n: int) -> None:
        with self._lock:
            self.check(n)
            self.held += n

    def release(self, n: int) -> None:
        with self._lock:
            self.held -= n


@dataclass(frozen=True)
class Limits:
    """What one request may claim and how long a client may take to send it (``python -m serve --help``)."""
    max_request_bytes: int = 256 << 20
    max_inflight_bytes: int = 512 << 20  # request bodies held at once, all connections together
    max_json_bytes: int = 32 << 20  # the JSON part (tensors as JSON lists are 2-20 bytes a value: send them binary)
    max_json_depth: int = 32
    max_image_side: int = 0  # the longest side of an 'images' input; 0: no bound
    min_image_side: int = 0  # the shortest: the encoder's patch (a smaller image made it fail as a 500); 0: no bound
    idle_timeout_s: float = 120.0  # a keep-alive connection waiting for its next request
    head_timeout_s: float = 30.0  # from a request's first byte to the end of its head
    read_timeout_s: float = 30.0  # between two pieces of a body
    # a body must keep coming at this average rate once body_grace_s have passed since its head (a client that
    # trickles a byte now and then is dropped): 16 KB/s is a 130 kbit/s line
    min_body_rate_bps: int = 16 << 10
    body_grace_s: float = 30.0
    # What a client without the access key (when the server has one) may hold: a probe's 1000 idle keyless
    # connections ran the process out of file descriptors, and 16 gRPC health calls whose message never came held
    # every worker thread. (gRPC connections that started HTTP/2 share the overall cap with keyed ones.)
    # to send a whole request head (HTTP, also between requests) or message (gRPC), and gRPC's connection preface
    keyless_timeout_s: float = 10.0
    max_connections: int = 1024  # per guard, all addresses together (more: HTTP 503, gRPC closed; connection_cap)
    # HTTP connections of one address that have not yet sent the key: a keyed client's count too until its first
    # head is read, so well above the client's largest --concurrency (64), for a few clients behind one address
    max_keyless_connections_per_peer: int = 256
    max_keyless_calls: int = 4  # gRPC health calls without the key handled at once (more: RESOURCE_EXHAUSTED)


FDS_KEPT = 256  # file descriptors left to the rest of the process (tritonserver's pipes, canaries, logs)


def connection_cap(limit: int) -> int:
    """``limit`` (``Limits.max_connections``), lowered to a third of what the process's file-descriptor limit
    leaves past ``FDS_KEPT``, for each guard: an HTTP connection may hold two (the client's, tritonserver's), a gRPC
    one one. Running out failed keyed clients' accept() and made the canaries fail with EMFILE."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return limit if soft == resource.RLIM_INFINITY else max(16, min(limit, (soft - FDS_KEPT) // 3))


def load_json(data: bytes, what: str, max_depth: int):
    """Parse JSON as Triton must see it: duplicate keys, NaN/Infinity and nesting deeper than ``max_depth`` refused."""
    try:
        value = strict_json.loads(data)
    except RecursionError:
        raise Refused(400, f"{what} is nested too deeply (at most {max_depth} levels)") from None
    except strict_json.JsonRefused as err:
        raise Refused(400, str(err)) from None
    except (ValueError, UnicodeDecodeError) as err:
        raise Refused(400, f"{what} is not valid JSON: {err}") from None
    depth_of_deepest = _depth(value)
    if depth_of_deepest > max_depth:
        raise Refused(400, f"{what} is nested {depth_of_deepest} levels deep; at most {max_depth}")
    return value


def _depth(value) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:  # iterative: a deep document must not exhaust the guard's own stack
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def count_values(data) -> int:
    """The number of scalars in a (nested) JSON list."""
    count, stack = 0, [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        else:
            count += 1
    return count


def check_shape(name: str, datatype: str, shape, limits: Limits) -> int:
    """The element count of a claimed shape, or ``Refused`` for a shape that is malformed, too big, or (for
    'images') outside the encoder's image size."""
    if not isinstance(shape, (list, tuple)) or not all(type(d) is int and d >= 0 for d in shape):
        raise Refused(400, f"input '{name}': 'shape' must be a list of non-negative integers, got {shape!r}")
    elements = math.prod(shape)
    size = ITEM_BYTES.get(datatype, BYTES_PREFIX)
    if elements * size > limits.max_request_bytes:
        raise Refused(413, f"input '{name}' claims shape {list(shape)} ({elements * size} bytes of {datatype}); this "
                           f"server takes at most {limits.max_request_bytes} bytes per request")
    if name == C.IMAGES and len(shape) >= 3:
        height, width = shape[-3], shape[-2]
        if height == 0 or width == 0:
            raise Refused(400, f"input '{name}' claims {height}x{width} images: an image needs at least one pixel")
        if min(height, width) < limits.min_image_side:
            raise Refused(400, f"input '{name}' claims {height}x{width} images; this server's encoder reads "
                               f"{limits.min_image_side}-pixel patches: each side must be at least that (pa-clip "
                               "score resizes them)")
        if limits.max_image_side and max(height, width) > limits.max_image_side:
            raise Refused(413, f"input '{name}' claims {height}x{width} images; this server's encoder takes at most "
                               f"{limits.max_image_side} pixels a side: resize them (pa-clip score does)")
    return elements


def has_control_character(text: str) -> bool:
    """A NUL or another control character: Triton reads names as C strings, so "pa_clip\\0x" is served as
    pa_clip, past every check made on the whole name."""
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def check_tensor_name(kind: str, name) -> None:
    """An input's or output's name: "images\\0x" would reach the model as 'images' past every check made on the
    name 'images' (the image-size limit)."""
    if not isinstance(name, str) or has_control_character(name):
        raise Refused(400, f"{kind} name {str(name)[:80]!r} must be a string without a NUL or another control "
                           "character")


def check_tensor_names(inputs, outputs) -> None:
    for kind, items in (("input", inputs), ("output", outputs)):
        for item in items:
            check_tensor_name(kind, item.get("name") if isinstance(item, dict) else getattr(item, "name", None))


def check_carried(name: str, datatype: str, elements: int, shape, *, values: int | None = None,
                  binary_bytes: int | None = None) -> None:
    """The data an input carries against its claimed shape: a JSON value count, or the size of its binary part."""
    if values is not None and values != elements:
        raise Refused(400, f"input '{name}' claims shape {list(shape)} ({elements} values) but carries {values}")
    if binary_bytes is not None:
        size = ITEM_BYTES.get(datatype)
        if size is not None and binary_bytes != elements * size:
            raise Refused(400, f"input '{name}' claims shape {list(shape)} of {datatype} ({elements * size} bytes) "
                               f"but carries {binary_bytes} bytes")
        if size is None and binary_bytes < elements * BYTES_PREFIX:
            raise Refused(400, f"input '{name}' claims {elements} {datatype} elements but carries {binary_bytes} "
                               f"bytes (each element takes at least {BYTES_PREFIX})")


INTEGER_RANGES = {"UINT8": (0, 255), "UINT16": (0, 65535), "UINT32": (0, 2**32 - 1), "UINT64": (0, 2**64 - 1),
                  "INT8": (-128, 127), "INT16": (-32768, 32767), "INT32": (-2**31, 2**31 - 1),
                  "INT64": (-2**63, 2**63 - 1)}


def check_json_values(name: str, datatype: str, data) -> None:
    """JSON data of an integer type must be integers in the type's range (Triton answered 500 for UINT8 data that
    was not unsigned integers); of a float type, numbers; BOOL, booleans; BYTES, strings."""
    low_high = INTEGER_RANGES.get(datatype)
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
            continue
        if low_high is not None:
            fine = type(item) is int and low_high[0] <= item <= low_high[1]
        elif datatype in ("FP16", "FP32", "FP64", "BF16"):
            fine = type(item) in (int, float)
        elif datatype == "BOOL":
            fine = type(item) is bool
        elif datatype == "BYTES":
            fine = isinstance(item, str)
        else:
            return  # a datatype Triton itself will refuse
        if not fine:
            kind = f"integers in [{low_high[0]}, {low_high[1]}]" if low_high else {
                "BOOL": "true or false", "BYTES": "strings"}.get(datatype, "numbers")
            raise Refused(400, f"input '{name}': {datatype} data must be {kind}, got {json.dumps(item)[:40]}")


def check_inference_json(body: bytes, header_length: int | None, limits: Limits) -> None:
    """An HTTP inference request (JSON, optionally followed by binary tensors) against its claimed shapes."""
    head = body if header_length is None else body[:header_length]
    if len(head) > limits.max_json_bytes:
        raise Refused(413, f"the request's JSON is {len(head)} bytes; at most {limits.max_json_bytes}: send tensors "
                           "as binary data (tritonclient does by default)")
    request = load_json(head, "the inference request", limits.max_json_depth)
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise Refused(400, "the inference request must be a JSON object with an 'inputs' list")
    binary_left = 0 if header_length is None else len(body) - header_length
    outputs = request.get("outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise Refused(400, "'outputs' must be a list of JSON objects")
    for item in request["inputs"]:
        if not isinstance(item, dict):
            raise Refused(400, "each entry of 'inputs' must be a JSON object")
    check_tensor_names(request["inputs"], outputs)
    for item in request["inputs"]:
        name, datatype = str(item.get("name", "?")), str(item.get("datatype", ""))
        shape = item.get("shape")
        elements = check_shape(name, datatype, shape, limits)
        parameters = item.get("parameters", {})
        if not isinstance(parameters, dict):
            raise Refused(400, f"input '{name}': 'parameters' must be a JSON object")
        if "data" in item:
            check_carried(name, datatype, elements, shape, values=count_values(item["data"]))
            check_json_values(name, datatype, item["data"])
        elif "binary_data_size" in parameters:
            binary = parameters["binary_data_size"]
            if type(binary) is not int or binary < 0 or binary > binary_left:
                raise Refused(400, f"input '{name}': binary_data_size {binary!r} is more than the request carries")
            binary_left -= binary
            check_carried(name, datatype, elements, shape, binary_bytes=binary)
        elif "shared_memory_region" not in parameters:
            raise Refused(400, f"input '{name}' carries no data (no 'data', binary part or shared-memory region)")


def check_region_key(key) -> None:
    """A system shared-memory registration must not name a region of this machine's servers: scoring into one
    aborts tritonserver (their locks are the backends' own)."""
    if not isinstance(key, str) or not key:
        raise Refused(400, "a shared-memory registration needs a 'key' (the region's name, e.g. '/my_region')")
    name = key[1:] if key.startswith("/") else key
    if not name or "/" in name or name in (".", ".."):
        raise Refused(400, f"shared-memory key {key!r} must be one name, e.g. '/my_region'")
    if has_control_character(name) or any(0xD800 <= ord(c) <= 0xDFFF for c in name):
        raise Refused(400, f"shared-memory key {key[:80]!r} holds a control character or a lone surrogate")
    if SERVER_REGION.match(name) or _same_file_as_a_server_region(name):
        raise Refused(403, f"shared-memory region {key!r} belongs to the server itself: register a region of your "
                           "own (tritonclient.utils.shared_memory.create_shared_memory_region)")


def _same_file_as_a_server_region(name: str) -> bool:
    """A hard link to a server region under another name is the same region."""
    try:
        target = (SHM_DIR / name).stat()
    except (OSError, ValueError):
        return False  # Triton will say it does not exist
    for path in SHM_DIR.glob("pa_clip_*"):
        try:
            if SERVER_REGION.match(path.name) and os.path.samestat(path.stat(), target):
                return True
        except OSError:
            continue
    return False


def image_side_limits(repository: Path | None) -> dict:
    """``Limits``' image sides for the served encoder: the longest it is asked to take (``contract.max_image_side``)
    and the shortest, its patch; none when the repository has no encoder fingerprint."""
    if repository is None:
        return {}
    try:
        fingerprint = C.read_fingerprint(Path(repository) / C.VISION_MODEL)
        limits = {"max_image_side": C.max_image_side(fingerprint)}
    except Exception:  # noqa: BLE001 (no fingerprint, or an unreadable model: its own load will say so)
        return {}
    patch = C.patch_side(fingerprint)
    return {**limits, "min_image_side": patch} if patch else limits
