"""Build ``postprocess/cuda/*.cu`` for the CPU with ``cuda_cpu.h`` and launch its kernels through ctypes.

``CpuKernels(order=...)`` is a drop-in for ``postprocess.cuda_kernels.cupy_kernel``: ``compiled(source, name)``
gives a kernel that is called as CuPy's are, ``kernel(grid, block, args, shared_mem=0)``, with NumPy arrays and
NumPy scalars in ``args``. The wrappers of ``postprocess/cuda_kernels.py`` therefore size every launch themselves,
exactly as they do for CuPy.

Each array argument is copied into a buffer of its own for the launch (256-byte aligned, as a CuPy allocation is)
and copied back if the kernel changed it: under AddressSanitizer the copy is exact, so a read or write past any
argument is reported; without it the copy has guard bytes on both sides, checked after the launch, and a read past
the end reads the guard pattern (huge values) instead of a neighbour's data.

Builds are cached by the hash of everything that goes into them (sources, header, flags, compiler version).
Sanitized builds need their runtime loaded first: run Python with ``LD_PRELOAD=$(runtime_library(sanitizer))``
(``sanitizer_environment`` gives the whole environment).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from postprocess import cuda_kernels

HERE = Path(__file__).resolve().parent
HEADER = HERE / "cuda_cpu.h"
INCLUDE = HERE / "include"
ROOT = HERE.parents[1]
CACHE = Path(os.environ.get("PA_CLIP_CUDA_CPU_CACHE", ROOT / ".build" / "cuda_cpu"))
CXX = os.environ.get("CXX", "g++")

ORDERS = {"concurrent": 0, "forward": 1, "reverse": 2, "shuffled": 3}
SANITIZER_FLAGS = {
    "": [],
    # -fno-sanitize-recover: undefined behaviour stops the run instead of printing and going on
    "address": ["-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all",
                "-fno-omit-frame-pointer"],
    "thread": ["-fsanitize=thread"],
}
RUNTIMES = {"address": "libasan.so", "thread": "libtsan.so"}
GUARD = 256  # bytes before and after each array argument (no sanitizer)
GUARD_BYTE = 0x5A  # float32 1.5e16, float16 203.25, int64 6.5e18: a read past the end shows


class CudaCpuError(RuntimeError):
    """A launch the harness refused or a kernel fault (deadlock, bad WMMA pointer, write past an argument)."""


class LaunchConfig(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_ulonglong),
                ("order", ctypes.c_int), ("seed", ctypes.c_ulonglong)]


def compiler_available() -> bool:
    return shutil.which(CXX) is not None


def runtime_library(sanitizer: str) -> str:
    """The sanitizer's runtime as the compiler knows it (a path for LD_PRELOAD)."""
    return subprocess.run([CXX, f"-print-file-name={RUNTIMES[sanitizer]}"], capture_output=True, text=True,
                          check=True).stdout.strip()


def sanitizer_available(sanitizer: str) -> bool:
    """The compiler has the sanitizer's runtime (it answers a bare name when it has not)."""
    return compiler_available() and Path(runtime_library(sanitizer)).is_absolute()


def sanitizer_environment(sanitizer: str) -> dict[str, str]:
    """The environment for a Python process that loads ``sanitizer`` builds."""
    env = dict(os.environ, PA_CLIP_CUDA_CPU_SANITIZER=sanitizer, LD_PRELOAD=runtime_library(sanitizer))
    # Python itself leaks by design at exit, and is not built with the sanitizer: report only real faults
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:exitcode=86"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:exitcode=86"
    env["TSAN_OPTIONS"] = "exitcode=86:halt_on_error=1:report_signal_unsafe=0"
    # NumPy 2's bundled OpenBLAS runs a thread pool of its own, not built with TSan: its workers' writes race
    # with NumPy freeing the result as far as TSan sees. The kernels are what is checked here.
    env["OPENBLAS_NUM_THREADS"] = "1"
    return env


def _compiler_version() -> str:
    return subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout


