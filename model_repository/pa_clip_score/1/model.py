"""pa_clip_score: encoder outputs + bank id -> anomaly maps and image scores (postprocess.serving.ScoreService)."""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

try:
    from postprocess import contract as C
    from postprocess.bank_store import BankStore
    from postprocess.host import HostSettings
    from postprocess.serving import ScoreService, bank_root, canary_response, error_response, from_triton, is_canary
    from postprocess.logs import to_triton
    from postprocess.telemetry import TritonTelemetry, instance_label, sole_instance
except ImportError as err:  # the server's Python must have the project installed
    raise ImportError(f"pa_clip_score needs the pa-clip-triton package in the server's Python "
                      f"(pip install -e . in the environment tritonserver runs models with): {err}") from err

INPUTS = (*C.VISION_OUTPUTS, C.IMAGES, C.BANK)


class TritonPythonModel:
    def initialize(self, args):
        to_triton(pb_utils)  # the pa_clip loggers into Triton's log
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        repository = Path(args["model_repository"]).parent
        encoder = C.read_fingerprint(repository / params.get("encoder_model", C.VISION_MODEL))
        store = BankStore(bank_root(repository, params.get("bank_dir", "")))
        kind = args.get("model_instance_kind", "")
        telemetry = TritonTelemetry(pb_utils, instance_label(args), sole_instance(config, kind))
        self.service = ScoreService(store, encoder, HostSettings.from_parameters(params), telemetry=telemetry)

    def execute(self, requests):
        # encoder outputs stay on the device they arrive on (DLPack); pixels (hashed) and bank ids are host data
        xp = self.service.xp
        responses = [canary_response(pb_utils, C.SCORE_MODEL) if is_canary(r) else None for r in requests]
        real = [i for i, r in enumerate(responses) if r is None]
        inputs = [{name: from_triton(pb_utils.get_input_tensor_by_name(requests[i], name),
                                     xp if name in C.VISION_OUTPUTS else np) for name in INPUTS} for i in real]
        for i, result in zip(real, self.service.score_requests(inputs)):
            if isinstance(result, Exception):
                responses[i] = error_response(pb_utils, C.SCORE_MODEL, result)
            else:
                maps, scores = result
                responses[i] = pb_utils.InferenceResponse([
                    pb_utils.Tensor(C.ANOMALY_MAP, maps), pb_utils.Tensor(C.SCORE, scores.reshape(-1, 1))])
        return responses
