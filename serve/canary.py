"""Canaries: a cheap request through each Python-run model every few seconds, so that health tells the truth.

Triton 2.51 keeps saying ready while a Python model's stub process is dead (killed by the OOM killer, say): every
request to it fails with "Stub process ... is not healthy" and nothing restarts it. ``Canaries`` sends each such model
a request carrying the ``pa_clip_canary`` parameter, which our models answer at once, without work, with the error
``<model>: alive`` (``postprocess.serving.canary_response``); any other answer is a dead model. A canary still
waiting (the model busy with a long build) is not a failure, and no second one is sent meanwhile; nor is one that
this process could not send for want of file descriptors (EMFILE: a flood of connections to the guards restarted a
healthy tritonserver over and over).
"""

from __future__ import annotations

import errno
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import triton_to_np_dtype

from export.triton_config import read_config
from postprocess.logs import get_logger
from postprocess.serving import CANARY_PARAMETER, canary_message

PYTHON_BACKEND = "python"
OUT_OF_FILES = (errno.EMFILE, errno.ENFILE)  # this process (or the system) has no file descriptor left
DTYPES = {"TYPE_STRING": "BYTES", "TYPE_FP16": "FP16", "TYPE_FP32": "FP32", "TYPE_UINT8": "UINT8",
          "TYPE_INT64": "INT64", "TYPE_INT32": "INT32", "TYPE_BOOL": "BOOL"}


def python_run_models(repository: Path, platforms: set[str]) -> list[model_config_pb2.ModelConfig]:
    """The models of the Python backend, and those of ``platforms`` (run by a Python stub on this server)."""
    configs = [read_config(path.parent) for path in sorted(Path(repository).glob("*/config.pbtxt"))]
    return [c for c in configs if c.backend == PYTHON_BACKEND or c.platform in platforms]


def canary_inputs(config: model_config_pb2.ModelConfig, tritonclient_http) -> list:
    """The smallest request the model's config admits: required inputs only, every free dimension 0."""
    inputs = []
    for spec in config.input:
        if spec.optional:
            continue
        dtype = DTYPES[model_config_pb2.DataType.Name(spec.data_type)]
        shape = ([1] if config.max_batch_size > 0 else []) + [0 if d < 0 else d for d in spec.dims]
        data = np.full(shape, b"", dtype=np.object_) if dtype == "BYTES" else \
            np.zeros(shape, dtype=triton_to_np_dtype(dtype))
        tensor = tritonclient_http.InferInput(spec.name, shape, dtype)
        tensor.set_data_from_numpy(data, binary_data=True)
        inputs.append(tensor)
    return inputs


class Canaries:
    """``check()`` (called by the supervisor every ``interval_s``) -> (healthy, reason)."""

    def __init__(self, server, interval_s: float = 2.0):
        import tritonclient.http as http

        self.server = server
        self.interval_s = interval_s
        self.http = http
        self.models = python_run_models(server.repository, server.python_run_platforms)
        self.pool = ThreadPoolExecutor(max(1, len(self.models)), thread_name_prefix="canary")
        self.in_flight: dict = {}
        self.last_sent = 0.0

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def reset(self) -> None:
        """A new tritonserver: canaries sent to the old one say nothing about it."""
        self.in_flight = {}

    def check(self) -> tuple[bool, str]:
        failures = []
        for name, future in list(self.in_flight.items()):
            if future.done():
                del self.in_flight[name]
                problem = future.result()
                if problem:
                    failures.append(f"{name}: {problem}")
        if time.monotonic() - self.last_sent >= self.interval_s:
            self.last_sent = time.monotonic()
            for config in self.models:
                if config.name not in self.in_flight:
                    self.in_flight[config.name] = self.pool.submit(self.probe, config, self.server.internal_http_url,
                                                                   dict(self.server.internal_headers))
        return (not failures, "; ".join(failures))

    def probe(self, config, url: str, headers: dict) -> str:
        """'' when the model answered as a live one, or the canary could not be sent for want of file descriptors
        here (that says nothing about the model); else what it answered."""
        try:
            client = self.http.InferenceServerClient(url, connection_timeout=3600, network_timeout=3600)
        except Exception as err:  # noqa: BLE001
            return _unsent(config.name, err) if _out_of_files(err) else f"no client: {err}"
        try:
            client.infer(config.name, canary_inputs(config, self.http), headers=headers,
                         parameters={CANARY_PARAMETER: True})
            return "answered a canary as a real request"
        except Exception as err:  # noqa: BLE001 (tritonclient's exception, or the connection)
            if _out_of_files(err):
                return _unsent(config.name, err)
            message = getattr(err, "message", lambda: str(err))()
            return "" if canary_message(config.name) in str(message) else str(message)
        finally:
            client.close()


def _out_of_files(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in OUT_OF_FILES


def _unsent(model: str, err: BaseException) -> str:
    get_logger("serve").warning(f"canary of {model} not sent: {err} (this process is out of file descriptors; "
                                "the model is not judged by it)")
    return ""
