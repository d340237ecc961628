"""A small client for the PA-CLIP models on Triton (``pa_clip`` ensemble, ``pa_clip_bank``), HTTP or gRPC.

One ``PAClipClient`` per thread: ``client/infer.py`` runs several of them to keep several requests in flight.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import sys
import threading
import time
import uuid

import numpy as np

from postprocess.contract import ACCESS_KEY_ENV, ACCESS_KEY_HEADER, ANOMALY_MAP, BANK, BANK_MODEL, ENSEMBLE, IMAGES, SCORE
from postprocess.errors import BUSY

DEFAULT_URLS = {"http": "127.0.0.1:8000", "grpc": "127.0.0.1:8001"}
BUSY_RETRY_S = 2.0  # how often a build is sent again while the server builds another bank
HEALTH_TIMEOUT_S = 15.0  # how long check_ready waits for an answer


class ClientError(RuntimeError):
    """The server refused a request or cannot be reached; the message is the server's reason."""


class ServerUnreachable(ClientError):
    """No server answered: nothing listens at the address, the connection broke, or it timed out."""


class ServerRefused(ClientError):
    """The server answered, with an error: the request, the bank or the server's state is the reason."""


class BadAddress(ClientError):
    """An address no client can be made for (a usage error: nothing was sent)."""


# gRPC's codes for "no answer" (tritonclient raises them as InferenceServerException); HTTP's are OSErrors, and a
# connection closed mid-answer an http.client.HTTPException (geventhttpclient's HTTPConnectionClosed)
UNREACHABLE_STATUSES = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")
TRANSPORT_ERRORS = (OSError, http.client.HTTPException)
# what the guard and the models answer with UNAVAILABLE: an answer (the server is there), not "unreachable"
ANSWERED_UNAVAILABLE = (BUSY, "restarting?", "retry in a moment")
MISSING_REGION = "Unable to find shared memory region"  # a restarted server knows no region registered before


def client_error(err: BaseException) -> ClientError:
    """The ClientError a failed call stands for: unreachable when no answer came (nothing listens, the connection
    broke or timed out, the name does not resolve), refused when one did."""
    status = str(err.status()) if hasattr(err, "status") and callable(err.status) else ""
    text = _message(err)
    # 502: the guard in front (python -m serve) found the tritonserver behind it gone mid-request: no server answered
    if isinstance(err, TRANSPORT_ERRORS) or status in ("StatusCode.DEADLINE_EXCEEDED", "502") or (
            status in UNREACHABLE_STATUSES and not any(words in text for words in ANSWERED_UNAVAILABLE)):
        return ServerUnreachable(text or type(err).__name__)
    return ServerRefused(text)


def _modules(protocol: str):
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
    from tritonclient.utils import InferenceServerException

    return module, InferenceServerException


def _message(err) -> str:
    text = err.message() if hasattr(err, "message") and callable(err.message) else str(err)
    return text or str(err)


