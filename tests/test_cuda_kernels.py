"""The fused CUDA kernels (postprocess/cuda/*.cu), held to their NumPy references in postprocess.kernels.

Every case runs through the wrappers of postprocess/cuda_kernels.py, which size every launch, with the kernels
executed by:
- ``cpu-forward``, ``cpu-reverse``, ``cpu-concurrent``: the unchanged sources compiled for the CPU with
  tests/cuda_cpu/cuda_cpu.h, a block's threads as real threads under three schedules (a missing barrier changes
  the result under one of the serial ones);
- ``gpu``: CuPy on a CUDA GPU (skipped without one; benchmarks/gpu_check.sh runs these first on a lent device).
tests/test_cuda_cpu.py runs this module again under AddressSanitizer + UBSan and under ThreadSanitizer, and with
planted faults. Environment (set by those runs): PA_CLIP_CUDA_CPU_ORDERS (comma list), PA_CLIP_CUDA_CPU_SANITIZER,
PA_CLIP_CUDA_CPU_SOURCES (a folder of .cu files to build instead of postprocess/cuda).
"""

import os
import shutil
import subprocess

import numpy as np
import pytest

from cuda_cpu import harness
from postprocess import cuda_kernels
from postprocess import kernels as K

NVCC = shutil.which("nvcc")
try:
    import cupy

    cupy.zeros(1)
except Exception:  # no CuPy, no driver or no GPU
    cupy = None
needs_gpu = pytest.mark.skipif(cupy is None, reason="CuPy with a CUDA GPU is not available here")

ORDERS = [o for o in os.environ.get("PA_CLIP_CUDA_CPU_ORDERS", "forward,reverse,concurrent").split(",") if o]
SANITIZER = os.environ.get("PA_CLIP_CUDA_CPU_SANITIZER", "")
SOURCE_DIR = os.environ.get("PA_CLIP_CUDA_CPU_SOURCES") or None
CPU_KERNELS = {order: harness.CpuKernels(order, SANITIZER, SOURCE_DIR) for order in ORDERS}

# The tolerances of the GPU tests: the kNN stages its tiles in float16 (inputs rounded to 11 bits); the map kernels
# are float32 with another summation order than the matrix products of the NumPy path.
KNN_ATOL, MAP_ATOL, FUSE_ATOL = 2e-3, 1e-5, 1e-6


class Runner:
    def __init__(self, name):
        self.name = name
        if name == "gpu":
            self.xp, self.compiled = cupy, cuda_kernels.cupy_kernel
        else:
            self.xp, self.compiled = np, CPU_KERNELS[name.removeprefix("cpu-")]
            self.compiled.build_all()  # every source at once on a fresh clone; then only cache lookups

    def put(self, array):
        return self.xp.asarray(array)

    @staticmethod
    def get(array):
        return K.to_numpy(array)


RUNNERS = [pytest.param(f"cpu-{o}", marks=pytest.mark.skipif(not harness.compiler_available(),
                                                             reason=f"no C++ compiler ({harness.CXX}) here"))
           for o in ORDERS] + [pytest.param("gpu", marks=needs_gpu)]


@pytest.fixture(params=RUNNERS)
def runner(request):
    return Runner(request.param)


