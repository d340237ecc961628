"""ONNX export of the encoders into a Triton model repository: ``clip_vision`` and ``clip_text``.

Each model is written beside its final place and renamed into it, so an interrupted export never leaves a
half-written model in the repository. The ONNX file records what produced it (``metadata_props``: backbone,
weights hash, image size, taps), so that a bank built with one encoder is never scored with another.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

FINGERPRINT_KEY = "pa_clip.encoder"
TEXT_CONTEXT = 77
# written beside each encoder model: the serving models read it to refuse banks of another encoder
ENCODER_FILE = "encoder.json"


def encoder_json(fingerprint: dict) -> str:
    return json.dumps(fingerprint, indent=1, sort_keys=True)


def fingerprint_of(path: str | Path) -> dict:
    """The encoder fingerprint recorded in an exported ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == FINGERPRINT_KEY:
            return json.loads(prop.value)
    raise ValueError(f"{path} does not say which encoder produced it (no {FINGERPRINT_KEY} metadata)")


def set_fingerprint(model, fingerprint: dict) -> None:
    for prop in list(model.metadata_props):
        if prop.key == FINGERPRINT_KEY:
            model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key = FINGERPRINT_KEY
    entry.value = json.dumps(fingerprint, sort_keys=True)


def vision_config(name: str, image_size: int, n_taps: int, tokens: int, channels: int, dim: int,
                  max_batch_size: int, platform: str = "onnxruntime_onnx", kind: str = "KIND_CPU",
                  instances: int = 1, extra: str = "") -> str:
    """config.pbtxt of the clip_vision contract (Triton dims exclude the batch dimension)."""
    return f'''name: "{name}"
platform: "{platform}"
max_batch_size: {max_batch_size}
input [
  {{ name: "images" data_type: TYPE_UINT8 dims: [ {image_size}, {image_size}, 3 ] }}
]
output [
  {{ name: "layer_tokens" data_type: TYPE_FP16 dims: [ {n_taps}, {tokens}, {channels} ] }},
  {{ name: "patch_embeds" data_type: TYPE_FP16 dims: [ {tokens}, {dim} ] }},
  {{ name: "image_embeds" data_type: TYPE_FP32 dims: [ {dim} ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
instance_group [ {{ kind: {kind} count: {instances} }} ]
{extra}'''


def text_config(name: str, dim: int, max_batch_size: int, kind: str = "KIND_CPU") -> str:
    return f'''name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [
  {{ name: "tokens" data_type: TYPE_INT64 dims: [ {TEXT_CONTEXT} ] }}
]
output [
  {{ name: "text_embeds" data_type: TYPE_FP32 dims: [ {dim} ] }}
]
instance_group [ {{ kind: {kind} count: 1 }} ]
'''


def write_model_dir(repository: Path, name: str, files: dict[str, object]) -> Path:
    """Write ``repository/name`` atomically: build it in a temporary folder beside it, then rename it into place.

    ``files`` maps relative paths to bytes, text, or a callable that writes to the given path.
    """
    repository.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=repository))
    try:
        for rel, content in files.items():
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if callable(content):
                content(target)
            elif isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
            with open(target, "rb") as f:
                os.fsync(f.fileno())
        final = repository / name
        old = None
        if final.exists():
            old = repository / f".{name}.old-{os.getpid()}"
            final.rename(old)
        staging.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_model_dir(repository: Path, name: str) -> None:
    """Take a model out of the repository (renamed away first, so the server never sees half of it)."""
    target = repository / name
    if not target.exists():
        return
    trash = repository / f".{name}.removed-{os.getpid()}"
    target.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)
    print(f"removed {target}: it belonged to another encoder", file=sys.stderr)


def export_torch_module(module, example, path: Path, input_name: str, output_names: list[str],
                        fingerprint: dict, precision: str, opset: int = 17) -> None:
    """torch -> ONNX with a dynamic batch dimension, fingerprint recorded, checked with onnx.checker.

    ``precision`` is recorded only: an fp16 export passes a module already in half precision.
    """
    import onnx
    import torch

    dynamic = {input_name: {0: "batch"}, **{name: {0: "batch"} for name in output_names}}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused attention kernel has no ONNX form
    try:
        with torch.no_grad():
            torch.onnx.export(module, (example,), str(path), input_names=[input_name], output_names=output_names,
                              dynamic_axes=dynamic, opset_version=opset, dynamo=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    model = onnx.load(str(path))
    set_fingerprint(model, {**fingerprint, "precision": precision})
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))


def ort_session(model: str | Path | bytes, precision: str = "fp32", threads: int = 0):
    """An ONNX Runtime CPU session of a file or serialized model. float16 graphs get basic graph optimisations
    only: with the extended ones, onnxruntime 1.32 crashed (segmentation fault) building the session of our float16
    ViT on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if precision == "fp16":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def check_runs(path: Path, feeds: dict, precision: str = "fp32") -> list[np.ndarray]:
    """Load the file in ONNX Runtime and run it once: an export that does not load is not written."""
    return ort_session(path, precision).run(None, feeds)