@contextlib.contextmanager
def interrupted_once():
    """While a lot session is open, SIGINT raises KeyboardInterrupt once; a second (``timeout -s INT`` signals the
    run and then its process group, an impatient user presses twice) is let pass wherever it lands, so that the
    lot is given back; a third raises again. Only where SIGINT raises KeyboardInterrupt now (Python's default, in
    the main thread): a run started in the background, SIGINT ignored, stays so."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    pressed = 0

    def on_interrupt(signum, frame):
        nonlocal pressed
        pressed += 1
        if pressed != 2:
            raise KeyboardInterrupt

    # tritonclient.http waits in gevent's hub, which printed a KeyboardInterrupt raised there as a traceback and a
    # timestamp before passing it on to the run: while the handler is in place the hub passes it on without a word
    hub = sys.modules["gevent.hub"].get_hub() if "gevent.hub" in sys.modules else None
    quiet = hub is not None and not issubclass(KeyboardInterrupt, hub.NOT_ERROR)
    if quiet:
        hub.NOT_ERROR = (*hub.NOT_ERROR, KeyboardInterrupt)
    signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if quiet:
            hub.NOT_ERROR = tuple(t for t in hub.NOT_ERROR if t is not KeyboardInterrupt)


class PAClipClient:
    def __init__(self, url: str | None = None, protocol: str = "http", timeout_s: float = 3600.0,
                 shared_memory: bool = False, key: str | None = None):
        """``key``: the server's access key (default: $PA_CLIP_KEY), sent with every request."""
        key = key if key is not None else os.environ.get(ACCESS_KEY_ENV, "")
        # Triton's gRPC frontend looks for restricted-protocol keys under this prefix
        header = ACCESS_KEY_HEADER if protocol == "http" else f"triton-grpc-protocol-{ACCESS_KEY_HEADER}"
        self.headers = {header: key} if key else None
        self._key = key
        self.protocol = protocol
        self.url = url or DEFAULT_URLS[protocol]
        if "://" in self.url:  # tritonclient's own words ("should not include the scheme") came as unreachable
            raise BadAddress(f"--url {self.url!r}: give host:port without a scheme, e.g. "
                             f"{self.url.split('://', 1)[1].rstrip('/') or DEFAULT_URLS[protocol]}")
        self._tc, self._error = _modules(protocol)
        try:
            if protocol == "http":
                # a bank build can take minutes: the socket must wait for it
                self.client = self._tc.InferenceServerClient(self.url, connection_timeout=timeout_s,
                                                             network_timeout=timeout_s)
            else:
                self.client = self._tc.InferenceServerClient(self.url)
        except Exception as err:
            raise ServerUnreachable(f"cannot create a {protocol} client for {self.url}: {err}") from err
        self.timeout_s = timeout_s
        self.shared_memory = shared_memory
        self._shm = None  # (regions, capacity in images, image shape)

    # -- server --------------------------------------------------------------------------------------------
    def check_ready(self) -> None:
        """Whether a PA-CLIP server answers at the address, asked with a short timeout (``HEALTH_TIMEOUT_S``: a port
        that takes connections and never answers held a run for the request timeout, an hour, or forever over
        gRPC)."""
        try:
            if self.protocol == "http":  # its timeouts are the client's: a client of its own for these calls
                health, timeout = self._tc.InferenceServerClient(self.url, connection_timeout=HEALTH_TIMEOUT_S,
                                                                 network_timeout=HEALTH_TIMEOUT_S), {}
            else:
                health, timeout = self.client, {"client_timeout": HEALTH_TIMEOUT_S}
            try:
                ready = health.is_server_ready(headers=self.headers, **timeout) and all(
                    health.is_model_ready(model, headers=self.headers, **timeout) for model in (ENSEMBLE, BANK_MODEL))
            finally:
                if health is not self.client:
                    health.close()
        except Exception as err:
            text = _message(err)
            # a server that answers in the other protocol: the port is the other one's (it said "no server answers")
            other = ("http" if self.protocol == "grpc" and "http1.x server" in text else
                     "grpc" if self.protocol == "http" and "Expected HTTP/" in text else None)
            raise ServerUnreachable(
                f"no Triton server answers at {self.url} ({self.protocol}): {text}. " +
                (f"A server there speaks {other}: pass --protocol {other}, or the {self.protocol} port" if other else
                 "Start one with `python -m serve` (see README)")) from err
        if not ready:
            raise ServerRefused(f"the server at {self.url} is up but {ENSEMBLE} / {BANK_MODEL} are not ready: "
                                "is this the PA-CLIP model repository? (server log: `python -m serve` prints it)")

    # -- banks ---------------------------------------------------------------------------------------------
    def bank_action(self, action: str, bank: str = "", category: str = "", images: np.ndarray | None = None,
                    options: dict | None = None) -> dict:
        tc = self._tc
        inputs = []

        def text(name, value):
            tensor = tc.InferInput(name, [1], "BYTES")
            tensor.set_data_from_numpy(np.array([value.encode()], dtype=np.object_))
            inputs.append(tensor)

        text("action", action)
        if bank:
            text(BANK, bank)
        if category:
            text("category", category)
        if options:
            text("options", json.dumps(options))
        if images is not None:
            tensor = tc.InferInput(IMAGES, list(images.shape), "UINT8")
            tensor.set_data_from_numpy(np.ascontiguousarray(images))
            inputs.append(tensor)
        try:
            result = self.client.infer(BANK_MODEL, inputs, headers=self.headers, **self._deadline())
        except (self._error, *TRANSPORT_ERRORS) as err:
            raise client_error(err) from err
        raw = result.as_numpy("result").reshape(-1)[0]
        return json.loads(raw.decode() if isinstance(raw, bytes) else raw)

    def encoder(self) -> dict:
        return self.bank_action("encoder")

    def list_banks(self) -> list[dict]:
        return self.bank_action("list")["banks"]

    def bank_info(self, bank: str) -> dict:
        return self.bank_action("info", bank)

    def delete_bank(self, bank: str) -> dict:
        return self.bank_action("delete", bank)

    def store(self) -> dict:
        """Every bank with its sizes, the pending lots, and the store's bytes and limit."""
        return self.bank_action("list")

    def prune_banks(self) -> dict:
        return self.bank_action("prune")

    @staticmethod
    def new_lot() -> str:
        """A lot session of this client's own: the images added with it are built or updated with it alone (another
        client adding to, starting over or building the same bank id meanwhile neither takes nor removes them)."""
        return uuid.uuid4().hex

    def add_images(self, bank: str, category: str, images: np.ndarray, reset: bool = False,
                   lot: str | None = None) -> dict:
        options = {**({"reset": True} if reset else {}), **({"lot": lot} if lot else {})}
        answer = self.bank_action("add", bank, category, images, options or None)
        if lot and answer.get("lot") != lot:  # a server from before lot sessions added them to the shared lot
            raise ClientError(f"the server at {self.url} does not know lot sessions (it is older than this client): "
                              "its adds share one pending lot per bank with every other client's; upgrade the "
                              "server, or use the client of its version")
        return answer

    def discard_lot(self, bank: str, lot: str) -> dict:
        """Remove the images this client added with lot session ``lot`` (a build or update of them failed)."""
        return self.bank_action("discard", bank, options={"lot": lot})

    @contextlib.contextmanager
    def lot_session(self, bank: str):
        """A new lot session (``new_lot``) for the adds and the build or update in the ``with`` block; when the block
        fails (a refused build, Ctrl-C), its images are given back, where they stayed on the server for a day,
        counted against its store limit, and no later run freed them."""
        lot = self.new_lot()
        with interrupted_once():
            try:
                yield lot
            except BaseException:
                self._give_back(bank, lot)
                raise

    def _give_back(self, bank: str, lot: str, wait_s: float = 30.0) -> None:
        """``discard_lot``, sent by a client of its own from a thread of its own (a Ctrl-C that came during a
        request is thrown again by tritonclient's gevent hub at this client's next one), waited for ``wait_s`` at
        most. A second SIGINT landed inside the discard itself, as KeyboardInterrupt, which ``except Exception``
        let through: the discard never left and the lot stayed on the server for a day (3 of 17 runs stopped
        with ``timeout -s INT``). Where no handler can hold it back (``interrupted_once``), one such repeat is let
        pass while the discard is waited for; failures are let go (nothing added, a server gone, or one from
        before "discard": the lot expires)."""
        def give_back() -> None:
            try:
                other = PAClipClient(self.url, self.protocol, min(self.timeout_s, wait_s), key=self._key)
                try:
                    other.discard_lot(bank, lot)
                finally:
                    other.close()
            except Exception:
                pass

        worker = threading.Thread(target=give_back, name="pa-clip-give-back", daemon=True)
        deadline, repeated, started = time.monotonic() + wait_s, False, False
        while True:
            try:
                if not started:
                    started = True
                    worker.start()
                if not worker.is_alive() or time.monotonic() >= deadline:
                    return
                worker.join(max(0.0, deadline - time.monotonic()))
            except KeyboardInterrupt:  # a second SIGINT (`timeout -s INT` sends two, an impatient user too)
                if repeated:  # a third: stop waiting (the discard may still reach the server)
                    raise
                repeated = True

    def build_bank(self, bank: str, options: dict | None = None, wait_s: float | None = None,
                   on_wait=None, lot: str | None = None) -> dict:
        """Build ``bank`` from its pending lot (``lot``: the lot session the images were added with; None: the
        bank's shared lot). A server builds one bank at a time: while it builds another it answers "server busy"
        (503), and the build is sent again every ``BUSY_RETRY_S`` seconds, for at most ``wait_s`` (default: this
        client's timeout); ``on_wait(message)`` hears the first such answer."""
        return self._one_build_at_a_time("build", bank, {**(options or {}), **({"lot": lot} if lot else {})},
                                         wait_s, on_wait)

    def update_bank(self, bank: str, wait_s: float | None = None, on_wait=None, lot: str | None = None) -> dict:
        """Grow the live ``bank`` with its pending lot (``lot`` as for ``build_bank``; ``postprocess.growth``): the
        parts that look like its good ones are folded in, a new version written. Busy servers are waited for as
        ``build_bank`` waits."""
        return self._one_build_at_a_time("update", bank, {"lot": lot} if lot else None, wait_s, on_wait)

    def _one_build_at_a_time(self, action: str, bank: str, options, wait_s, on_wait) -> dict:
        deadline = time.monotonic() + (self.timeout_s if wait_s is None else wait_s)
        told = False
        while True:
            try:
                return self.bank_action(action, bank, options=options or None)
            except ClientError as err:
                if BUSY not in str(err) or time.monotonic() + BUSY_RETRY_S > deadline:
                    raise
                if on_wait is not None and not told:
                    on_wait(str(err))
                    told = True
                time.sleep(BUSY_RETRY_S)

    # -- scoring -------------------------------------------------------------------------------------------
    def score(self, images: np.ndarray, bank: str) -> tuple[np.ndarray, np.ndarray]:
        """(B, H, W, 3) uint8 images (at the bank's size) -> (B, H, W) float32 maps and (B,) float32 scores."""
        tc = self._tc
        images = np.ascontiguousarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [B,H,W,3], got {images.dtype} {list(images.shape)}")
        n = len(images)
        image_input = tc.InferInput(IMAGES, list(images.shape), "UINT8")
        bank_input = tc.InferInput(BANK, [n, 1], "BYTES")
        bank_input.set_data_from_numpy(np.array([[bank.encode()]] * n, dtype=np.object_))
        if self.protocol == "http":
            outputs = [tc.InferRequestedOutput(ANOMALY_MAP, binary_data=True),
                       tc.InferRequestedOutput(SCORE, binary_data=True)]
        else:
            outputs = [tc.InferRequestedOutput(ANOMALY_MAP), tc.InferRequestedOutput(SCORE)]
        if self.shared_memory:
            return self._score_shm(images, image_input, bank_input, outputs)
        image_input.set_data_from_numpy(images)
        try:
            result = self.client.infer(ENSEMBLE, [image_input, bank_input], outputs=outputs, headers=self.headers,
                                       **self._deadline())
        except (self._error, *TRANSPORT_ERRORS) as err:
            raise client_error(err) from err
        return result.as_numpy(ANOMALY_MAP).astype(np.float32), result.as_numpy(SCORE).reshape(-1)

    def _score_shm(self, images, image_input, bank_input, outputs, registered_again: bool = False):
        """Pixels in and maps out through system shared memory regions registered with the server (once; again
        when a restarted server no longer knows them)."""
        import tritonclient.utils.shared_memory as shm

        n, h, w, _ = images.shape
        if self._shm is None or self._shm[1] < n or self._shm[2] != images.shape[1:]:
            self.close_shared_memory()
            tag = uuid.uuid4().hex[:12]
            sizes = {"in": images[0].nbytes * n, "map": h * w * 2 * n, "score": 4 * n}
            # every region made is kept at once, so that a refused registration leaves none behind (close)
            self._shm = ({}, n, images.shape[1:])
            try:
                for key, size in sizes.items():
                    name = f"pa_clip_{key}_{tag}"
                    self._shm[0][key] = (name, shm.create_shared_memory_region(name, f"/{name}", size), size)
                    self.client.register_system_shared_memory(name, f"/{name}", size, headers=self.headers)
            except (self._error, *TRANSPORT_ERRORS) as err:
                self.close_shared_memory()
                raise client_error(err) from err
        regions = self._shm[0]
        shm.set_shared_memory_region(regions["in"][1], [images])
        image_input.set_shared_memory(regions["in"][0], images.nbytes)
        outputs[0].set_shared_memory(regions["map"][0], h * w * 2 * n)
        outputs[1].set_shared_memory(regions["score"][0], 4 * n)
        try:
            self.client.infer(ENSEMBLE, [image_input, bank_input], outputs=outputs, headers=self.headers,
                              **self._deadline())
        except (self._error, *TRANSPORT_ERRORS) as err:
            if MISSING_REGION in _message(err) and not registered_again:  # the server restarted: register again
                self.close_shared_memory()
                return self._score_shm(images, image_input, bank_input, outputs, registered_again=True)
            raise client_error(err) from err
        maps = shm.get_contents_as_numpy(regions["map"][1], np.float16, [n, h, w]).astype(np.float32)
        scores = shm.get_contents_as_numpy(regions["score"][1], np.float32, [n, 1]).reshape(-1).copy()
        return maps, scores

    def close_shared_memory(self) -> None:
        if self._shm is None:
            return
        import tritonclient.utils.shared_memory as shm

        for name, handle, _ in self._shm[0].values():
            try:
                self.client.unregister_system_shared_memory(name, headers=self.headers)
            except Exception:  # the server may be gone already; the local region still goes
                pass
            shm.destroy_shared_memory_region(handle)
        self._shm = None

    def _deadline(self) -> dict:
        """A gRPC call's deadline, the client's timeout (scoring calls had none: a stuck server held a run for ever,
        --timeout or not); an HTTP client has its network timeout from its construction."""
        return {} if self.protocol == "http" else {"client_timeout": self.timeout_s}

    def close(self) -> None:
        """Once (again: nothing): left to the garbage collector, tritonclient's own close ran on whatever thread
        collected it, outside the gevent hub it belongs to."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self.close_shared_memory()
        self.client.close()

    def __enter__(self) -> "PAClipClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