def unit_rows(rng, *shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --- kNN: WMMA tiles + per-image maximum (knn_image_min_*), then the interval top-k (interval_topk_mean) ---------
# (queries, length, channels, bank images, entries per image, query dtype, bank dtype, query ids, k)
KNN_CASES = {
    # 37 patches and 40 channels: neither a multiple of the 16-wide tiles; 185 rows: not a multiple of a block's 64
    "tails-f32-f16": (5, 37, 40, 9, 37, np.float32, np.float16, "own", 3),
    "f32-f32": (3, 20, 24, 6, 20, np.float32, np.float32, "own", 2),
    "f16-f16-new-images": (3, 20, 24, 6, 20, np.float16, np.float16, "new", 5),
    # 70 entries per image: two passes of 4 entry tiles; 16 channels: exactly one tile
    "two-entry-passes": (2, 70, 16, 4, 70, np.float32, np.float16, "own", 2),
    # fewer entries per image than a tile; a query length other than the bank's
    "short-bank-images": (3, 10, 33, 7, 5, np.float32, np.float16, "new", 4),
    "one-image": (1, 9, 8, 1, 9, np.float32, np.float16, "new", 1),
    "own-image-only": (1, 9, 8, 1, 9, np.float32, np.float16, "own", 1),  # nothing left: inf, as NumPy says
    "k-at-its-limit": (2, 6, 8, cuda_kernels.MAX_K + 2, 6, np.float32, np.float16, "own", cuda_kernels.MAX_K),
}


def knn_inputs(case, seed=0):
    n_query, length, channels, n_bank, per_image, q_dtype, b_dtype, ids, k = KNN_CASES[case]
    rng = np.random.default_rng(seed)
    queries = unit_rows(rng, n_query, length, channels).astype(q_dtype)
    bank = unit_rows(rng, n_bank, per_image, channels).astype(b_dtype)
    bank_ids = np.arange(n_bank)
    # "own": query i is bank image i (left out of its own neighbours), the last query a new image (-1)
    query_ids = np.arange(n_query) if ids == "own" else np.full(n_query, -1)
    if ids == "own" and n_query > 1:
        query_ids[-1] = -1
    return queries, bank, query_ids, bank_ids, k


@pytest.mark.parametrize("case", KNN_CASES)
def test_fused_knn_matches_numpy(runner, case):
    queries, bank, query_ids, bank_ids, k = knn_inputs(case)
    expected = K.full_bank_scores(queries.astype(np.float32), bank.astype(np.float32), query_ids, bank_ids, k,
                                  1 << 30)
    got = cuda_kernels.full_bank_scores(runner.put(queries), runner.put(bank), runner.put(query_ids),
                                        runner.put(bank_ids), k, 1 << 30, compiled=runner.compiled)
    np.testing.assert_allclose(runner.get(got), expected, atol=KNN_ATOL)


def test_fused_knn_in_many_row_blocks_matches_numpy(runner):
    """A budget so small that the rows go in blocks of 64 (the least): every launch covers a part of the rows."""
    queries, bank, query_ids, bank_ids, k = knn_inputs("tails-f32-f16", seed=1)
    expected = K.full_bank_scores(queries, bank.astype(np.float32), query_ids, bank_ids, k, 1 << 30)
    got = cuda_kernels.full_bank_scores(runner.put(queries), runner.put(bank), runner.put(query_ids),
                                        runner.put(bank_ids), k, 1 << 10, compiled=runner.compiled)
    np.testing.assert_allclose(runner.get(got), expected, atol=KNN_ATOL)


def test_fused_knn_over_more_bank_images_than_a_grid_holds_matches_numpy(runner, monkeypatch):
    """A grid's y holds at most 65535 bank images: more are launched in slices (here of 4, so that 9 images take
    three launches, the last one short)."""
    monkeypatch.setattr(cuda_kernels, "MAX_GRID_Y", 4)
    queries, bank, query_ids, bank_ids, k = knn_inputs("tails-f32-f16", seed=2)
    expected = K.full_bank_scores(queries, bank.astype(np.float32), query_ids, bank_ids, k, 1 << 30)
    got = cuda_kernels.full_bank_scores(runner.put(queries), runner.put(bank), runner.put(query_ids),
                                        runner.put(bank_ids), k, 1 << 30, compiled=runner.compiled)
    np.testing.assert_allclose(runner.get(got), expected, atol=KNN_ATOL)


def test_fused_knn_refuses_a_k_its_kernel_cannot_hold():
    queries, bank, query_ids, bank_ids, _ = knn_inputs("k-at-its-limit")
    for k in (0, cuda_kernels.MAX_K + 1):
        with pytest.raises(ValueError, match=f"from 1 to {cuda_kernels.MAX_K}"):
            cuda_kernels.full_bank_scores(queries, bank, query_ids, bank_ids, k, 1 << 30, compiled=None)


# --- coreset: one fused step (fold the newest centre in, pick the farthest point) -------------------------------
# (groups, points, dims): a tail below a block, exactly a block, over two blocks, one point
CORESET_CASES = {"tail": (3, 200, 16), "one-block": (1, cuda_kernels.CORESET_THREADS, 5),
                 "three-passes": (2, 2 * cuda_kernels.CORESET_THREADS + 1, 3), "one-point": (2, 1, 4)}


@pytest.mark.parametrize("case", CORESET_CASES)
def test_fused_coreset_steps_match_numpy(runner, case):
    groups, n_points, dim = CORESET_CASES[case]
    rng = np.random.default_rng(2)
    points = rng.standard_normal((groups, n_points, dim)).astype(np.float32)
    sq_norm = (points * points).sum(axis=-1)
    rows = np.arange(groups)

    def sq_dist_to(idx):
        centre = points[rows, idx]
        return np.maximum(sq_norm - 2.0 * np.einsum("gpd,gd->gp", points, centre) + sq_norm[rows, idx][:, None], 0)

    min_dist = rng.random((groups, n_points)).astype(np.float32) * 40  # some points already near the chosen set
    device_min_dist = runner.put(min_dist)
    centre = np.zeros(groups, dtype=np.int64)
    for _ in range(4):
        nxt = cuda_kernels.coreset_step(runner.put(points), runner.put(sq_norm), device_min_dist,
                                        runner.put(centre), compiled=runner.compiled)
        min_dist = np.minimum(min_dist, sq_dist_to(centre))
        min_dist[rows, centre] = K.CHOSEN
        np.testing.assert_allclose(runner.get(device_min_dist), min_dist, rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(runner.get(nxt), min_dist.argmax(axis=1))
        centre = min_dist.argmax(axis=1)


def fused_coreset(runner, points, n_select):
    """kernels.greedy_coreset's selection with its loop driven by the fused step (the start as NumPy picks it)."""
    groups = points.shape[0]
    sq_norm = (points * points).sum(axis=-1)
    rows = np.arange(groups)
    start = K.greedy_coreset(points, 1)[:, 0]
    min_dist = np.maximum(sq_norm - 2.0 * np.einsum("gpd,gd->gp", points, points[rows, start])
                          + sq_norm[rows, start][:, None], 0).astype(np.float32)
    min_dist[rows, start] = K.CHOSEN
    device_min_dist, device_points, device_sq = runner.put(min_dist), runner.put(points), runner.put(sq_norm)
    selected = [start, min_dist.argmax(axis=1)]
    for _ in range(n_select - 2):
        selected.append(runner.get(cuda_kernels.coreset_step(device_points, device_sq, device_min_dist,
                                                             runner.put(selected[-1]), compiled=runner.compiled)))
    return np.stack(selected, axis=1)


def test_fused_coreset_picks_the_numpy_points(runner):
    """The whole greedy selection of kernels.greedy_coreset, its loop driven by the fused step."""
    points = np.random.default_rng(1).standard_normal((3, 200, 16)).astype(np.float32)
    np.testing.assert_array_equal(fused_coreset(runner, points, 20), K.greedy_coreset(points, 20))


def test_fused_coreset_never_picks_a_point_twice(runner):
    """Fewer distinct points than picks (identical frames): every pick a different index, as kernels.greedy_coreset
    makes them."""
    points = np.repeat(np.eye(3, 4, dtype=np.float32)[None], 4, axis=1)  # 12 points, 3 distinct
    expected = K.greedy_coreset(points, 8)
    assert len(set(expected[0].tolist())) == 8
    np.testing.assert_array_equal(fused_coreset(runner, points, 8), expected)


# --- maps: pooling, subtraction + fusion, upsampling --------------------------------------------------------------
@pytest.mark.parametrize("shape,r,dtype", [((2, 7, 9, 5), 3, np.float32), ((2, 7, 9, 5), 5, np.float32),
                                           ((1, 2, 3, 4), 5, np.float32),  # the window wider than the grid
                                           ((1, 4, 6, 3), 3, np.float16)])
def test_fused_pooling_matches_numpy(runner, shape, r, dtype):
    grid = np.random.default_rng(3).standard_normal(shape).astype(dtype)
    got = cuda_kernels.box_mean(runner.put(grid), r, compiled=runner.compiled)
    np.testing.assert_allclose(runner.get(got), K.box_mean(grid.astype(np.float32), r), atol=MAP_ATOL)


@pytest.mark.parametrize("shape,scales", [((4, 63), 3), ((1, 1), 1), ((2, 5, 7), 2)])
def test_fused_subtraction_and_fusion_match_numpy(runner, shape, scales):
    rng = np.random.default_rng(4)
    full = [rng.random(shape).astype(np.float32) for _ in range(scales)]
    normal = [rng.random(shape).astype(np.float32) for _ in range(scales)]
    taus = [float(n.flat[0]) for n in normal]  # one value at each scale sits exactly on its threshold (kept)
    weights = list(rng.random(scales))
    expected = K.subtract_and_fuse(full, normal, taus, weights, 0.2)
    got = cuda_kernels.subtract_and_fuse([runner.put(a) for a in full], [runner.put(a) for a in normal], taus,
                                         weights, 0.2, compiled=runner.compiled)
    np.testing.assert_allclose(runner.get(got), expected, atol=FUSE_ATOL)


@pytest.mark.parametrize("grid,size", [((3, 7, 9), (50, 61)), ((1, 1, 1), (4, 5)), ((2, 7, 9), (3, 4))])
def test_fused_upsampling_matches_numpy(runner, grid, size):
    scores = np.random.default_rng(5).random(grid).astype(np.float32)
    got = cuda_kernels.upsample_bilinear(runner.put(scores), size, compiled=runner.compiled)
    expected = K.patch_scores_to_maps(scores.reshape(grid[0], -1), grid[1:], size, 0.0)
    np.testing.assert_allclose(runner.get(got), expected, atol=MAP_ATOL)


def test_every_kernel_ran_on_the_cpu():
    """Last in this module: each kernel that cuda_kernels.KERNELS names was launched under every schedule above."""
    launched = {order: {key for key, kernel in kernels.kernels.items() if kernel.launches}
                for order, kernels in CPU_KERNELS.items()}
    if not any(launched.values()):
        pytest.skip("no CPU case ran in this session (selected out)")
    wanted = {(source, name) for source, names in cuda_kernels.KERNELS.items() for name in names}
    for order, ran in launched.items():
        assert ran == wanted, f"{order}: never launched {sorted(wanted - ran)}"


# --- NVRTC, CuPy's compiler: no GPU needed to compile, only its library and the toolkit's headers ----------------
def _nvrtc():
    try:
        from cuda.bindings import nvrtc
        nvrtc.nvrtcVersion()
    except Exception as err:  # not installed, or its library not found
        pytest.skip(f"NVRTC (cuda-bindings' nvrtc, the library CuPy compiles with) is not usable here: {err}")
    if not any(o.startswith("-I") for o in cuda_kernels.nvrtc_options()):
        pytest.skip("the CUDA toolkit's headers (include/mma.h, include/crt/mma.h) are not installed here")
    return nvrtc


@pytest.mark.parametrize("arch", ["compute_90", "compute_87"])
@pytest.mark.parametrize("source", cuda_kernels.SOURCES)
def test_every_cuda_source_compiles_with_nvrtc(source, arch):
    """What cupy_kernel tries first on a GPU (an image without nvcc has only this): knn.cu used INFINITY, which NVRTC
    does not define (no math headers), and failed here while the CPU harness and nvcc, which have them, compiled it."""
    nvrtc = _nvrtc()
    code = (cuda_kernels.SOURCE_DIR / source).read_bytes()
    err, program = nvrtc.nvrtcCreateProgram(code, source.encode(), 0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, err
    try:
        options = [o.encode() for o in (*cuda_kernels.nvrtc_options(), f"-arch={arch}")]
        (err,) = nvrtc.nvrtcCompileProgram(program, len(options), options)
        # writable buffers: NVRTC writes into them (into b" " * 1, Python's one cached b" ", it wrote a NUL, and
        # every later b" " in this process, pickle's and the tests' own, was b"\0")
        _, size = nvrtc.nvrtcGetProgramLogSize(program)
        log = bytearray(size)
        nvrtc.nvrtcGetProgramLog(program, log)
        assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, log.decode(errors="replace")
        _, ptx_size = nvrtc.nvrtcGetPTXSize(program)
        ptx = bytearray(ptx_size)
        nvrtc.nvrtcGetPTX(program, ptx)
        assert b" " == bytes([32])
        for name in cuda_kernels.KERNELS[source]:  # extern "C": each kernel under its own name
            assert f".entry {name}(".encode() in ptx, name
    finally:
        nvrtc.nvrtcDestroyProgram(program)


# --- nvcc and the GPU only -----------------------------------------------------------------------------------------
@pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA compiler) is not installed here")
@pytest.mark.parametrize("arch", ["sm_90", "sm_87"])
@pytest.mark.parametrize("source", cuda_kernels.SOURCES)
def test_every_cuda_source_compiles(source, arch, tmp_path):
    """For H100/H200 (sm_90) and Jetson Orin (sm_87), with the definitions every compiler gets."""
    assert sorted(p.name for p in cuda_kernels.SOURCE_DIR.glob("*.cu")) == sorted(cuda_kernels.SOURCES)
    proc = subprocess.run([NVCC, f"-arch={arch}", "-cubin", "-Werror", "all-warnings",
                           *cuda_kernels.compile_options(), "-o", str(tmp_path / "out.cubin"),
                           str(cuda_kernels.SOURCE_DIR / source)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.cubin").stat().st_size > 0


@pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA compiler) is not installed here")
def test_a_source_without_the_shared_definitions_does_not_compile(tmp_path):
    """The constants live in cuda_kernels.COMPILE_DEFINES only: a compile without them stops, it does not guess."""
    proc = subprocess.run([NVCC, "-arch=sm_90", "-cubin", "-o", str(tmp_path / "out.cubin"),
                           str(cuda_kernels.SOURCE_DIR / "knn.cu")], capture_output=True, text=True)
    assert proc.returncode != 0 and "COMPILE_DEFINES" in proc.stderr


@needs_gpu
def test_fused_knn_stays_within_the_memory_budget_for_a_500_image_lot():
    """The CuPy memory pool sees every allocation: a hook keeps the high-water mark of what is in use."""

    class Peak(cupy.cuda.MemoryHook):
        name = "peak"

        def __init__(self):
            self.in_use = self.peak = 0

        def malloc_postprocess(self, device_id, size, mem_size, mem_ptr, pmem_id):
            self.in_use += mem_size
            self.peak = max(self.peak, self.in_use)

        def free_postprocess(self, device_id, mem_size, mem_ptr, pmem_id):
            self.in_use -= mem_size

    rng = np.random.default_rng(3)
    feats = cupy.asarray(unit_rows(rng, 500, 16, 32))
    bank = feats.astype(cupy.float16)
    ids = cupy.arange(500)
    budget = 256 << 10
    with Peak() as hook:
        out = cuda_kernels.full_bank_scores(feats, bank, ids, ids, 30, budget)
    assert hook.peak - out.nbytes <= budget, hook.peak
    np.testing.assert_allclose(cupy.asnumpy(out), K.full_bank_scores(cupy.asnumpy(feats), cupy.asnumpy(bank),
                                                                      np.arange(500), np.arange(500), 30, 1 << 30),
                               atol=2e-3)
