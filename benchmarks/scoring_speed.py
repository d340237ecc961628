"""Time and peak memory of the scoring stage alone: NumPy kernels against the plain-torch reference, side by side.

    python -m benchmarks.scoring_speed                 # 83 images, ViT-L-sized random features
    python -m benchmarks.scoring_speed --images 20     # a quicker look

Each implementation runs in its own process on the same seeded random features (L=1369, C=1024, 4 layers,
D=768, scales 1/3/5, default PAClipConfig, text embeddings present), so peak memory is that process's high-water
mark above what it held once the features were made.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

from benchmarks.memory import peak_rss_mb, rss_mb

from postprocess.config import PAClipConfig

IMPLS = ("numpy", "torch")


def make_inputs(args):
    from postprocess.contract import Features

    rng = np.random.default_rng(0)
    side = int(round(args.tokens ** 0.5))
    if side * side != args.tokens:
        raise SystemExit("--tokens must be a square number (a patch grid)")
    shape = (args.images, args.layers, args.tokens, args.channels)
    # a shared pattern plus per-image noise, in float16 as the encoder delivers it
    base = rng.standard_normal(shape[1:], dtype=np.float32)
    tokens = np.empty(shape, dtype=np.float16)
    for i in range(args.images):
        tokens[i] = base + 0.7 * rng.standard_normal(shape[1:], dtype=np.float32)
    patch = rng.standard_normal((args.images, args.tokens, args.dim), dtype=np.float32).astype(np.float16)
    cls = rng.standard_normal((args.images, args.dim), dtype=np.float32)
    text = rng.standard_normal((2, args.dim), dtype=np.float32)
    return Features(tokens, patch, cls, (side, side)), text


def augmented(features, indices, n_augment: int, seed: int):
    """Stand-ins for the encoded CADA augmentations of the chosen images: noisy copies of their tokens."""
    rng = np.random.default_rng(seed)
    src = features.layer_tokens[np.repeat(indices, n_augment)].astype(np.float32)
    return (src + 0.3 * rng.standard_normal(src.shape, dtype=np.float32)).astype(np.float16)


def worker(impl: str, args) -> dict:
    from postprocess.contract import Features
    from postprocess.pa_clip import NormalSet, finish_stage, lot_stage

    if impl == "torch":
        import torch

        from postprocess import reference
    cfg = PAClipConfig(full_coreset_ratio=args.full_coreset_ratio)
    features, text = make_inputs(args)
    size = (args.map_size, args.map_size)
    before = rss_mb()
    t0 = time.perf_counter()
    if impl == "numpy":
        state = lot_stage(features, text, cfg)
        t1 = time.perf_counter()
        idx = state.normal_indices
        aug = augmented(features, idx, cfg.n_augment, 1)
        prior = np.asarray(state.prior)[idx]
        normal = NormalSet(np.concatenate([features.layer_tokens[idx], aug]),
                           np.concatenate([idx, np.repeat(idx, cfg.n_augment)]),
                           np.concatenate([prior, np.repeat(prior, cfg.n_augment, axis=0)]))
        result = finish_stage(features, state, normal, cfg, size)
        maps = np.asarray(result.maps)
    else:
        tf = Features(torch.from_numpy(features.layer_tokens), torch.from_numpy(features.patch_embeds),
                      torch.from_numpy(features.image_embeds), features.grid)
        state = reference.lot_stage(tf, torch.from_numpy(text), cfg)
        t1 = time.perf_counter()
        idx = state.normal_indices.numpy()
        aug = augmented(features, idx, cfg.n_augment, 1)
        prior = state.prior[idx]
        normal = NormalSet(torch.from_numpy(np.concatenate([features.layer_tokens[idx], aug])),
                           torch.from_numpy(np.concatenate([idx, np.repeat(idx, cfg.n_augment)])),
                           torch.cat([prior, prior.repeat_interleave(cfg.n_augment, 0)]))
        result = reference.finish_stage(tf, state, normal, cfg, size)
        maps = result.maps.numpy()
    t2 = time.perf_counter()
    return {"impl": impl, "lot_stage_s": t1 - t0, "finish_stage_s": t2 - t1, "total_s": t2 - t0,
            "peak_mb": peak_rss_mb() - before, "map_checksum": float(maps.astype(np.float64).sum())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scoring_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=83)
    p.add_argument("--tokens", type=int, default=1369, help="patches per image (a square: 37x37 for ViT-L at 518)")
    p.add_argument("--channels", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=768, help="projected embedding size")
    p.add_argument("--map-size", type=int, default=518)
    p.add_argument("--full-coreset-ratio", type=float, default=PAClipConfig().full_coreset_ratio,
                   help="fraction of each image's patches kept in the full bank (the default config keeps all)")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0
    passthrough = [f"--images={args.images}", f"--tokens={args.tokens}", f"--channels={args.channels}",
                   f"--layers={args.layers}", f"--dim={args.dim}", f"--map-size={args.map_size}",
                   f"--full-coreset-ratio={args.full_coreset_ratio}"]
    rows = []
    for impl in args.impls:
        print(f"running {impl} ...", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, "-m", "benchmarks.scoring_speed", "--worker", impl, *passthrough],
                             check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\nscoring stage, {args.images} images, L={args.tokens}, C={args.channels}, {args.layers} layers, "
          f"scales {PAClipConfig().scales}, full-bank coreset ratio {args.full_coreset_ratio}, other settings default")
    print(f"{'impl':<8}{'lot stage s':>13}{'finish s':>10}{'total s':>10}{'ms/image':>10}{'peak MB':>10}")
    for r in rows:
        print(f"{r['impl']:<8}{r['lot_stage_s']:>13.1f}{r['finish_stage_s']:>10.1f}{r['total_s']:>10.1f}"
              f"{1000 * r['total_s'] / args.images:>10.0f}{r['peak_mb']:>10.0f}")
    if len(rows) == 2:
        a, b = rows
        print(f"\n{b['impl']} / {a['impl']}: time x{b['total_s'] / a['total_s']:.2f}, "
              f"peak memory x{b['peak_mb'] / max(a['peak_mb'], 1e-9):.2f}; "
              f"map checksums {a['map_checksum']:.4g} vs {b['map_checksum']:.4g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
