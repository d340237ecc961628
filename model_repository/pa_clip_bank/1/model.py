"""pa_clip_bank: add a lot, build, list, info, delete banks (postprocess.serving.BankService).

Images and prompts are encoded by the served clip_vision / clip_text models through BLS, so a bank is always built
with the encoder that scores against it.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

try:
    from postprocess import contract as C
    from postprocess.bank_store import BankStore
    from postprocess.errors import RequestError
    from postprocess.host import HostSettings, lower_priority
    from postprocess.serving import (BankService, bank_root, canary_response, error_response, from_triton,
                                     is_canary, parse_options, store_limit_bytes, text_value)
    from postprocess.logs import to_triton
    from postprocess.telemetry import TritonTelemetry
    from postprocess.text_tokens import load_tokenizer
except ImportError as err:
    raise ImportError(f"pa_clip_bank needs the pa-clip-triton package in the server's Python "
                      f"(pip install -e . in the environment tritonserver runs models with): {err}") from err


def _text(request, name, default=""):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    return text_value(tensor.as_numpy().reshape(-1)[0], name)


def _infer(model_name, inputs, outputs, xp=np):
    """BLS call; with CuPy the outputs are asked for in GPU memory and taken through DLPack (no host round trip)."""
    options = {}
    if xp is not np and hasattr(pb_utils, "PreferredMemory"):
        options["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, 0)
    response = pb_utils.InferenceRequest(model_name=model_name, requested_output_names=outputs, inputs=inputs,
                                         **options).exec()
    if response.has_error():
        error = response.error()
        code = error.code() if hasattr(error, "code") else None
        if code is not None and code == getattr(pb_utils.TritonError, "INVALID_ARG", None):
            raise RequestError(f"{model_name}: {error.message()}")  # what was sent, the caller's to fix: a 400
        raise RuntimeError(f"{model_name}: {error.message()}")
    return [from_triton(pb_utils.get_output_tensor_by_name(response, name), xp) for name in outputs]


class TritonPythonModel:
    def initialize(self, args):
        to_triton(pb_utils)  # the pa_clip loggers into Triton's log
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        repository = Path(args["model_repository"]).parent
        self.vision_model = params.get("encoder_model", C.VISION_MODEL)
        self.text_model = params.get("text_model", C.TEXT_MODEL)
        self.batch_size = int(params.get("encode_batch_size", "8") or 8)
        encoder = C.read_fingerprint(repository / self.vision_model)
        self.patch_size = int(encoder["patch_size"])
        encode_text = None
        text_dir = repository / self.text_model
        if (text_dir / "config.pbtxt").is_file():
            if C.same_encoder(C.read_fingerprint(text_dir), encoder):
                self.tokenizer = load_tokenizer(text_dir)  # clip_text/tokenizer.json: no torch in the server
                encode_text = self.encode_text
            else:
                pb_utils.Logger.log_warn(f"{C.BANK_MODEL}: {self.text_model} belongs to another encoder; normal "
                                         "images will be chosen visually")
        store = BankStore(bank_root(repository, params.get("bank_dir", "")), max_bytes=store_limit_bytes())
        store.clean()  # what a build killed mid-write left behind
        host = HostSettings.from_parameters(params)
        lower_priority(host.build_nice)  # builds yield the CPU to scoring (pa_clip_score and the encoder)
        self.xp = host.xp()
        self.service = BankService(store, encoder, self.encode_images, encode_text, host=host,
                                   telemetry=TritonTelemetry(pb_utils))

    def encode_images(self, images):
        parts = []
        for start in range(0, len(images), self.batch_size):
            batch = np.ascontiguousarray(images[start:start + self.batch_size])
            parts.append(_infer(self.vision_model, [pb_utils.Tensor(C.IMAGES, batch)], list(C.VISION_OUTPUTS),
                                self.xp))
        return C.Features.from_outputs([self.xp.concatenate([p[i] for p in parts]) for i in range(3)],
                                       C.grid_for(images.shape[1:3], self.patch_size))

    def encode_text(self, prompts):
        tokens = self.tokenizer(prompts)  # INT64 [B, 77]
        return _infer(self.text_model, [pb_utils.Tensor(C.TOKENS, tokens)], [C.TEXT_EMBEDS])[0]

    def execute(self, requests):
        responses = []
        for request in requests:
            if is_canary(request):
                responses.append(canary_response(pb_utils, C.BANK_MODEL))
                continue
            try:
                images = pb_utils.get_input_tensor_by_name(request, C.IMAGES)
                result = self.service.handle(_text(request, "action"), _text(request, C.BANK),
                                             _text(request, "category"),
                                             None if images is None else images.as_numpy(),
                                             parse_options(_text(request, "options")))
                payload = np.array([json.dumps(result).encode()], dtype=np.object_)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("result", payload)]))
            except Exception as err:  # the model keeps serving; a fault of ours is logged with its traceback
                responses.append(error_response(pb_utils, C.BANK_MODEL, err))
        return responses
