"""The fused CUDA kernels of ``postprocess/cuda/*.cu`` behind the array kernels' signatures, for CuPy arrays.

``postprocess.kernels`` calls these when its inputs are CuPy arrays (the NumPy code there stays their reference;
``tests/test_cuda_kernels.py`` holds each to it on a GPU and compiles every source with nvcc on any machine).
``PA_CLIP_FUSED_KERNELS=0`` turns them off (the same scoring then runs through CuPy's generic kernels), which is
how ``benchmarks/gpu.py`` measures what fusion buys.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np

SOURCE_DIR = Path(__file__).resolve().parent / "cuda"
SOURCES = ("knn.cu", "coreset.cu", "maps.cu")
KNN_WARPS = 4  # as in knn.cu
MAX_K = 64  # as in knn.cu
TILE = 16  # WMMA tile edge


def enabled() -> bool:
    return os.environ.get("PA_CLIP_FUSED_KERNELS", "1") != "0"


def _include_options() -> tuple[str, ...]:
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "mma.h").is_file():
            return (f"-I{Path(root) / 'include'}",)
    return ()


@functools.lru_cache(maxsize=None)
def _function(source: str, name: str):
    """A kernel compiled by NVRTC, or by nvcc where NVRTC lacks a header (mma.h)."""
    import cupy

    code = (SOURCE_DIR / source).read_text()
    options = ("-std=c++17", *_include_options())
    try:
        return cupy.RawModule(code=code, options=options).get_function(name)
    except cupy.cuda.compiler.CompileException:
        return cupy.RawModule(code=code, options=options, backend="nvcc").get_function(name)


def full_bank_scores(queries, bank, query_ids, bank_ids, k: int, budget_bytes: int):
    """``kernels.full_bank_scores`` on the GPU: WMMA tiles fused with the per-image maximum, then the interval
    top-k. Queries and bank are read in place (float32 or float16; the kernel converts while staging its tiles):
    the only intermediate is a block of per-image minima (rows x bank images, float32) within half the budget."""
    import cupy

    n_query, length, channels = queries.shape
    n_bank, per_image, _ = bank.shape
    if queries.dtype not in (cupy.float32, cupy.float16) or bank.dtype not in (cupy.float32, cupy.float16):
        raise TypeError(f"fused kNN takes float32/float16, got {queries.dtype} and {bank.dtype}")
    flat_queries = cupy.ascontiguousarray(queries).reshape(n_query * length, channels)
    flat_bank = cupy.ascontiguousarray(bank).reshape(n_bank * per_image, channels)
    if flat_queries.dtype == cupy.float16 and flat_bank.dtype == cupy.float32:
        flat_queries = flat_queries.astype(cupy.float32)  # one instantiation fewer: this pairing never happens
    name = {("float32", "float32"): "knn_image_min_f32_f32", ("float32", "float16"): "knn_image_min_f32_f16",
            ("float16", "float16"): "knn_image_min_f16_f16"}[(flat_queries.dtype.name, flat_bank.dtype.name)]
    knn = _function("knn.cu", name)
    topk = _function("knn.cu", "interval_topk_mean")
    total = n_query * length
    row_ids = cupy.ascontiguousarray(cupy.repeat(query_ids.astype(cupy.int64), length))
    image_ids = cupy.ascontiguousarray(bank_ids.astype(cupy.int64))
    out = cupy.empty(total, dtype=cupy.float32)
    rows = max(TILE * KNN_WARPS, (budget_bytes // 2) // (4 * n_bank))
    for r0 in range(0, total, rows):
        count = min(total, r0 + rows) - r0
        minima = cupy.empty((count, n_bank), dtype=cupy.float32)
        grid = (math.ceil(count / (TILE * KNN_WARPS)), n_bank)
        knn(grid, (32 * KNN_WARPS,), (flat_queries[r0:r0 + count], flat_bank, minima, np.int32(count),
                                     np.int32(channels), np.int32(n_bank), np.int32(per_image)))
        topk((math.ceil(count / 256),), (256,), (minima, row_ids[r0:r0 + count], image_ids, out[r0:r0 + count],
                                                 np.int32(count), np.int32(n_bank), np.int32(k)))
    return out.reshape(n_query, length)


def coreset_step(points, sq_norm, min_dist, centre):
    """Fold ``centre`` (G,) into ``min_dist`` (G, P) in place and return the next centres (G,) (farthest points)."""
    import cupy

    groups, n_points, dim = points.shape
    threads = 256
    nxt = cupy.empty(groups, dtype=cupy.int64)
    _function("coreset.cu", "coreset_step")(
        (groups,), (threads,),
        (cupy.ascontiguousarray(points), cupy.ascontiguousarray(sq_norm), min_dist,
         cupy.ascontiguousarray(centre.astype(cupy.int64)), nxt, np.int32(n_points), np.int32(dim)),
        shared_mem=threads * 8)
    return nxt


def box_mean(grid_features, r: int):
    """``kernels.box_mean`` of (N, h, w, C) float32 features."""
    import cupy

    x = cupy.ascontiguousarray(grid_features.astype(cupy.float32))
    n, h, w, c = x.shape
    out = cupy.empty_like(x)
    _function("maps.cu", "box_mean")((math.ceil(x.size / 256),), (256,),
                                     (x, out, np.int32(n), np.int32(h), np.int32(w), np.int32(c), np.int32(r // 2)))
    return out


def subtract_and_fuse(full: list, normal: list, taus: list, weights, alpha: float):
    """``kernels.subtract_and_fuse``: Eq. 7 at every scale and Eq. 8 over them in one pass."""
    import cupy

    shape = full[0].shape
    stacked_full = cupy.ascontiguousarray(cupy.stack(full).astype(cupy.float32))
    stacked_normal = cupy.ascontiguousarray(cupy.stack(normal).astype(cupy.float32))
    out = cupy.empty(shape, dtype=cupy.float32)
    size = int(np.prod(shape))
    _function("maps.cu", "subtract_and_fuse")(
        (math.ceil(size / 256),), (256,),
        (stacked_full, stacked_normal, cupy.asarray(taus, dtype=cupy.float32),
         cupy.asarray(weights, dtype=cupy.float32), out, np.float32(alpha), np.int32(len(full)), np.int64(size)))
    return out


def upsample_bilinear(grid_scores, size: tuple[int, int]):
    """(N, h, w) -> (N, H, W), half-pixel centres (``kernels.patch_scores_to_maps`` without smoothing)."""
    import cupy

    x = cupy.ascontiguousarray(grid_scores.astype(cupy.float32))
    n, h, w = x.shape
    out = cupy.empty((n, *size), dtype=cupy.float32)
    _function("maps.cu", "upsample_bilinear")((math.ceil(out.size / 256),), (256,),
                                              (x, out, np.int32(n), np.int32(h), np.int32(w), np.int32(size[0]),
                                               np.int32(size[1])))
    return out
