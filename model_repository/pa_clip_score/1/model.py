"""pa_clip_score: encoder outputs + bank id -> anomaly maps and image scores (postprocess.serving.ScoreService)."""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

try:
    from postprocess.bank import BankStore
    from postprocess.serving import ScoreService, array_module, bank_root, read_encoder_fingerprint
except ImportError as err:  # the server's Python must have the project installed
    raise ImportError(f"pa_clip_score needs the pa-clip-triton package in the server's Python "
                      f"(pip install -e . in the environment tritonserver runs models with): {err}") from err

INPUTS = ("layer_tokens", "patch_embeds", "image_embeds", "images", "bank")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        repository = Path(args["model_repository"]).parent
        encoder = read_encoder_fingerprint(repository / params.get("encoder_model", "clip_vision"))
        store = BankStore(bank_root(repository, params.get("bank_dir", "")))
        self.service = ScoreService(store, encoder, array_module(params.get("array_module", "auto")),
                                    int(params.get("bank_cache_size", "2") or 2))

    def execute(self, requests):
        inputs = []
        for request in requests:
            inputs.append({name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in INPUTS})
        responses = []
        for result in self.service.score_requests(inputs):
            if isinstance(result, Exception):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"pa_clip_score: {result}")))
            else:
                maps, scores = result
                responses.append(pb_utils.InferenceResponse([
                    pb_utils.Tensor("anomaly_map", maps), pb_utils.Tensor("score", scores.reshape(-1, 1))]))
        return responses
