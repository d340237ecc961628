"""The fused CUDA kernels (postprocess/cuda/*.cu): every source compiles with nvcc for H100/H200 (sm_90) and Jetson
Orin (sm_87) on any machine with nvcc; on a GPU each kernel is held to its NumPy reference in postprocess.kernels."""

import shutil
import subprocess

import numpy as np
import pytest

from postprocess import cuda_kernels
from postprocess import kernels as K

NVCC = shutil.which("nvcc")
try:
    import cupy

    cupy.zeros(1)
except Exception:  # no CuPy, no driver or no GPU
    cupy = None
needs_gpu = pytest.mark.skipif(cupy is None, reason="CuPy with a CUDA GPU is not available here")


@pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA compiler) is not installed here")
@pytest.mark.parametrize("arch", ["sm_90", "sm_87"])
@pytest.mark.parametrize("source", cuda_kernels.SOURCES)
def test_every_cuda_source_compiles(source, arch, tmp_path):
    assert sorted(p.name for p in cuda_kernels.SOURCE_DIR.glob("*.cu")) == sorted(cuda_kernels.SOURCES)
    proc = subprocess.run([NVCC, f"-arch={arch}", "-cubin", "-Werror", "all-warnings", "-o",
                           str(tmp_path / "out.cubin"), str(cuda_kernels.SOURCE_DIR / source)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.cubin").stat().st_size > 0


def unit_rows(rng, *shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@needs_gpu
def test_fused_knn_matches_numpy_with_padding_and_chunks():
    rng = np.random.default_rng(0)
    queries = unit_rows(rng, 5, 37, 40)  # 37 patches and 40 channels: neither a multiple of the 16-wide tiles
    bank = unit_rows(rng, 9, 37, 40).astype(np.float16)
    qids, bids = np.array([0, 1, 2, -1, 4]), np.arange(9)
    expected = K.full_bank_scores(queries, bank, qids, bids, 3, 1 << 30)
    for budget in (1 << 12, 1 << 30):  # a tiny budget forces many row blocks
        got = cuda_kernels.full_bank_scores(cupy.asarray(queries), cupy.asarray(bank), cupy.asarray(qids),
                                            cupy.asarray(bids), 3, budget)
        np.testing.assert_allclose(cupy.asnumpy(got), expected, atol=2e-3)


@needs_gpu
def test_fused_coreset_picks_the_numpy_points():
    rng = np.random.default_rng(1)
    points = rng.standard_normal((3, 200, 16)).astype(np.float32)
    expected = K.greedy_coreset(points, 20)
    got = K.greedy_coreset(cupy.asarray(points), 20)  # the fused step on CuPy
    np.testing.assert_array_equal(cupy.asnumpy(got), expected)


@needs_gpu
def test_fused_pooling_subtraction_fusion_and_upsampling_match_numpy():
    rng = np.random.default_rng(2)
    grid = rng.standard_normal((2, 7, 9, 5)).astype(np.float32)
    for r in (3, 5):
        np.testing.assert_allclose(cupy.asnumpy(cuda_kernels.box_mean(cupy.asarray(grid), r)), K.box_mean(grid, r),
                                   atol=1e-5)
    full = [rng.random((4, 63)).astype(np.float32) for _ in range(3)]
    normal = [rng.random((4, 63)).astype(np.float32) for _ in range(3)]
    taus, weights = [0.3, 0.5, 0.9], [0.5, 0.3, 0.2]
    expected = sum(w * K.adaptive_subtraction(c, b, 0.2, t) for c, b, t, w in zip(full, normal, taus, weights))
    got = cuda_kernels.subtract_and_fuse([cupy.asarray(a) for a in full], [cupy.asarray(a) for a in normal], taus,
                                         weights, 0.2)
    np.testing.assert_allclose(cupy.asnumpy(got), expected, atol=1e-6)
    scores = rng.random((3, 7 * 9)).astype(np.float32)
    np.testing.assert_allclose(cupy.asnumpy(cuda_kernels.upsample_bilinear(cupy.asarray(scores).reshape(3, 7, 9),
                                                                           (50, 61))),
                               K.patch_scores_to_maps(scores, (7, 9), (50, 61), 0.0), atol=1e-5)


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
