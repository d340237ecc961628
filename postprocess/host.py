"""Settings of the machine that runs the scoring, kept apart from ``PAClipConfig``.

They decide how the work is done (how much memory a kNN block may take, NumPy or CuPy, how many bytes of banks stay
loaded), not what comes out: they are not stored in a bank's manifest, so a bank built on one host scores the
same on any other. One exception, chosen by whoever runs the host: ``cpu_matmul="bfloat16"`` multiplies the kNN's
similarities in bfloat16 on a CPU, faster where the CPU has AVX-512 BF16, with scores off by about 1e-3
(``benchmarks/online_speed.py``, ``benchmarks/bank_frontier.py``). The Triton models read them from their
``config.pbtxt`` parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

ARRAY_MODULES = ("auto", "numpy", "cupy")
CPU_MATMULS = ("float32", "bfloat16")  # what kernels.similarities / nearest_distances take


@dataclass(frozen=True)
class HostSettings:
    # Largest intermediate (similarity block) of the kNN kernels; results do not depend on it.
    memory_budget_mb: int = 256
    # "numpy", "cupy", or "auto" (CuPy when a CUDA GPU is usable).
    array_module: str = "auto"
    # Bytes of banks the scoring service keeps loaded; the least recently used bank goes first.
    bank_cache_mb: int = 4096
    # How much lower the bank model's CPU priority is (Unix nice, 0-19): a build then takes the cores scoring
    # leaves idle, not the ones it needs.
    build_nice: int = 10
    # The kNN's products on a CPU: "float32" (NumPy's BLAS) or "bfloat16" (torch/oneDNN; needs torch and a CPU
    # with bfloat16 support). The GPU path is float32 whatever this says.
    cpu_matmul: str = "float32"

    def __post_init__(self):
        if self.memory_budget_mb < 1:
            raise ValueError(f"memory_budget_mb must be at least 1, got {self.memory_budget_mb}")
        if self.array_module not in ARRAY_MODULES:
            raise ValueError(f"array_module must be one of {', '.join(ARRAY_MODULES)}, got {self.array_module!r}")
        if self.bank_cache_mb < 0:
            raise ValueError(f"bank_cache_mb must be >= 0, got {self.bank_cache_mb}")
        if not 0 <= self.build_nice <= 19:
            raise ValueError(f"build_nice must be in [0, 19], got {self.build_nice}")
        if self.cpu_matmul not in CPU_MATMULS:
            raise ValueError(f"cpu_matmul must be one of {', '.join(CPU_MATMULS)}, got {self.cpu_matmul!r}")
        if self.cpu_matmul == "bfloat16":
            from .kernels import bfloat16_available

            if not bfloat16_available():
                raise ValueError("cpu_matmul=bfloat16 needs torch (pip install torch) and a CPU whose oneDNN "
                                 "supports bfloat16; set cpu_matmul=float32 on this host")

    @property
    def budget_bytes(self) -> int:
        return int(self.memory_budget_mb) * 1024 * 1024

    @property
    def bank_cache_bytes(self) -> int:
        return int(self.bank_cache_mb) * 1024 * 1024

    def xp(self):
        """The array module to score with: numpy, or cupy when asked for or (``auto``) when a CUDA GPU is there."""
        import numpy as np

        if self.array_module == "numpy":
            return np
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() > 0:
                return cupy
        except Exception as err:  # no cupy, no driver, no device
            if self.array_module == "cupy":
                raise RuntimeError(f"array_module=cupy but CuPy cannot use a GPU here: {err}") from err
        return np

    @classmethod
    def from_parameters(cls, parameters: dict) -> "HostSettings":
        """From Triton model-config parameters (strings); missing or empty ones keep their defaults."""
        values = {}
        for f in fields(cls):
            raw = str(parameters.get(f.name, "") or "").strip()
            if raw:
                try:
                    values[f.name] = int(raw) if f.type in ("int", int) else raw
                except ValueError as err:
                    raise ValueError(f"model parameter {f.name} must be an integer, got {raw!r}") from err
        return cls(**values)


def lower_priority(nice: int) -> int:
    """Raise the nice value of every thread of this process by ``nice`` (on Linux each thread has its own, and
    NumPy's BLAS threads exist from its import on; threads started later inherit their starter's). Returns the
    number of threads changed; 0 where the system has no per-thread list."""
    import os
    from pathlib import Path

    tasks = Path("/proc/self/task")
    if nice <= 0 or not tasks.is_dir():
        return 0
    changed = 0
    for entry in tasks.iterdir():
        tid = int(entry.name)
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
            changed += 1
        except OSError:  # ended meanwhile
            pass
    return changed


DEFAULT_HOST = HostSettings()
