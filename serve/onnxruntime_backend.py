"""A Triton Python-based backend that serves ``platform: "onnxruntime_onnx"`` models with ONNX Runtime.

The Triton build bundled in the ``nvidia-pytriton`` wheel (used on CPU machines) has the Python backend only. The
local server copies this file to ``backends/onnxruntime/model.py`` (beside a copy of ``libtriton_python.so``), so the
unchanged ``clip_vision`` / ``clip_text`` configs that the NGC image serves with its native onnxruntime backend load
here too. Requests that arrive together (dynamic batching) run as one ONNX Runtime call.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from export.onnx_export import ort_run_options_shrinking_the_arena, ort_session, release_freed_heap
from postprocess.contract import IMAGES, max_image_side, patch_side, read_fingerprint, size_pair
from postprocess.serving import canary_response, is_canary


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        filename = config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"{config['name']}: no ONNX file at {path}")
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.session = ort_session(path, self._precision(args["model_repository"]),
                                   threads=int(params.get("intra_op_thread_count", "0") or 0),
                                   basic_optimizations=params.get("graph_optimization_level", "") == "basic")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.batched = int(config.get("max_batch_size", 0)) > 0
        self.model_name = config["name"]
        try:  # checked before any work: encoding time grows with the square of the side
            fingerprint = read_fingerprint(args["model_repository"])
            self.max_side = max_image_side(fingerprint)
            height, width = size_pair(fingerprint["image_size"])
        except (OSError, ValueError, KeyError):
            fingerprint, self.max_side, height, width = {}, 0, 0, 0
        self.min_side = patch_side(fingerprint)
        # A run on more input bytes than a full batch at the configured size returns what its arena grew by
        # (ONNX Runtime keeps the peak otherwise: +49 MB held after one batch of eight 224x224 images here)
        self.usual_bytes = max(1, int(config.get("max_batch_size", 0))) * height * width * 3
        self.shrink = ort_run_options_shrinking_the_arena()

    @staticmethod
    def _precision(model_dir):
        """The precision the export recorded beside the model (fp32 for a model this project did not export)."""
        try:
            return read_fingerprint(model_dir).get("precision", "fp32")
        except (OSError, ValueError):
            return "fp32"

    def _refusal(self, name, array):
        """Why an input cannot be encoded (before any work), or None."""
        if array.size == 0:
            return f"input '{name}' is empty (shape {list(array.shape)})"
        if name == IMAGES and array.ndim == 4 and min(array.shape[1:3]) < self.min_side:  # ONNX Runtime failed: a 500
            return (f"input '{name}' holds {array.shape[1]}x{array.shape[2]} images; this encoder reads "
                    f"{self.min_side}-pixel patches: each side must be at least that (pa-clip score resizes them)")
        if name == IMAGES and array.ndim == 4 and self.max_side and max(array.shape[1:3]) > self.max_side:
            return (f"input '{name}' holds {array.shape[1]}x{array.shape[2]} images; this encoder takes at most "
                    f"{self.max_side} pixels a side: resize them (pa-clip score does)")
        return None

    def _run(self, feeds):
        large = self.usual_bytes and sum(a.nbytes for a in feeds.values()) > self.usual_bytes
        outputs = self.session.run(self.output_names, feeds, self.shrink if large else None)
        if large:
            release_freed_heap()
        return outputs

    def execute(self, requests):
        feeds_per_request = []
        responses = [None] * len(requests)
        for i, request in enumerate(requests):
            feeds = {}
            if is_canary(request):
                responses[i] = canary_response(pb_utils, self.model_name)
            for name in self.input_names if responses[i] is None else ():
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                problem = f"missing input '{name}'" if tensor is None else self._refusal(name, tensor.as_numpy())
                if problem:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(
                        f"{self.model_name}: {problem}", pb_utils.TritonError.INVALID_ARG))
                    break
                feeds[name] = tensor.as_numpy()
            feeds_per_request.append(feeds)
        ok = [i for i, r in enumerate(responses) if r is None]
        if not ok:
            return responses
        try:
            if self.batched and len(ok) > 1:
                sizes = [len(feeds_per_request[i][self.input_names[0]]) for i in ok]
                merged = {n: np.concatenate([feeds_per_request[i][n] for i in ok]) for n in self.input_names}
                outputs = self._run(merged)
                bounds = np.cumsum([0] + sizes)
                per_request = [[o[bounds[j]:bounds[j + 1]] for o in outputs] for j in range(len(ok))]
            else:
                per_request = [self._run(feeds_per_request[i]) for i in ok]
        except Exception as exc:  # one bad batch must not take the model down
            for i in ok:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{self.model_name}: ONNX Runtime failed: {exc}"))
            return responses
        for i, outputs in zip(ok, per_request):
            responses[i] = pb_utils.InferenceResponse(
                [pb_utils.Tensor(n, np.ascontiguousarray(o)) for n, o in zip(self.output_names, outputs)])
        return responses
