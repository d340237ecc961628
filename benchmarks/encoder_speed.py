"""Encoder throughput on this machine: ONNX Runtime variants against torch eager, side by side in one run.

    python -m benchmarks.encoder_speed                      # ViT-L-14-336 at 518, random weights, batch 1 and 4
    python -m benchmarks.encoder_speed --model tiny --image-size 56 --iterations 2

Variants: torch eager (float32); ORT float32 as exported (ORT's default graph optimisations, which fold constants);
ORT float32 after onnxruntime's transformer optimiser (fused attention / LayerNorm / GELU); ORT float16 (basic
optimisations: see export/onnx_export.py). Each variant runs in its own process; peak memory is that process's
resident high-water mark (model, runtime and activations); images/s is the median of the timed iterations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.memory import peak_rss_mb
from postprocess.contract import IMAGES

VARIANTS = ("torch", "ort-fp32", "ort-fp32-fused", "ort-fp16")


def prepare(args, workdir: Path) -> dict:
    """Export the ONNX variants once; returns variant -> model file."""
    from export.backbones import ClipBackbone
    from export.repository import export_clip

    backbone = ClipBackbone(args.model, "none", args.image_size)
    files = {}
    for precision in ("fp32", "fp16"):
        export_clip(backbone, workdir / precision, precision, max_batch_size=max(args.batches))
        files[f"ort-{precision}"] = workdir / precision / "clip_vision" / "1" / "model.onnx"
    fused = workdir / "fused.onnx"
    fuse_attention(files["ort-fp32"], fused, backbone)
    files["ort-fp32-fused"] = fused
    return files


def fuse_attention(source: Path, target: Path, backbone) -> None:
    """onnxruntime's transformer optimiser (model type 'vit'): attention, LayerNorm and GELU fusions."""
    from onnxruntime.transformers import optimizer

    visual = backbone.clip.visual
    heads = visual.transformer.resblocks[0].attn.num_heads
    model = optimizer.optimize_model(str(source), model_type="vit", num_heads=heads,
                                     hidden_size=visual.transformer.width, opt_level=0)
    model.save_model_to_file(str(target))


def worker(args) -> dict:
    size = args.image_size
    images = np.random.default_rng(0).integers(0, 256, (max(args.batches), size, size, 3), dtype=np.uint8)
    if args.worker == "torch":
        import torch

        from export.backbones import ClipBackbone

        backbone = ClipBackbone(args.model, "none", size)

        def run(batch):
            with torch.inference_mode():
                backbone.vision(torch.from_numpy(batch))
    else:
        from export.onnx_export import ort_session

        session = ort_session(args.model_file, "fp16" if args.worker == "ort-fp16" else "fp32")

        def run(batch):
            session.run(None, {IMAGES: batch})
    rows = []
    for batch in args.batches:
        run(images[:batch])  # warm-up
        times = []
        for _ in range(args.iterations):
            t0 = time.perf_counter()
            run(images[:batch])
            times.append(time.perf_counter() - t0)
        rows.append({"variant": args.worker, "batch": batch, "images_per_s": batch / statistics.median(times)})
    peak = peak_rss_mb()
    for row in rows:
        row["peak_mb"] = peak
    return {"rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.encoder_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-L-14-336")
    p.add_argument("--image-size", type=int, default=518)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--json", default=None)
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--model-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    rows = []
    common = [f"--model={args.model}", f"--image-size={args.image_size}", f"--iterations={args.iterations}",
              "--batches", *map(str, args.batches)]
    with tempfile.TemporaryDirectory(prefix="pa-clip-speed-") as tmp:
        print("exporting ...", file=sys.stderr, flush=True)
        files = prepare(args, Path(tmp))
        for variant in args.variants:
            print(f"running {variant} ...", file=sys.stderr, flush=True)
            extra = [] if variant == "torch" else [f"--model-file={files[variant]}"]
            out = subprocess.run([sys.executable, "-m", "benchmarks.encoder_speed", "--worker", variant, *common,
                                  *extra], check=True, capture_output=True, text=True)
            rows += json.loads(out.stdout.strip().splitlines()[-1])["rows"]
    print(f"\nencoder {args.model} at {args.image_size}x{args.image_size} (random weights), this machine")
    print(f"{'variant':<16}{'batch':>6}{'images/s':>10}{'peak MB':>10}")
    for r in rows:
        print(f"{r['variant']:<16}{r['batch']:>6}{r['images_per_s']:>10.3f}{r['peak_mb']:>10.0f}")
    torch_rows = {r["batch"]: r for r in rows if r["variant"] == "torch"}
    best = {}
    for r in rows:
        if r["variant"] != "torch" and r["images_per_s"] > best.get(r["batch"], {"images_per_s": 0})["images_per_s"]:
            best[r["batch"]] = r
    for batch, r in best.items():
        if batch in torch_rows:
            print(f"batch {batch}: best ONNX Runtime ({r['variant']}) / torch eager = "
                  f"x{r['images_per_s'] / torch_rows[batch]['images_per_s']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
