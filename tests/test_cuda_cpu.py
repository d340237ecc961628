"""The CPU execution of our CUDA kernels (tests/cuda_cpu) proves itself: it reports what a first GPU run would hit,
the kernels pass under AddressSanitizer + UBSan and ThreadSanitizer, and planted faults fail the kernel tests.

The sanitized runs and the planted faults run tests/test_cuda_kernels.py again in a child Python (a sanitizer's
runtime must be loaded first, and a fault may crash the process), with the kernels built from a folder of sources.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cuda_cpu import harness
from postprocess import cuda_kernels

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not harness.compiler_available(), reason=f"no C++ compiler ({harness.CXX}) here")

SELFTEST = {"selftest.cu": ("half_round_trip", "mirror", "split_barrier", "unguarded_write", "misaligned_load",
                            "widths")}
SANITIZER_EXIT = 86  # harness.sanitizer_environment: the exit status of a process a sanitizer stopped
SANITIZER_REPORTS = {"address": "ERROR: AddressSanitizer", "thread": "WARNING: ThreadSanitizer"}


def needs(sanitizer):
    return pytest.mark.skipif(bool(sanitizer) and not harness.sanitizer_available(sanitizer),
                              reason=f"the {sanitizer} sanitizer's runtime ({harness.RUNTIMES.get(sanitizer)}) is "
                                     f"not installed with {harness.CXX}")


def selftest(order="concurrent", sanitizer=""):
    return harness.CpuKernels(order, sanitizer, harness.HERE, kernels=SELFTEST)


def child_pytest(*args, sanitizer="", orders="concurrent", sources=None) -> subprocess.CompletedProcess:
    """pytest in a new Python with the sanitizer's runtime preloaded; output not captured per test (-s), so a
    sanitizer's report survives the process it stops."""
    env = harness.sanitizer_environment(sanitizer) if sanitizer else dict(os.environ)
    env["PA_CLIP_CUDA_CPU_ORDERS"] = orders
    if sources:
        env["PA_CLIP_CUDA_CPU_SOURCES"] = str(sources)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


