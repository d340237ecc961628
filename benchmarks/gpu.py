"""The GPU path measured: each fused kernel, the whole scoring of a lot, and the pipeline end to end, against a torch
reference on the same GPU written the way MuSc does it (``torch.cdist``), side by side in one run.

    python -m benchmarks.gpu [--images 200] [--json out/gpu.json]      # one H100/H200: about 5 minutes
    python -m benchmarks.gpu --dry-run                                   # tiny sizes on the CPU (NumPy, torch CPU)

Rows: kNN (fused FP16 tiles + per-image max + interval top-k) in TFLOP/s against the dense FP16 peak and against a
torch FP16 matmul measured here; coreset step, pooling, subtraction + fusion, upsampling in ms; each kernel row
twice, fused and generic (CuPy's own kernels, ``PA_CLIP_FUSED_KERNELS=0``), and each on its own, so a kernel that
fails records its error and leaves the other figures; the whole scoring of
a lot (N images, L=1369, C=1024, 4 layers x 3 scales, default PAClipConfig) ours against the cdist reference, with
the largest map difference; the in-process pipeline end to end (open_clip ViT-L-14-336@518, FP16, random weights:
speed does not depend on them) with DLPack hand-off into the CuPy scoring, in images/s; peak GPU memory. The ratio
lines come last; ``--json`` is rewritten after every section. Exit status 1 when a row failed.
``benchmarks/gpu_check.sh`` runs it with the GPU tests on a lent device.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

H200_FP16_DENSE_TFLOPS = 989.0  # NVIDIA's figure for dense FP16/BF16 tensor-core work (H100 SXM: the same)


class Device:
    """Where the run happens: CuPy + torch on CUDA, or (``--dry-run``) NumPy + torch on the CPU."""

    def __init__(self, dry_run: bool):
        import torch

        self.torch = torch
        self.dry_run = dry_run
        if dry_run:
            self.xp, self.torch_device = np, "cpu"
        else:
            import cupy

            self.xp, self.torch_device = cupy, "cuda"
            cupy.get_default_memory_pool().free_all_blocks()
            torch.cuda.reset_peak_memory_stats()

    def sync(self):
        if not self.dry_run:
            self.xp.cuda.Device().synchronize()
            self.torch.cuda.synchronize()

    def timed(self, fn, repeat: int = 3) -> tuple[float, object]:
        """Median seconds of ``repeat`` runs after one warm-up, and the last result."""
        result = fn()
        self.sync()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            result = fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return float(np.median(times)), result

    def to_torch(self, array):
        """A CuPy array as a torch tensor without a copy (DLPack), or a NumPy one on the CPU."""
        if self.dry_run:
            return self.torch.from_numpy(np.ascontiguousarray(array))
        return self.torch.from_dlpack(array)

    def from_torch(self, tensor):
        return tensor.numpy() if self.dry_run else self.xp.from_dlpack(tensor.detach().contiguous())

    def peak_memory_gb(self) -> float:
        if self.dry_run:
            return 0.0
        pool = self.xp.get_default_memory_pool().total_bytes()
        return (pool + self.torch.cuda.max_memory_allocated()) / 1e9


def unit_features(xp, rng, shape):
    x = xp.asarray(rng.standard_normal(shape, dtype=np.float32))
    return x / xp.sqrt((x * x).sum(axis=-1, keepdims=True))


# -- the torch reference, MuSc's way ------------------------------------------------------------------------------
def musc_mutual_scores(torch, queries, bank, k: int):
    """queries (Nq, L, C) against bank images (Nb, m, C), query i being bank image i: per patch the cdist distance to
    the nearest patch of each other image, then the mean of the k smallest (cosine distance = squared euclidean / 2
    for unit vectors)."""
    n_query, length, channels = queries.shape
    n_bank, per_image, _ = bank.shape
    flat = bank.reshape(-1, channels)
    out = torch.empty(n_query, length, device=queries.device)
    for i in range(n_query):
        dist = torch.cdist(queries[i], flat).pow_(2).mul_(0.5).view(length, n_bank, per_image).amin(dim=-1)
        dist[:, i] = float("inf")
        out[i] = dist.topk(k, dim=-1, largest=False).values.mean(dim=-1)
    return out


def musc_normal_scores(torch, feats, bank, bank_ids, k: int):
    n, length, _ = feats.shape
    out = torch.empty(n, length, device=feats.device)
    for i in range(n):
        dist = torch.cdist(feats[i], bank).pow_(2).mul_(0.5)
        dist[:, bank_ids == i] = float("inf")
        out[i] = dist.topk(k, dim=-1, largest=False).values.mean(dim=-1)
    return out


def torch_reference_scoring(dev, layer_tokens, normal_tokens, normal_ids, cfg, grid, map_size):
    """The whole lot in torch on the same device: pooling, mutual scores, normal bank scores (bank = every patch of
    the normal images, no coreset), subtraction, fusion, upsampling."""
    torch, F = dev.torch, dev.torch.nn.functional
    n, n_layers, length, channels = layer_tokens.shape
    h, w = grid
    k = max(1, min(cfg.k_max, max(cfg.k_min, round(cfg.interval_fraction * (n - 1))), n - 1))

    def pooled(tokens, r):
        x = tokens.float().reshape(-1, h, w, channels).permute(0, 3, 1, 2)
        if r > 1:
            x = F.avg_pool2d(x, r, stride=1, padding=r // 2, count_include_pad=False)
        return F.normalize(x.permute(0, 2, 3, 1).reshape(-1, length, channels), dim=-1)

    fused = 0
    for r, weight in zip(cfg.scales, cfg.weights):
        lot = [pooled(layer_tokens[:, l], r) for l in range(n_layers)]
        full = sum(musc_mutual_scores(torch, feats, feats, k) for feats in lot) / n_layers
        normal = sum(musc_normal_scores(torch, feats, pooled(normal_tokens[:, l], r).reshape(-1, channels),
                                        normal_ids.repeat_interleave(length), cfg.normal_k)
                     for l, feats in enumerate(lot)) / n_layers
        tau = torch.quantile(normal.flatten()[: 1 << 24].double(), cfg.tau_quantile).item()
        fused = fused + weight * (full - cfg.alpha * normal * (normal <= tau).float())
    return F.interpolate(fused.reshape(n, 1, h, w), size=map_size, mode="bilinear", align_corners=False)[:, 0]


# -- rows ---------------------------------------------------------------------------------------------------------
FUSED_SETTINGS = (("fused", "1"), ("generic", "0"))  # PA_CLIP_FUSED_KERNELS: our CUDA kernels, or CuPy's generic ones


def guarded(name: str, fn) -> list[dict]:
    """The rows ``fn`` returns, or one row that records its error: a kernel that fails on the device still leaves the
    other rows' figures."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - any failure is a figure to report, not a reason to stop the check
        print(f"{name}: FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return [{"row": name, "error": f"{type(e).__name__}: {e}"[:500]}]


def with_fused_kernels(setting: str, fn):
    previous = os.environ.get("PA_CLIP_FUSED_KERNELS")
    os.environ["PA_CLIP_FUSED_KERNELS"] = setting
    try:
        return fn()
    finally:
        if previous is None:
            del os.environ["PA_CLIP_FUSED_KERNELS"]
        else:
            os.environ["PA_CLIP_FUSED_KERNELS"] = previous


def kernel_rows(dev, args, rng) -> list[dict]:
    """Each kernel twice, fused and generic (``PA_CLIP_FUSED_KERNELS=0``), every row on its own: one failing kernel
    leaves the others' figures."""
    from postprocess import kernels as K

    xp, torch = dev.xp, dev.torch
    rows = []
    n_query, n_bank = args.query_images, args.images
    queries = unit_features(xp, rng, (n_query, args.tokens, args.channels))
    bank = unit_features(xp, rng, (n_bank, args.tokens, args.channels)).astype(xp.float16)
    ids = xp.arange(n_bank)
    k = K.interval_k(n_bank, 0.3, 1, 64)
    flops = 2.0 * n_query * args.tokens * n_bank * args.tokens * args.channels
    side = 256 if dev.dry_run else 8192

    def matmul_row():
        a = torch.randn(side, side, device=dev.torch_device, dtype=torch.float32 if dev.dry_run else torch.float16)
        matmul_s, _ = dev.timed(lambda: a @ a)
        tflops = 2 * side ** 3 / matmul_s / 1e12
        return [{"row": f"torch FP16 matmul {side}^3 (this device's practical peak)", "ms": 1e3 * matmul_s,
                 "tflops": tflops, "of_peak": tflops / H200_FP16_DENSE_TFLOPS}]

    rows += guarded("torch FP16 matmul", matmul_row)
    matmul_tflops = rows[-1].get("tflops")
    reference = {}

    def torch_reference():
        if "scores" not in reference:
            tq, tb = dev.to_torch(queries), dev.to_torch(bank).float()
            reference["s"], ref = dev.timed(lambda: musc_mutual_scores(torch, tq, tb, k))
            reference["scores"] = ref.cpu().numpy()
        return reference["scores"], reference["s"]

    def knn_row(label):
        seconds, got = dev.timed(lambda: K.full_bank_scores(queries, bank, ids[:n_query], ids, k, 256 << 20))
        ref, ref_s = torch_reference()
        tflops = flops / seconds / 1e12
        row = {"row": f"kNN full bank ({label})", "ms": 1e3 * seconds, "tflops": tflops,
               "of_peak": tflops / H200_FP16_DENSE_TFLOPS, "torch_cdist_ms": 1e3 * ref_s,
               "max_diff": float(np.abs(K.to_numpy(got) - ref).max())}
        if matmul_tflops:
            row["of_torch_fp16_matmul"] = tflops / matmul_tflops
        return [row]

    points = xp.asarray(rng.standard_normal((3, args.tokens, 128), dtype=np.float32))
    m = max(2, args.tokens // 10)
    grid_side = int(round(math.sqrt(args.tokens)))
    grid = xp.asarray(rng.standard_normal((args.query_images, grid_side, grid_side, args.channels), dtype=np.float32))
    scores = [xp.asarray(rng.random((args.images, grid_side * grid_side), dtype=np.float32)) for _ in range(6)]
    timed_rows = [
        (f"coreset {m} of {args.tokens} in 3 groups", lambda: K.greedy_coreset(points, m)),
        (f"pooling r=5 of {args.query_images} images", lambda: K.box_mean(grid, 5)),
        (f"subtraction + fusion, {args.images} images x 3 scales",
         lambda: K.subtract_and_fuse(scores[:3], scores[3:], [0.5] * 3, [1 / 3] * 3, 0.2)),
        (f"upsampling to {args.map_size}, {args.images} images",
         lambda: K.patch_scores_to_maps(scores[0], (grid_side, grid_side), (args.map_size,) * 2, 0.0)),
    ]
    for label, setting in FUSED_SETTINGS:
        rows += guarded(f"kNN full bank ({label})", lambda: with_fused_kernels(setting, lambda: knn_row(label)))
        for name, fn in timed_rows:
            rows += guarded(f"{name} ({label})", lambda: with_fused_kernels(
                setting, lambda: [{"row": f"{name} ({label})", "ms": 1e3 * dev.timed(fn)[0]}]))
    return rows


def lot_rows(dev, args) -> list[dict]:
    """The whole scoring of a lot: ours (CuPy, fused kernels) against the cdist reference, same features."""
    from benchmarks.scoring_speed import augmented, make_inputs
    from postprocess import kernels as K
    from postprocess.config import PAClipConfig
    from postprocess.pa_clip import NormalSet, finish_stage, lot_stage

    xp, torch = dev.xp, dev.torch
    spec = SimpleNamespace(images=args.images, tokens=args.tokens, channels=args.channels, layers=4, dim=768)
    host_features, text = make_inputs(spec)
    features = host_features.to(xp)
    cfg = PAClipConfig()
    size = (args.map_size, args.map_size)

    def ours():
        state = lot_stage(features, xp.asarray(text), cfg)
        idx = state.normal_indices
        aug = augmented(host_features, idx, cfg.n_augment, 1)
        on_device = xp.asarray(idx)
        normal = NormalSet(xp.concatenate([features.layer_tokens[on_device], xp.asarray(aug)]),
                           xp.concatenate([on_device, xp.asarray(np.repeat(idx, cfg.n_augment))]),
                           xp.concatenate([state.prior[on_device], xp.repeat(state.prior[on_device], cfg.n_augment, 0)]))
        return finish_stage(features, state, normal, cfg, size), normal

    start = time.perf_counter()
    result, normal = ours()
    dev.sync()
    ours_s = time.perf_counter() - start
    tokens = dev.to_torch(features.layer_tokens)
    start = time.perf_counter()
    ref_maps = torch_reference_scoring(dev, tokens, dev.to_torch(normal.layer_tokens), dev.to_torch(normal.source_ids),
                                       cfg, features.grid, size)
    dev.sync()
    ref_s = time.perf_counter() - start
    # the reference keeps every normal patch (no coreset, no prior filter): its maps are a cost yardstick, compared
    # here only for shape and scale
    return [{"row": f"whole lot: {args.images} images, L={args.tokens}, C={args.channels}, 4 layers x 3 scales",
             "ours_s": ours_s, "torch_cdist_s": ref_s, "speedup": ref_s / ours_s,
             "map_mean_ours": float(K.to_numpy(result.maps).mean()), "map_mean_torch": float(ref_maps.mean())}]


def bank_rows(dev, args) -> list[dict]:
    """Online scoring of new images against banks built on the device from the same lot of random ViT-L-sized
    features (N images), one bank per setting of ``benchmarks.online_speed.VARIANTS`` (the full bank beside the
    default one; widths relative to the features'; the bfloat16 rows are left out: a setting of a CPU
    host, the GPU multiplies in its own FP16 tiles; so is the row that reads the descriptors per request): bank GB, ms per new image (16 at a time), and the ratio."""
    from benchmarks.bank_frontier import HOST_KEYS, resolve
    from benchmarks.lot_scaling import stamps
    from benchmarks.online_speed import AS_BEFORE, VARIANTS
    from benchmarks.scoring_speed import make_inputs
    from postprocess.bank import build_bank, score_with_bank
    from postprocess.contract import Features
    from postprocess.pipeline import LotScorer
    from postprocess.serving import build_config

    xp = dev.xp
    spec = SimpleNamespace(images=args.images, tokens=args.tokens, channels=args.channels, layers=4, dim=768)
    host_features, _ = make_inputs(spec)
    features = host_features.to(xp)
    side = int(round(math.sqrt(args.tokens)))
    rng = np.random.default_rng(1)

    class RandomBackbone:
        """Encodes the CADA copies as noisy copies of the lot's features: the cost of building, not its content."""

        has_text = False

        def encode(self, images):
            index = rng.integers(0, args.images, len(images))
            tokens = host_features.layer_tokens[index].astype(np.float32)
            tokens += 0.3 * rng.standard_normal(tokens.shape, dtype=np.float32)
            return Features(xp.asarray(tokens.astype(np.float16)), features.patch_embeds[xp.asarray(index)],
                            features.image_embeds[xp.asarray(index)], features.grid)

        def encode_text(self, prompts):
            return None

    images = np.zeros((args.images, side * 14, side * 14, 3), np.uint8)
    images[:, 0, 0, :] = stamps(np.arange(args.images))  # distinct images: copies of one would be one image
    queries = features.take(slice(0, min(16, args.images)))
    ids = xp.full(queries.layer_tokens.shape[0], -1)
    rows, base_ms = [], None
    variants = {name: resolve(settings, args.channels, 4) for name, settings in VARIANTS.items()
                if not set(settings) & set(HOST_KEYS) and name != AS_BEFORE}  # that row is the CPU loop's
    for name, settings in variants.items():
        def one(name=name, settings=settings):
            scorer = LotScorer(RandomBackbone(), images, "bank", progress=False, features=features, xp=xp)
            start = time.perf_counter()
            bank = build_bank(scorer, build_config(dict(settings)), "gpu", {"backbone": "random"})[0]
            dev.sync()
            build_s = time.perf_counter() - start
            seconds, _ = dev.timed(lambda: score_with_bank(bank, queries, ids))
            ms = 1e3 * seconds / queries.layer_tokens.shape[0]
            return [{"row": f"bank {name}: {args.images} lot images, new images scored 16 at a time",
                     "bank_gb": bank.nbytes / 1e9, "build_s": build_s, "ms_per_new_image": ms}]
        got = guarded(f"bank {name}", one)
        if "ms_per_new_image" in got[-1]:
            base_ms = base_ms or got[-1]["ms_per_new_image"]
            got[-1]["faster_than_first"] = base_ms / got[-1]["ms_per_new_image"]
        rows += got
    return rows


def end_to_end_rows(dev, args) -> list[dict]:
    """open_clip in FP16 on torch, features handed to the CuPy scoring through DLPack, a lot of synthetic washers."""
    import tempfile

    from benchmarks.lot_scaling import stamps
    from client.demo_lot import write_demo_lot
    from client.images import model_input, read_rgb
    from export.backbones import ClipBackbone
    from postprocess.config import PAClipConfig
    from postprocess.contract import Features
    from postprocess.pipeline import LotScorer

    torch = dev.torch
    backbone = ClipBackbone(args.model, "none", args.image_size, device=dev.torch_device)
    if not dev.dry_run:
        backbone.vision.half()
    folder = write_demo_lot(Path(tempfile.mkdtemp(prefix="pa-clip-gpu-")) / "lot",
                            n_images=min(args.images, 24), n_defective=2, size=args.image_size)
    pictures = [model_input(read_rgb(p), args.image_size) for p in sorted(folder.glob("*.png"))]
    images = np.stack([pictures[i % len(pictures)] for i in range(args.images)])
    images[:, 0, 0, :] ^= stamps(np.arange(args.images))  # repeats of the pictures: distinct, not copies of one

    class DeviceBackbone:
        """The backbone interface with features left on the device (DLPack into CuPy)."""

        has_text = True

        def encode(self, batch):
            with torch.inference_mode():
                tensors = backbone.vision(torch.from_numpy(batch).to(dev.torch_device))
            layer_tokens, patch_embeds, image_embeds = (t.contiguous() for t in tensors)
            return Features(dev.from_torch(layer_tokens.half()), dev.from_torch(patch_embeds.half()),
                            dev.from_torch(image_embeds.float()), backbone.grid)

        def encode_text(self, prompts):
            return backbone.encode_text(prompts)

    start = time.perf_counter()
    scorer = LotScorer(DeviceBackbone(), images, "washer", batch_size=args.batch_size, progress=False, xp=dev.xp)
    dev.sync()
    encoded = time.perf_counter() - start
    report = scorer.score(PAClipConfig())
    dev.sync()
    total = time.perf_counter() - start
    return [{"row": f"end to end: {args.model}@{args.image_size} FP16 + scoring, {args.images} images",
             "encode_s": encoded, "total_s": total, "images_per_s": args.images / total,
             "finite": bool(np.isfinite(report.maps).all())}]


def write_json(path, rows, dev):
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"rows": rows, "peak_gpu_gb": dev.peak_memory_gb()}, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200, help="lot size")
    p.add_argument("--query-images", type=int, default=16, help="query images of the kNN kernel row")
    p.add_argument("--tokens", type=int, default=1369)
    p.add_argument("--channels", type=int, default=1024)
    p.add_argument("--map-size", type=int, default=518)
    p.add_argument("--model", default="ViT-L-14-336")
    p.add_argument("--image-size", type=int, default=518)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--skip", nargs="*", default=[], choices=["kernels", "lot", "banks", "end-to-end"])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the script, measures nothing")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.dry_run:
        args.images, args.query_images, args.tokens, args.channels = 6, 2, 16, 32
        args.map_size, args.model, args.image_size, args.batch_size = 28, "tiny", 56, 4
    dev = Device(args.dry_run)
    rng = np.random.default_rng(0)
    rows = []
    for name, fn in (("kernels", lambda: kernel_rows(dev, args, rng)), ("lot", lambda: lot_rows(dev, args)),
                     ("banks", lambda: bank_rows(dev, args)), ("end-to-end", lambda: end_to_end_rows(dev, args))):
        if name in args.skip:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows += guarded(name, fn)
        write_json(args.json, rows, dev)  # after every section: a check cut off later keeps these figures
    peak = dev.peak_memory_gb()
    print(f"\n{'dry run on the CPU' if args.dry_run else 'GPU'}: {args.images}-image lot, L={args.tokens}, "
          f"C={args.channels}")
    for r in rows:
        if "error" in r:
            print(f"- {r['row']}: FAILED: {r['error']}")
            continue
        cells = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items() if k != "row")
        print(f"- {r['row']}: {cells}")
    print(f"peak GPU memory: {peak:.1f} GB")
    for r in rows:
        if "speedup" in r:
            print(f"whole-lot scoring, torch cdist / ours: x{r['speedup']:.1f}")
        if r["row"] == "kNN full bank (fused)" and "tflops" in r:
            of_matmul = r.get("of_torch_fp16_matmul")
            print(f"fused kNN: {r['tflops']:.1f} TFLOP/s = {100 * r['of_peak']:.0f}% of the dense FP16 peak"
                  + (f", {100 * of_matmul:.0f}% of torch's FP16 matmul here" if of_matmul else ""))
        if "images_per_s" in r:
            print(f"end to end: {r['images_per_s']:.1f} images/s")
        if "faster_than_first" in r:
            print(f"{r['row'].split(':')[0]}: {r['ms_per_new_image']:.2f} ms per new image, {r['bank_gb']:.2f} GB, "
                  f"x{r['faster_than_first']:.1f} the first bank's speed")
    by_name = {r["row"]: r for r in rows if "ms" in r}
    for name, r in by_name.items():
        generic = by_name.get(name.replace("(fused)", "(generic)"))
        if name.endswith("(fused)") and generic:
            print(f"{name.removesuffix(' (fused)')}: generic / fused x{generic['ms'] / r['ms']:.1f}")
    write_json(args.json, rows, dev)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