def build(source: Path, kernels: tuple[str, ...], sanitizer: str = "") -> Path:
    """A shared library with ``cuda_cpu_launch_<name>`` for each kernel of ``source`` (cached)."""
    unit = f'#include "{source}"\n' + "".join(f"CUDA_CPU_KERNEL({name})\n" for name in kernels)
    flags = ["-std=c++17", "-O1", "-g", "-fPIC", "-shared", "-pthread", "-Wall", "-include", str(HEADER),
             f"-I{INCLUDE}", *cuda_kernels.compile_options(), *SANITIZER_FLAGS[sanitizer]]
    # keyed by content, not by path: a copy of an unchanged source (the planted-fault folders) reuses its build
    digest = hashlib.sha256()
    for part in (" ".join(kernels), " ".join(flags), _compiler_version()):
        digest.update(part.encode())
    for path in (source, HEADER, *sorted(INCLUDE.iterdir())):
        digest.update(path.read_bytes())
    target = CACHE / f"{source.stem}-{sanitizer or 'plain'}-{digest.hexdigest()[:20]}.so"
    if target.exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        unit_path = Path(tmp) / f"{source.stem}_launchers.cpp"
        unit_path.write_text(unit)
        built = Path(tmp) / target.name
        proc = subprocess.run([CXX, *flags, "-o", str(built), str(unit_path)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise CudaCpuError(f"{source.name} does not compile for the CPU:\n{proc.stderr}")
        os.replace(built, target)  # atomic: a parallel build of the same key writes the same bytes
    return target


def build_many(jobs) -> list[Path]:
    """``build(source, kernels, sanitizer)`` for each job, one compiler per core: a fresh clone compiles a dozen
    libraries in its first test run."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(lambda job: build(*job), list(jobs)))


class CpuKernel:
    """One kernel, called as a CuPy RawKernel is."""

    def __init__(self, library: ctypes.CDLL, source: str, name: str, order: int, seed: int, exact_copies: bool):
        self.name = f"{source}:{name}"
        self.function = getattr(library, f"cuda_cpu_launch_{name}")
        self.function.argtypes = [ctypes.POINTER(LaunchConfig), ctypes.POINTER(ctypes.c_void_p),
                                  ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.function.restype = ctypes.c_int
        self.order, self.seed, self.exact_copies = order, seed, exact_copies
        self.launches = 0

    def __call__(self, grid, block, args, shared_mem: int = 0):
        grid, block = (tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3]
        cfg = LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared_mem, self.order,
                           self.seed + self.launches)
        self.launches += 1
        holders, types, buffers = [], [], []
        for i, arg in enumerate(args):
            if isinstance(arg, np.ndarray):
                if not arg.flags.c_contiguous:
                    raise CudaCpuError(f"{self.name}: argument {i} is not C-contiguous (a kernel reads its data "
                                       "pointer as a dense array)")
                buffer, data = self._copy_in(arg)
                buffers.append((i, arg, buffer, data))
                holders.append(ctypes.c_void_p(data.ctypes.data))
                types.append(f"{arg.dtype.name}*")
            elif isinstance(arg, np.generic):
                holders.append(_scalar(arg))
                types.append(arg.dtype.name)
            else:
                raise CudaCpuError(f"{self.name}: argument {i} is a {type(arg).__name__}; pass NumPy arrays and "
                                   "NumPy scalars (np.int32(...)), whose width the kernel can check")
        pointers = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
        names = (ctypes.c_char_p * len(types))(*[t.encode() for t in types])
        error = ctypes.create_string_buffer(4096)
        status = self.function(ctypes.byref(cfg), pointers, names, len(holders), error, len(error))
        for i, original, buffer, data in buffers:
            self._check_guards(i, original, buffer)
            if data.tobytes() != original.tobytes():
                original[...] = data  # an output (or an input the kernel wrote: a read-only one raises here)
        if status != 0:
            raise CudaCpuError(error.value.decode(errors="replace"))

    def _copy_in(self, array: np.ndarray):
        if self.exact_copies:
            data = array.copy()  # its own allocation: the sanitizer's redzones sit right at its ends
            return None, data
        raw = np.full(array.nbytes + 2 * GUARD + 256, GUARD_BYTE, dtype=np.uint8)
        start = (-raw.ctypes.data) % 256 + GUARD
        data = raw[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
        data[...] = array
        return (raw, start), data

    def _check_guards(self, i: int, array: np.ndarray, buffer) -> None:
        if buffer is None:
            return
        raw, start = buffer
        before, after = raw[start - GUARD:start], raw[start + array.nbytes:start + array.nbytes + GUARD]
        for side, guard in (("before the start", before), ("past the end", after)):
            if (guard != GUARD_BYTE).any():
                raise CudaCpuError(f"{self.name} wrote {side} of argument {i} ({array.dtype}, shape {array.shape})")


def _scalar(value: np.generic):
    kinds = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.int64): ctypes.c_int64,
             np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}
    if value.dtype not in kinds:
        raise CudaCpuError(f"no kernel takes a {value.dtype} scalar")
    return kinds[value.dtype](value.item())


class CpuKernels:
    """``compiled(source, name)`` for ``postprocess.cuda_kernels``: the sources built for the CPU.

    ``order``: a key of ORDERS. ``sanitizer``: "" (plain), "address" (ASan + UBSan) or "thread" (TSan); a sanitized
    build only loads in a process started with ``sanitizer_environment``. ``source_dir``: where the .cu files are
    (a copy with a planted fault, in the tests that prove faults are caught). ``kernels``: the kernel names of each
    source (default ``cuda_kernels.KERNELS``)."""

    def __init__(self, order: str = "concurrent", sanitizer: str = "", source_dir: Path | None = None,
                 seed: int = 0, kernels: dict[str, tuple[str, ...]] | None = None):
        self.order, self.sanitizer, self.seed = order, sanitizer, seed
        self.source_dir = Path(source_dir or cuda_kernels.SOURCE_DIR)
        self.names = kernels or cuda_kernels.KERNELS
        self.libraries: dict[str, ctypes.CDLL] = {}
        self.kernels: dict[tuple[str, str], CpuKernel] = {}

    def build_all(self) -> list[Path]:
        return build_many((self.source_dir / source, names, self.sanitizer) for source, names in self.names.items())

    def library(self, source: str) -> ctypes.CDLL:
        if source not in self.libraries:
            path = build(self.source_dir / source, self.names[source], self.sanitizer)
            self.libraries[source] = ctypes.CDLL(str(path))
        return self.libraries[source]

    def __call__(self, source: str, name: str) -> CpuKernel:
        if (source, name) not in self.kernels:
            if name not in self.names[source]:
                raise KeyError(f"{source} has no kernel {name!r}")
            self.kernels[source, name] = CpuKernel(self.library(source), source, name, ORDERS[self.order],
                                                   self.seed, exact_copies=bool(self.sanitizer))
        return self.kernels[source, name]
