"""The fused CUDA kernels of ``postprocess/cuda/*.cu`` behind the array kernels' signatures.

``postprocess.kernels`` calls these when its inputs are CuPy arrays (the NumPy code there stays their reference).
Every wrapper takes its array module from its inputs and its compiled kernels from ``compiled`` (CuPy's by default),
so the code that sizes grids, blocks and chunks is the same code whichever runs the kernels: on a GPU, CuPy; in the
tests, the same ``.cu`` files compiled for the CPU (``tests/cuda_cpu``), with NumPy arrays.
``PA_CLIP_FUSED_KERNELS=0`` turns them off (the same scoring then runs through CuPy's generic kernels), which is
how ``benchmarks/gpu.py`` measures what fusion buys.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np

from .kernels import get_xp, half_budget

SOURCE_DIR = Path(__file__).resolve().parent / "cuda"
# Every kernel of every source, by name: what either compiler must provide.
KERNELS = {
    "knn.cu": ("knn_image_min_f32_f32", "knn_image_min_f32_f16", "knn_image_min_f16_f16", "interval_topk_mean"),
    "coreset.cu": ("coreset_step",),
    "maps.cu": ("box_mean", "subtract_and_fuse", "upsample_bilinear"),
}
SOURCES = tuple(KERNELS)
# The facts the kernels and this module share, defined here only: passed as -D to every compiler of the sources
# (NVRTC, nvcc, the CPU harness's C++ compiler), used below to size launches.
COMPILE_DEFINES = {
    "TILE": 16,  # WMMA tile edge (16x16x16)
    "KNN_WARPS": 4,  # warps per kNN block: a block covers TILE * KNN_WARPS query rows of one bank image
    "MAX_K": 64,  # largest interval k (the top-k kernel keeps k values per thread in registers)
    "CORESET_THREADS": 256,  # threads per coreset block (one block per group)
}
TILE = COMPILE_DEFINES["TILE"]
KNN_WARPS = COMPILE_DEFINES["KNN_WARPS"]
MAX_K = COMPILE_DEFINES["MAX_K"]
CORESET_THREADS = COMPILE_DEFINES["CORESET_THREADS"]
ELEMENTWISE_THREADS = 256  # one thread per output element: top-k rows, pooling, fusion, upsampling
MAX_GRID_Y = 65535  # CUDA's limit on a grid's y (and z) dimension

# compiled(source, name) -> a launchable kernel: kernel(grid, block, args, shared_mem=0), CuPy's RawKernel call.
Compiled = Callable[[str, str], Callable]


def enabled() -> bool:
    return os.environ.get("PA_CLIP_FUSED_KERNELS", "1") != "0"


def compile_options() -> tuple[str, ...]:
    return tuple(f"-D{name}={value}" for name, value in COMPILE_DEFINES.items())


def _include_options() -> tuple[str, ...]:
    """The CUDA toolkit's headers for NVRTC (mma.h and the crt/mma.h it includes: the runtime wheels' include
    folders have the first without the second)."""
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and all((Path(root) / "include" / name).is_file() for name in ("mma.h", "crt/mma.h")):
            return (f"-I{Path(root) / 'include'}",)
    return ()


def nvrtc_options() -> tuple[str, ...]:
    """What ``cupy_kernel`` compiles every source with first (NVRTC; tests compile the sources with these too)."""
    return ("-std=c++17", *compile_options(), *_include_options())


@functools.lru_cache(maxsize=None)
def cupy_kernel(source: str, name: str):
    """A kernel compiled by NVRTC, or by nvcc where NVRTC lacks a header (mma.h)."""
    import cupy

    if name not in KERNELS[source]:
        raise KeyError(f"{source} has no kernel {name!r} (cuda_kernels.KERNELS)")
    code = (SOURCE_DIR / source).read_text()
    options = nvrtc_options()
    try:
        return cupy.RawModule(code=code, options=options).get_function(name)
    except cupy.cuda.compiler.CompileException:
        return cupy.RawModule(code=code, options=options, backend="nvcc").get_function(name)


def _blocks(count: int, per_block: int) -> int:
    return max(1, math.ceil(count / per_block))


def fused_rows_per_pass(budget_bytes: int, n_bank: int) -> int:
    """Bounds a pass of the fused kNN: its block of per-image minima (rows x bank images, float32) within half the
    budget, and at least the rows of one kNN block (TILE * KNN_WARPS)."""
    return max(TILE * KNN_WARPS, half_budget(budget_bytes) // (4 * n_bank))


def full_bank_scores(queries, bank, query_ids, bank_ids, k: int, budget_bytes: int,
                     compiled: Compiled = cupy_kernel):
    """``kernels.full_bank_scores`` fused: WMMA tiles with the per-image maximum, then the interval top-k.
    Queries and bank are read in place (float32 or float16; the kernel converts while staging its tiles): the only
    intermediate is a block of per-image minima (rows x bank images, float32) within half the budget."""
    xp = get_xp(queries)
    n_query, length, channels = queries.shape
    n_bank, per_image, _ = bank.shape
    if queries.dtype not in (xp.float32, xp.float16) or bank.dtype not in (xp.float32, xp.float16):
        raise TypeError(f"fused kNN takes float32/float16, got {queries.dtype} and {bank.dtype}")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"fused kNN takes an interval k from 1 to {MAX_K}, got {k}")
    flat_queries = xp.ascontiguousarray(queries).reshape(n_query * length, channels)
    flat_bank = xp.ascontiguousarray(bank).reshape(n_bank * per_image, channels)
    if flat_queries.dtype == xp.float16 and flat_bank.dtype == xp.float32:
        flat_queries = flat_queries.astype(xp.float32)  # one instantiation fewer: this pairing never happens
    name = {("float32", "float32"): "knn_image_min_f32_f32", ("float32", "float16"): "knn_image_min_f32_f16",
            ("float16", "float16"): "knn_image_min_f16_f16"}[(flat_queries.dtype.name, flat_bank.dtype.name)]
    knn = compiled("knn.cu", name)
    topk = compiled("knn.cu", "interval_topk_mean")
    total = n_query * length
    row_ids = xp.ascontiguousarray(xp.repeat(query_ids.astype(xp.int64), length))
    image_ids = xp.ascontiguousarray(bank_ids.astype(xp.int64))
    out = xp.empty(total, dtype=xp.float32)
    rows_per_block = TILE * KNN_WARPS
    rows = fused_rows_per_pass(budget_bytes, n_bank)
    for r0 in range(0, total, rows):
        count = min(total, r0 + rows) - r0
        minima = xp.empty((count, n_bank), dtype=xp.float32)
        for image0 in range(0, n_bank, MAX_GRID_Y):  # bank images on the grid's y, which holds at most 65535
            knn((_blocks(count, rows_per_block), min(MAX_GRID_Y, n_bank - image0)), (32 * KNN_WARPS,),
                (flat_queries[r0:r0 + count], flat_bank, minima, np.int32(count), np.int32(channels),
                 np.int32(n_bank), np.int32(per_image), np.int32(image0)))
        topk((_blocks(count, ELEMENTWISE_THREADS),), (ELEMENTWISE_THREADS,),
             (minima, row_ids[r0:r0 + count], image_ids, out[r0:r0 + count], np.int32(count), np.int32(n_bank),
              np.int32(k)))
    return out.reshape(n_query, length)


def coreset_step(points, sq_norm, min_dist, centre, compiled: Compiled = cupy_kernel):
    """Fold ``centre`` (G,) into ``min_dist`` (G, P) float32, in place, and return the next centres (G,) int64 (the
    farthest points). ``points`` (G, P, d) and ``sq_norm`` (G, P) float32."""
    xp = get_xp(points)
    groups, n_points, dim = points.shape
    if not min_dist.flags.c_contiguous or min_dist.dtype != xp.float32:
        raise TypeError("coreset_step updates min_dist in place: it must be C-contiguous float32")
    nxt = xp.empty(groups, dtype=xp.int64)
    compiled("coreset.cu", "coreset_step")(
        (groups,), (CORESET_THREADS,),
        (xp.ascontiguousarray(points), xp.ascontiguousarray(sq_norm), min_dist,
         xp.ascontiguousarray(centre.astype(xp.int64)), nxt, np.int32(n_points), np.int32(dim)))
    return nxt


def box_mean(grid_features, r: int, compiled: Compiled = cupy_kernel):
    """``kernels.box_mean`` of (N, h, w, C) features, float32 out."""
    xp = get_xp(grid_features)
    x = xp.ascontiguousarray(grid_features.astype(xp.float32))
    n, h, w, c = x.shape
    out = xp.empty_like(x)
    compiled("maps.cu", "box_mean")((_blocks(x.size, ELEMENTWISE_THREADS),), (ELEMENTWISE_THREADS,),
                                    (x, out, np.int32(n), np.int32(h), np.int32(w), np.int32(c), np.int32(r // 2)))
    return out


def subtract_and_fuse(full: list, normal: list, taus: list, weights, alpha: float,
                      compiled: Compiled = cupy_kernel):
    """``kernels.subtract_and_fuse``: Eq. 7 at every scale and Eq. 8 over them in one pass."""
    xp = get_xp(full[0])
    shape = full[0].shape
    stacked_full = xp.ascontiguousarray(xp.stack(full).astype(xp.float32))
    stacked_normal = xp.ascontiguousarray(xp.stack(normal).astype(xp.float32))
    out = xp.empty(shape, dtype=xp.float32)
    size = int(np.prod(shape))
    compiled("maps.cu", "subtract_and_fuse")(
        (_blocks(size, ELEMENTWISE_THREADS),), (ELEMENTWISE_THREADS,),
        (stacked_full, stacked_normal, xp.asarray(taus, dtype=xp.float32), xp.asarray(weights, dtype=xp.float32),
         out, np.float32(alpha), np.int32(len(full)), np.int64(size)))
    return out


def upsample_bilinear(grid_scores, size: tuple[int, int], compiled: Compiled = cupy_kernel):
    """(N, h, w) -> (N, H, W), half-pixel centres (``kernels.patch_scores_to_maps`` without smoothing)."""
    xp = get_xp(grid_scores)
    x = xp.ascontiguousarray(grid_scores.astype(xp.float32))
    n, h, w = x.shape
    out = xp.empty((n, *size), dtype=xp.float32)
    compiled("maps.cu", "upsample_bilinear")((_blocks(out.size, ELEMENTWISE_THREADS),), (ELEMENTWISE_THREADS,),
                                             (x, out, np.int32(n), np.int32(h), np.int32(w), np.int32(size[0]),
                                              np.int32(size[1])))
    return out