# --- the harness reports what a GPU run would hit ----------------------------------------------------------------
def test_half_conversions_round_to_nearest_even_as_numpy_does():
    rng = np.random.default_rng(0)
    every_half = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    values = np.concatenate([every_half[np.isfinite(every_half)].astype(np.float32),
                             rng.standard_normal(20000).astype(np.float32) * 10.0 ** rng.integers(-9, 6, 20000),
                             np.float32([65504.0, 65520.0, 65519.99, 1e6, -1e6, 2.0 ** -25, 2.0 ** -24, 0.0])])
    values = values.astype(np.float32)
    bits, back = np.empty(values.size, np.uint16), np.empty(values.size, np.float32)
    selftest()("selftest.cu", "half_round_trip")((len(values) // 256 + 1,), (256,),
                                                  (values, bits, back, np.int32(values.size)))
    with np.errstate(over="ignore"):  # values past 65504 become inf on purpose
        expected = values.astype(np.float16)
    np.testing.assert_array_equal(bits, expected.view(np.uint16))
    np.testing.assert_array_equal(back, expected.astype(np.float32))


def test_a_missing_barrier_changes_the_result_under_a_serial_schedule():
    values = np.arange(128, dtype=np.float32)
    expected = values.reshape(2, 64)[:, ::-1].ravel()
    for order in ("forward", "reverse", "shuffled", "concurrent"):
        out = np.zeros(128, np.float32)
        selftest(order)("selftest.cu", "mirror")((2,), (64,), (values, out, np.int32(1)))
        np.testing.assert_array_equal(out, expected, err_msg=order)
    wrong = {}
    for order in ("forward", "reverse"):
        out = np.zeros(128, np.float32)
        selftest(order)("selftest.cu", "mirror")((2,), (64,), (values, out, np.int32(0)))
        wrong[order] = int((out != expected).sum())
    assert wrong["forward"] > 0 and wrong["reverse"] > 0, wrong  # each order reads half the values too early


def test_a_barrier_some_threads_never_reach_is_a_deadlock_not_a_hang():
    for order in ("forward", "concurrent"):
        with pytest.raises(harness.CudaCpuError, match=r"deadlock: 32 threads wait at __syncthreads\(\), 32 at "):
            selftest(order)("selftest.cu", "split_barrier")((1,), (64,), (np.zeros(64, np.float32),))


def test_a_write_past_an_argument_is_reported():
    out = np.zeros(60, np.float32)
    with pytest.raises(harness.CudaCpuError, match=r"wrote past the end of argument 0 \(float32, shape \(60,\)\)"):
        selftest()("selftest.cu", "unguarded_write")((1,), (64,), (out,))


def test_a_misaligned_wmma_pointer_is_reported_with_its_block_and_thread():
    with pytest.raises(harness.CudaCpuError, match=r"load_matrix_sync: the pointer is not 256-bit aligned "
                                                   r"\(block \(0,0,0\) thread \d+\)"):
        selftest()("selftest.cu", "misaligned_load")((1,), (32,), (np.zeros(32, np.float32),))


def test_arguments_and_launches_cupy_would_misread_are_refused():
    kernel = selftest()("selftest.cu", "widths")
    out = np.zeros(1, np.int64)
    kernel((1,), (1,), (out, np.int32(2), np.int64(3), np.float32(4.5)))
    assert out[0] == 9
    refused = {
        r"argument 1 is int32, got int64": ((1,), (1,), (out, np.int64(2), np.int64(3), np.float32(4))),
        r"argument 3 is float32, got float64": ((1,), (1,), (out, np.int32(2), np.int64(3), np.float64(4))),
        r"argument 0 is int64\*, got float32\*": ((1,), (1,), (np.zeros(1, np.float32), np.int32(2), np.int64(3),
                                                               np.float32(4))),
        r"takes 4 arguments, got 3": ((1,), (1,), (out, np.int32(2), np.int64(3))),
        r"argument 1 is a int; pass NumPy arrays and NumPy scalars": ((1,), (1,), (out, 2, np.int64(3),
                                                                                   np.float32(4))),
        r"a block of 2048 threads": ((1,), (2048,), (out, np.int32(2), np.int64(3), np.float32(4))),
        r"a grid of 1x70000x1 blocks": ((1, 70000), (1,), (out, np.int32(2), np.int64(3), np.float32(4))),
    }
    for message, launch in refused.items():
        with pytest.raises(harness.CudaCpuError, match=message):
            kernel(*launch)
    with pytest.raises(harness.CudaCpuError, match="dynamic shared memory is not emulated"):
        kernel((1,), (1,), (out, np.int32(2), np.int64(3), np.float32(4)), shared_mem=1024)
    with pytest.raises(harness.CudaCpuError, match="argument 0 is not C-contiguous"):
        kernel((1,), (1,), (np.zeros((2, 2), np.int64)[:, :1], np.int32(2), np.int64(3), np.float32(4)))


def test_the_build_cache_notices_a_changed_source(tmp_path):
    source = tmp_path / "selftest.cu"
    shutil.copy(harness.HERE / "selftest.cu", source)
    first = harness.build(source, SELFTEST["selftest.cu"])
    assert harness.build(source, SELFTEST["selftest.cu"]) == first
    assert harness.build(harness.HERE / "selftest.cu", SELFTEST["selftest.cu"]) == first  # same bytes elsewhere
    source.write_text(source.read_text() + "\n// changed\n")
    assert harness.build(source, SELFTEST["selftest.cu"]) != first


def test_the_launchers_cover_exactly_the_kernels_of_each_source():
    """Every exported, unmangled function of a CPU build is a kernel named in cuda_kernels.KERNELS or its
    launcher: a kernel added to a .cu file without an entry there (and so without tests) fails here."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed here")
    for source, names in cuda_kernels.KERNELS.items():
        library = harness.build(cuda_kernels.SOURCE_DIR / source, names)
        symbols = subprocess.run([nm, "-D", "--defined-only", "--format=posix", str(library)], capture_output=True,
                                 text=True, check=True).stdout.split("\n")
        functions = {line.split()[0] for line in symbols if line.split()[1:2] == ["T"]}
        unmangled = {f for f in functions if not f.startswith("_Z")}
        assert unmangled == set(names) | {f"cuda_cpu_launch_{n}" for n in names}, source


# --- the sanitizers: they catch the faults, and the kernels pass under them ------------------------------------------
SANITIZER_SELFTEST = '''
import sys
import numpy as np
sys.path.insert(0, "tests")
from test_cuda_cpu import selftest
kernel = "{kernel}"
if kernel == "unguarded_write":
    selftest(sanitizer="address")("selftest.cu", kernel)((1,), (64,), (np.zeros(60, np.float32),))
else:
    selftest(sanitizer="thread")("selftest.cu", kernel)((2,), (64,), (np.arange(128, dtype=np.float32),
                                                                      np.zeros(128, np.float32), np.int32(0)))
print("not caught")
'''


@pytest.mark.parametrize("sanitizer,kernel", [pytest.param("address", "unguarded_write", marks=needs("address")),
                                              pytest.param("thread", "mirror", marks=needs("thread"))])
def test_the_sanitizers_catch_a_write_past_an_argument_and_a_race(sanitizer, kernel, builds):
    env = harness.sanitizer_environment(sanitizer)
    # on one core: the OS then runs a block's threads one after another, the schedule under which a race once went
    # unreported (a late thread took a lock an earlier one released after its kernel body; cuda_cpu.h's start gate)
    one_core = {min(os.sched_getaffinity(0))}
    proc = subprocess.run([sys.executable, "-c", SANITIZER_SELFTEST.format(kernel=kernel)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: os.sched_setaffinity(0, one_core))
    assert proc.returncode == SANITIZER_EXIT and SANITIZER_REPORTS[sanitizer] in proc.stderr, proc.stderr[-3000:]
    assert ("heap-buffer-overflow" if sanitizer == "address" else "data race") in proc.stderr


@pytest.mark.parametrize("sanitizer,selection", [
    # nvcc must not run under a preloaded sanitizer runtime: the compile tests stay out of these runs
    # ASan + UBSan: every kernel and case (the greedy picks repeat the steps' launches: left out)
    pytest.param("address", "not gpu and not compile and not picks", marks=needs("address")),
    # TSan (slow): the kernels with shared memory and barriers, on their cases with tails
    pytest.param("thread", "(knn_matches and (tails or two-entry) or coreset_steps and (tail or passes)) and not gpu",
                 marks=needs("thread")),
])
def test_the_kernels_pass_under_the_sanitizers(sanitizer, selection, builds):
    proc = child_pytest("tests/test_cuda_kernels.py", "-k", selection, sanitizer=sanitizer)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Sanitizer" not in output and "runtime error" not in output, output[-4000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


# --- planted faults: each one must fail the kernel tests -----------------------------------------------------------
# name: (source, the correct text, the fault, how it is caught: "" = a result differs under a schedule, or a
# sanitizer's report; which kernel tests run)
PLANTED_FAULTS = {
    "missing __syncthreads() in the coreset argmax tree":
        ("coreset.cu", "        __syncthreads();\n    }\n    if (t == 0)", "    }\n    if (t == 0)", "", "coreset"),
    "missing __syncwarp() before the WMMA loads":
        ("knn.cu", "            __syncwarp();\n            wmma::fragment<wmma::matrix_a",
         "            wmma::fragment<wmma::matrix_a", "", "knn_matches and tails"),
    "off-by-one in the channel tail mask":
        ("knn.cu", "(row < row_end && ch < channels)", "(row < row_end && ch <= channels)", "", "knn_matches"),
    "off-by-one in the row tail mask (a read past the bank, AddressSanitizer)":
        ("knn.cu", "(row < row_end && ch < channels)", "(row <= row_end && ch < channels)", "address",
         "knn_matches and tails"),
    "wrong shared-memory stride when staging a tile":
        ("knn.cu", "tile[r * TILE + c + t]", "tile[r * (TILE / 2) + c + t]", "", "knn_matches and tails"),
    "own-image exclusion dropped from the top-k":
        ("knn.cu", "image_ids[b] == own || ", "", "", "knn_matches"),
    "coreset update that skips the last point":
        ("coreset.cu", "p < n_points; p += CORESET_THREADS", "p < n_points - 1; p += CORESET_THREADS", "",
         "coreset_steps"),
}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Everything the child runs below load, compiled at once (one compiler per core) before the first of them: the
    sanitized builds of every source, and each planted fault in a folder of its own. Returns those folders."""
    folders, jobs = {}, []
    for i, (fault, (source, correct, planted, sanitizer, _)) in enumerate(PLANTED_FAULTS.items()):
        folder = tmp_path_factory.mktemp(f"fault{i}")
        shutil.copytree(cuda_kernels.SOURCE_DIR, folder, dirs_exist_ok=True)
        text = (folder / source).read_text()
        assert text.count(correct) == 1, f"{source} changed: update the planted fault {fault!r}"
        (folder / source).write_text(text.replace(correct, planted))
        folders[fault] = folder
        if not sanitizer or harness.sanitizer_available(sanitizer):
            jobs += [(folder / name, names, sanitizer) for name, names in cuda_kernels.KERNELS.items()]
    for sanitizer in filter(harness.sanitizer_available, ("address", "thread")):
        jobs += [(cuda_kernels.SOURCE_DIR / name, names, sanitizer) for name, names in cuda_kernels.KERNELS.items()]
        jobs += [(harness.HERE / name, names, sanitizer) for name, names in SELFTEST.items()]
    harness.build_many(jobs)  # every fault compiles: what fails is the run
    return folders


@pytest.mark.parametrize("fault", [pytest.param(f, marks=needs(PLANTED_FAULTS[f][3])) for f in PLANTED_FAULTS])
def test_a_planted_fault_fails_the_kernel_tests(fault, builds):
    source, correct, planted, sanitizer, selection = PLANTED_FAULTS[fault]
    # the serial schedules make a missing barrier fail every time; a sanitizer watches real concurrent threads
    orders = "concurrent" if sanitizer else "forward,reverse"
    proc = child_pytest("tests/test_cuda_kernels.py", "-k", f"({selection}) and not gpu", sanitizer=sanitizer,
                        orders=orders, sources=builds[fault])
    if sanitizer:
        assert proc.returncode == SANITIZER_EXIT and SANITIZER_REPORTS[sanitizer] in proc.stderr, \
            (proc.stdout + proc.stderr)[-3000:]
    else:
        assert proc.returncode == 1 and " failed" in proc.stdout, (proc.stdout + proc.stderr)[-3000:]
